"""Runs every AdapterRollout: observe, decide (machine.advance), apply, record.

Kopf-style separation: the machine decides, this module only does I/O through a
Backend (Kubernetes, or local files). Only the leader writes. Actions are applied in
order and the status is written only when all succeeded, with the resourceVersion
it was computed from; a conflict means someone else moved first, and the next pass
decides again from fresh data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.backend.base import Backend, BackendError, StaleError, StoredRollout
from controller.inventory import Inventory
from controller.rollout.machine import (
    Action,
    Decision,
    EmitEvent,
    EnsureAdapterListed,
    EnsureAdapterRemoved,
    EventType,
    Observation,
    SetWeights,
    advance,
    reject,
)
from controller.rollout.observe import adapter_config, adapter_inventory, model_view, step_traffic
from controller.rollout.spec import Phase, RolloutSpec, RolloutStatus, SpecError, parse_spec
from controller.stats import TrafficStats

log = structlog.get_logger("controller")
TICK_SECONDS = 1.0
"""Pauses and gate windows end by the clock, not by events: look at least this often."""


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry, backend: Backend) -> None:
        self.transitions = Counter(
            "loractl_rollout_transitions",
            "Rollout phase or step changes, by rollout, new phase and reason.",
            ["rollout", "phase", "reason"],
            registry=registry,
        )
        self.gate_evaluations = Counter(
            "loractl_rollout_gate_evaluations",
            "Gate evaluations that decided something, by rollout, gate and result.",
            ["rollout", "gate", "result"],
            registry=registry,
        )
        registry.register(_PhaseCollector(backend))


class _PhaseCollector(Collector):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "loractl_rollouts", "AdapterRollouts by phase.", labels=["phase"]
        )
        counts = dict.fromkeys((p.value for p in Phase), 0)
        for stored in self._backend.rollouts():
            phase = str(stored.status.get("phase") or Phase.PENDING.value)
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


class RolloutRunner:
    def __init__(
        self,
        backend: Backend,
        inventory: Inventory,
        stats: TrafficStats,
        metrics: RolloutMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.backend = backend
        self.inventory = inventory
        self.stats = stats
        self.metrics = metrics
        self._clock = clock
        self._trigger = asyncio.Event()
        backend.on_change(self.trigger)

    def trigger(self) -> None:
        self._trigger.set()

    async def run(self, is_leader: Callable[[], bool]) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the trigger fires, and the loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS):
                    await self._trigger.wait()
            self._trigger.clear()
            if is_leader():
                await self.reconcile_all()

    async def reconcile_all(self) -> None:
        for stored in self.backend.rollouts():
            try:
                await self.reconcile(stored)
            except StaleError:
                self.trigger()  # someone wrote first: decide again from what they wrote
            except BackendError as exc:
                log.warning("rollout_apply_failed", rollout=stored.ref.name, error=str(exc))
            except Exception:  # one broken rollout must not stop the others
                log.exception("rollout_reconcile_crashed", rollout=stored.ref.name)

    async def reconcile(self, stored: StoredRollout) -> None:
        status = RolloutStatus.model_validate(stored.status or {})
        now = self._clock()
        spec: RolloutSpec | None
        try:
            spec = parse_spec(stored.spec)
        except SpecError as exc:
            spec = None
            decision = reject(status, exc.problems, self._observe(None, status, now, stored))
        else:
            decision = advance(spec, status, self._observe(spec, status, now, stored))
        for action in decision.actions:
            await self._apply(stored, spec, action)
        if decision.status != status:
            await self.backend.update_rollout_status(
                stored.ref.name, decision.status.to_api(), stored.resource_version
            )
            self._count(stored.ref.name, status, decision)

    def _observe(
        self,
        spec: RolloutSpec | None,
        status: RolloutStatus,
        now: datetime,
        stored: StoredRollout,
    ) -> Observation:
        if spec is None:
            return Observation(
                now, None, False, None, adapter_inventory([], ""), generation=stored.generation
            )
        config, config_error = adapter_config(
            self.backend.configmap(spec.config_map.name), spec.config_map.key
        )
        return Observation(
            now=now,
            model=model_view(self.backend.inference_model(spec.model, pool=spec.pool)),
            pool_exists=self.backend.pool(spec.pool),
            config_map=config,
            config_map_error=config_error,
            inventory=adapter_inventory(self.inventory.snapshot(), spec.to.id),
            traffic=step_traffic(self.stats, spec, status, now),
            generation=stored.generation,
        )

    async def _apply(self, stored: StoredRollout, spec: RolloutSpec | None, action: Action) -> None:
        if isinstance(action, EmitEvent):
            warning = action.type is EventType.WARNING
            await self.backend.emit_event(
                stored.ref, "Warning" if warning else "Normal", action.reason, action.message
            )
            log.info(
                "rollout_event",
                rollout=stored.ref.name,
                reason=action.reason,
                message=action.message,
            )
            return
        assert spec is not None, "only events are decided for a spec that does not parse"
        cm = spec.config_map
        if isinstance(action, EnsureAdapterListed):
            await self.backend.ensure_adapters(cm.name, cm.key, {action.id: action.source}, ())
        elif isinstance(action, EnsureAdapterRemoved):
            await self.backend.ensure_adapters(cm.name, cm.key, {}, (action.id,))
        elif isinstance(action, SetWeights):
            weights = {target.name: target.weight for target in action.targets}
            await self.backend.set_weights(
                spec.model, weights, pool=spec.pool, sticky=action.sticky_header
            )

    def _count(self, name: str, before: RolloutStatus, decision: Decision) -> None:
        after = decision.status
        for entry in after.history[len(before.history) :]:
            self.metrics.transitions.labels(
                rollout=name, phase=entry.phase, reason=entry.reason
            ).inc()
        if after.last_gates != before.last_gates:
            for gate in after.last_gates:
                result = "pass" if gate.passed else "fail"
                self.metrics.gate_evaluations.labels(
                    rollout=name, gate=gate.name, result=result
                ).inc()
