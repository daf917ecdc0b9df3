"""Gate evaluation: the numbers behind every promote-or-roll-back decision.

Pure arithmetic over what the controller observed: how many ready pods hold
`to` (the inventory) and the picker's live per-target figures since the step
began. Every gate comes back as a `GateEvaluation` with its value and
threshold, so the status and the CLI can show why a step passed or failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from controller.rollout.spec import GateEvaluation, Gates
from controller.stats import TargetSummary

READY_FRACTION = "minReadyFraction"
REQUESTS = "minRequests"
ERROR_RATE = "maxErrorRate"
LATENCY_RATIO = "maxP95LatencyRatio"


@dataclass(frozen=True)
class Inventory:
    ready_pods: int
    pods_with_to: int
    """Ready pods where `to` is loaded: their sidecar reports it loaded or vLLM lists it."""
    problems: tuple[str, ...] = ()
    """Load failures reported for `to` (e.g. "pod-a: LoRA rank 16 is greater than ..."):
    shown in the status so a stuck Loading says why."""
    unobserved: int = 0
    """Ready pods the controller has not observed yet (just started, or their figures are
    stale): they may well hold `to`."""

    @property
    def fraction(self) -> float:
        return self.pods_with_to / self.ready_pods if self.ready_pods else 0.0

    def could_reach(self, fraction: float) -> bool:
        """Whether the unobserved pods alone may make up the shortfall."""
        if not self.ready_pods or not self.unobserved:
            return False
        return (self.pods_with_to + self.unobserved) / self.ready_pods >= fraction


@dataclass(frozen=True)
class Traffic:
    since: datetime
    """The window start these figures cover; they count only if it is status.stepStartedAt."""
    baseline: TargetSummary
    """Answers served by `from`."""
    canary: TargetSummary
    """Answers served by `to`."""


class Verdict(StrEnum):
    PASS = "Pass"
    WAIT = "Wait"  # not enough requests to judge yet: not a failure
    FAIL = "Fail"


@dataclass(frozen=True)
class GateReport:
    inventory: GateEvaluation
    requests: GateEvaluation | None
    """None on a 0% step: no traffic goes to `to`, so there is nothing to count."""
    traffic: tuple[GateEvaluation, ...]
    """Error rate and latency: judged only once `to` has served min_requests."""
    requests_overdue: bool = False
    inventory_unobserved: bool = False
    """The inventory gate fails only for want of observations: wait, do not fail (a
    controller that just restarted has not scraped its pods yet)."""

    @property
    def evaluations(self) -> tuple[GateEvaluation, ...]:
        requests = () if self.requests is None else (self.requests,)
        return (self.inventory, *requests, *self.traffic)

    @property
    def traffic_failed(self) -> bool:
        return any(not gate.passed for gate in self.traffic)

    @property
    def verdict(self) -> Verdict:
        enough = self.requests is None or self.requests.passed
        starved = self.requests_overdue and not enough
        short = not self.inventory.passed and not self.inventory_unobserved
        if short or self.traffic_failed or starved:
            return Verdict.FAIL
        return Verdict.PASS if enough and self.inventory.passed else Verdict.WAIT

    def failures(self) -> str:
        return "; ".join(f"{g.name}: {g.detail}" for g in self.evaluations if not g.passed)


def inventory_gate(gates: Gates, inventory: Inventory, to_id: str) -> GateEvaluation:
    detail = (
        f"{inventory.pods_with_to} of {inventory.ready_pods} ready pods have {to_id} loaded"
        if inventory.ready_pods
        else "no ready pods in the pool"
    )
    if inventory.unobserved:
        detail += f" ({inventory.unobserved} not observed yet)"
    if inventory.problems:
        detail += "; " + "; ".join(inventory.problems)
    return GateEvaluation(
        name=READY_FRACTION,
        passed=inventory.fraction >= gates.min_ready_fraction,
        value=inventory.fraction,
        threshold=gates.min_ready_fraction,
        detail=detail,
    )


def evaluate_step(
    gates: Gates,
    weight: int,
    inventory: Inventory,
    traffic: Traffic,
    ids: tuple[str, str],
    requests_overdue: bool = False,
) -> GateReport:
    """Judge one step's window; `ids` is (from, to); `requests_overdue`: the wait ran out."""
    from_id, to_id = ids
    ready = inventory_gate(gates, inventory, to_id)
    unobserved = not ready.passed and inventory.could_reach(gates.min_ready_fraction)
    if weight == 0:
        return GateReport(ready, None, (), inventory_unobserved=unobserved)
    requests = _requests_gate(gates, traffic.canary, to_id, requests_overdue)
    if not requests.passed:
        # A handful of answers says nothing about a rate or a p95: judge them later.
        return GateReport(ready, requests, (), requests_overdue, unobserved)
    traffic_gates = [_error_gate(gates, traffic, ids)]
    if gates.max_p95_latency_ratio is not None:
        traffic_gates.append(_latency_gate(gates, gates.max_p95_latency_ratio, traffic, from_id))
    return GateReport(ready, requests, tuple(traffic_gates), inventory_unobserved=unobserved)


def _requests_gate(
    gates: Gates, canary: TargetSummary, to_id: str, overdue: bool
) -> GateEvaluation:
    detail = f"{canary.requests} requests to {to_id} in this step"
    if overdue and canary.requests < gates.min_requests:
        detail += f", still short of {gates.min_requests} after minRequestsTimeout"
    return GateEvaluation(
        name=REQUESTS,
        passed=canary.requests >= gates.min_requests,
        value=canary.requests,
        threshold=gates.min_requests,
        detail=detail,
    )


def _error_gate(gates: Gates, traffic: Traffic, ids: tuple[str, str]) -> GateEvaluation:
    canary, baseline = traffic.canary, traffic.baseline
    detail = f"{canary.errors} errors in {canary.requests} requests to {ids[1]}" + (
        f"; {ids[0]}: {baseline.errors} in {baseline.requests}" if baseline.requests else ""
    )
    return GateEvaluation(
        name=ERROR_RATE,
        passed=canary.error_rate <= gates.max_error_rate,
        value=canary.error_rate,
        threshold=gates.max_error_rate,
        detail=detail,
    )


def _latency_gate(gates: Gates, max_ratio: float, traffic: Traffic, from_id: str) -> GateEvaluation:
    canary, baseline = traffic.canary.p95_seconds, traffic.baseline.p95_seconds
    # A p95 of a few baseline answers (the 90 % and 100 % steps send `from` little or nothing)
    # is noise: compare only against a baseline as large as the canary must be.
    if traffic.baseline.requests < max(gates.min_requests, 1) or not baseline or canary is None:
        return GateEvaluation(
            name=LATENCY_RATIO,
            passed=True,
            threshold=max_ratio,
            detail=f"not judged: {from_id} served {traffic.baseline.requests} requests in this "
            "step, too few to compare with",
        )
    ratio = canary / baseline
    return GateEvaluation(
        name=LATENCY_RATIO,
        passed=ratio <= max_ratio,
        value=ratio,
        threshold=max_ratio,
        detail=f"p95 {canary:.3f}s against {baseline:.3f}s for {from_id}",
    )
