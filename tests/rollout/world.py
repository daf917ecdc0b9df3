"""A pretend cluster for the rollout machine: it answers observations and applies actions.

`World.tick` is the controller loop in miniature, and it checks on every call
what must hold on every call: the status read back from its API form decides
the same thing (a restarted controller), and deciding again once the actions
are applied asks for nothing and makes no transition (idempotence; only the
figures and the message may freshen, as the new window is observed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from controller.models import WeightedTarget
from controller.rollout import (
    Decision,
    EmitEvent,
    EnsureAdapterListed,
    EnsureAdapterRemoved,
    Inventory,
    ModelView,
    Observation,
    RolloutSpec,
    RolloutStatus,
    SetWeights,
    Traffic,
    advance,
    parse_spec,
)
from controller.stats import TargetSummary
from sidecar.config import DesiredState, parse_config

FROM = "food-review-1"
TO = "food-review-2"
FROM_SOURCE = "Kawon/llama3.1-food-finetune_v14_r8"
TO_SOURCE = "hf://Kawon/llama3.1-food-finetune_v15_r8"
POOL = "vllm-llama3-8b-instruct"
MODEL = "food-review"
CONFIG_MAP = "vllm-llama3-8b-instruct-adapters"
START = datetime(2026, 5, 1, 9, 0, 0, tzinfo=UTC)
NO_TRAFFIC = TargetSummary(requests=0, errors=0, p50_seconds=None, p95_seconds=None)


def spec(**overrides: Any) -> RolloutSpec:
    """The example rollout (10/50/100 %, 5-minute pauses) with API-form overrides."""
    raw: dict[str, Any] = {
        "pool": POOL,
        "model": MODEL,
        "configMap": {"name": CONFIG_MAP},
        "from": {"id": FROM, "source": FROM_SOURCE},
        "to": {"id": TO, "source": TO_SOURCE},
        "steps": [
            {"weight": 10, "pause": "5m"},
            {"weight": 50, "pause": "5m"},
            {"weight": 100, "pause": "5m"},
        ],
    }
    raw.update(overrides)
    return parse_spec(raw)


def summary(requests: int, errors: int = 0, p95: float = 0.2) -> TargetSummary:
    return TargetSummary(requests=requests, errors=errors, p50_seconds=p95 / 2, p95_seconds=p95)


def progress(status: RolloutStatus) -> tuple[object, ...]:
    """Everything but the figures and wording, which may freshen without anything happening."""
    return (
        status.phase,
        status.current_step,
        status.step_started_at,
        status.weights,
        status.consecutive_gate_failures,
        status.unlist_after,
        status.history,
    )


def roundtrip(status: RolloutStatus) -> RolloutStatus:
    """What a restarted controller reads back: the API form, through JSON."""
    return RolloutStatus.model_validate(json.loads(json.dumps(status.to_api())))


@dataclass
class World:
    now: datetime = START
    ensure_exist: dict[str, str] = field(default_factory=lambda: {FROM: FROM_SOURCE})
    ensure_not_exist: set[str] = field(default_factory=set)
    targets: tuple[WeightedTarget, ...] = (WeightedTarget(FROM, 100),)
    sticky_header: str | None = None  # the InferenceModel's annotation
    model_pool: str | None = POOL  # None: no InferenceModel serves the model
    pool_exists: bool = True
    config_map_exists: bool = True
    ready_pods: int = 3
    pods_with_to: int = 0
    load_problems: tuple[str, ...] = ()
    generation: int = 1
    events: list[EmitEvent] = field(default_factory=list)
    applied: list[EnsureAdapterListed | SetWeights | EnsureAdapterRemoved] = field(
        default_factory=list
    )
    observations: list[tuple[RolloutStatus, Observation]] = field(default_factory=list)
    _window: datetime | None = None
    _baseline: TargetSummary = NO_TRAFFIC
    _canary: TargetSummary = NO_TRAFFIC

    def wait(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def serve(self, canary: TargetSummary, baseline: TargetSummary = NO_TRAFFIC) -> None:
        """The picker's figures for the current window (the step the last tick left)."""
        self._canary, self._baseline = canary, baseline

    def observe(self, status: RolloutStatus) -> Observation:
        if status.step_started_at != self._window:
            # A new window (next step, or restarted after a failure) starts counting from zero.
            self._window = status.step_started_at
            self._canary = self._baseline = NO_TRAFFIC
        traffic = None
        if self._window is not None:
            traffic = Traffic(since=self._window, baseline=self._baseline, canary=self._canary)
        return Observation(
            now=self.now,
            model=None
            if self.model_pool is None
            else ModelView(self.model_pool, self.targets, self.sticky_header),
            pool_exists=self.pool_exists,
            config_map=self._config() if self.config_map_exists else None,
            inventory=Inventory(self.ready_pods, self.pods_with_to, self.load_problems),
            traffic=traffic,
            generation=self.generation,
        )

    def apply(self, decision: Decision) -> None:
        for action in decision.actions:
            if isinstance(action, EmitEvent):
                self.events.append(action)
                continue
            self.applied.append(action)
            if isinstance(action, EnsureAdapterListed):
                self.ensure_exist[action.id] = action.source
                self.ensure_not_exist.discard(action.id)
            elif isinstance(action, EnsureAdapterRemoved):
                self.ensure_exist.pop(action.id, None)
                self.ensure_not_exist.add(action.id)
            else:
                self.targets = action.targets
                self.sticky_header = action.sticky_header or self.sticky_header

    def tick(self, rollout: RolloutSpec, status: RolloutStatus) -> Decision:
        observation = self.observe(status)
        self.observations.append((status, observation))
        decision = advance(rollout, status, observation)
        assert advance(rollout, roundtrip(status), observation) == decision
        self.apply(decision)
        again = advance(rollout, decision.status, self.observe(decision.status))
        assert again.actions == (), again.actions
        assert progress(again.status) == progress(decision.status)
        return decision

    def weights(self) -> dict[str, int]:
        return {target.name: target.weight for target in self.targets}

    def event_reasons(self) -> list[str]:
        return [event.reason for event in self.events]

    def _config(self) -> DesiredState:
        def entries(ids: dict[str, str]) -> list[dict[str, str]]:
            return [{"id": i, "source": s} for i, s in ids.items()]

        document = {
            "vLLMLoRAConfig": {
                "name": CONFIG_MAP,
                "ensureExist": {"models": entries(self.ensure_exist)},
                "ensureNotExist": {
                    "models": entries({i: "/unused" for i in sorted(self.ensure_not_exist)})
                },
            }
        }
        return parse_config(yaml.safe_dump(document))


def run_healthy(world: World, rollout: RolloutSpec) -> list[RolloutStatus]:
    """Drive a rollout whose canary behaves to its end; every status it went through."""
    status = RolloutStatus()
    seen = [status]
    for _ in range(50):
        status = world.tick(rollout, status).status
        seen.append(status)
        if status.phase in {"Promoted", "Aborted", "Failed"}:
            if status.unlist_after is not None:
                seen.append(drain(world, rollout, status))
            return seen
        if status.phase == "Loading":
            world.pods_with_to = world.ready_pods
        world.serve(canary=summary(100), baseline=summary(400))
        world.wait(minutes=5)
    raise AssertionError(f"rollout did not finish: {status}")


def drain(world: World, rollout: RolloutSpec, status: RolloutStatus) -> RolloutStatus:
    """Wait out the drain of the adapter leaving the traffic, decide: it is unlisted."""
    assert status.unlist_after is not None
    world.now = status.unlist_after
    status = world.tick(rollout, status).status
    assert status.unlist_after is None
    return status
