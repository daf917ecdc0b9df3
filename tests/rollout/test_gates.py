"""Gate arithmetic: every verdict comes with the numbers behind it."""

from __future__ import annotations

import pytest

from controller.rollout import Gates, Inventory, Traffic, Verdict, evaluate_step
from controller.stats import TargetSummary
from tests.rollout.world import NO_TRAFFIC, START, summary

IDS = ("v1", "v2")
ALL_LOADED = Inventory(ready_pods=4, pods_with_to=4)


def judge(
    canary: TargetSummary,
    baseline: TargetSummary = NO_TRAFFIC,
    inventory: Inventory = ALL_LOADED,
    weight: int = 10,
    overdue: bool = False,
    **gates: float | None,
) -> tuple[Verdict, dict[str, tuple[bool, float | None]]]:
    report = evaluate_step(
        Gates.model_validate(gates),
        weight,
        inventory,
        Traffic(since=START, baseline=baseline, canary=canary),
        IDS,
        overdue,
    )
    return report.verdict, {g.name: (g.passed, g.value) for g in report.evaluations}


def test_healthy_step_passes_with_every_number() -> None:
    verdict, gates = judge(summary(100, errors=1, p95=0.3), summary(900, p95=0.25))
    assert verdict is Verdict.PASS
    assert gates == {
        "minReadyFraction": (True, 1.0),
        "minRequests": (True, 100),
        "maxErrorRate": (True, 0.01),
        "maxP95LatencyRatio": (True, pytest.approx(1.2)),
    }


@pytest.mark.parametrize(
    ("ready", "loaded", "minimum", "passed", "fraction"),
    [
        (4, 4, 1.0, True, 1.0),
        (4, 3, 1.0, False, 0.75),
        (4, 3, 0.75, True, 0.75),
        (0, 0, 1.0, False, 0),
    ],
)
def test_inventory_fraction(
    ready: int, loaded: int, minimum: float, passed: bool, fraction: float
) -> None:
    verdict, gates = judge(
        summary(100), inventory=Inventory(ready, loaded), minReadyFraction=minimum
    )
    assert gates["minReadyFraction"] == (passed, fraction)
    assert (verdict is Verdict.PASS) is passed


def test_too_few_requests_waits_and_judges_nothing_else() -> None:
    verdict, gates = judge(summary(19, errors=19), minRequests=20)
    assert verdict is Verdict.WAIT
    assert gates == {"minReadyFraction": (True, 1.0), "minRequests": (False, 19)}


def test_too_few_requests_after_the_timeout_fail() -> None:
    verdict, gates = judge(summary(3), overdue=True)
    assert verdict is Verdict.FAIL
    assert gates["minRequests"] == (False, 3)


def test_inventory_fails_even_without_requests() -> None:
    verdict, _ = judge(NO_TRAFFIC, inventory=Inventory(4, 1))
    assert verdict is Verdict.FAIL


def test_error_rate_above_the_limit_fails() -> None:
    verdict, gates = judge(summary(200, errors=3), maxErrorRate=0.01)
    assert verdict is Verdict.FAIL
    assert gates["maxErrorRate"] == (False, 0.015)


def test_latency_ratio_needs_a_baseline_as_large_as_the_canary_minimum() -> None:
    verdict, gates = judge(summary(100, p95=9.0), summary(19, p95=0.1), minRequests=20)
    assert verdict is Verdict.PASS
    assert gates["maxP95LatencyRatio"] == (True, None)


def test_latency_ratio_above_the_limit_fails() -> None:
    verdict, gates = judge(summary(100, p95=0.4), summary(100, p95=0.2), maxP95LatencyRatio=1.5)
    assert verdict is Verdict.FAIL
    assert gates["maxP95LatencyRatio"] == (False, 2.0)


def test_zero_percent_step_has_only_the_inventory_gate() -> None:
    verdict, gates = judge(NO_TRAFFIC, weight=0)
    assert verdict is Verdict.PASS
    assert list(gates) == ["minReadyFraction"]


def test_failures_list_each_failed_gate_with_its_detail() -> None:
    report = evaluate_step(
        Gates(),
        10,
        Inventory(4, 3, problems=("pod-c: download failed",)),
        Traffic(START, summary(100, p95=0.1), summary(100, errors=50, p95=0.5)),
        IDS,
    )
    assert report.failures() == (
        "minReadyFraction: 3 of 4 ready pods have v2 loaded; pod-c: download failed; "
        "maxErrorRate: 50 errors in 100 requests to v2; v1: 0 in 100; "
        "maxP95LatencyRatio: p95 0.500s against 0.100s for v1"
    )


def test_pods_not_observed_yet_make_the_inventory_wait_not_fail() -> None:
    # A restarted controller: one pod scraped (it has `to`), three not yet.
    verdict, gates = judge(summary(100), inventory=Inventory(4, 1, unobserved=3))
    assert verdict is Verdict.WAIT
    assert gates["minReadyFraction"] == (False, 0.25)


def test_observed_pods_without_the_adapter_still_fail_beside_unobserved_ones() -> None:
    # Two observed pods lack `to`: even if the unobserved one has it, 2 of 4 is too few.
    verdict, _ = judge(summary(100), inventory=Inventory(4, 1, unobserved=1))
    assert verdict is Verdict.FAIL


def test_waiting_for_observations_still_fails_on_bad_traffic() -> None:
    verdict, _ = judge(summary(200, errors=20), inventory=Inventory(4, 0, unobserved=4))
    assert verdict is Verdict.FAIL
