"""The rollout state machine, driven through whole rollouts against a pretend cluster."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from controller.models import WeightedTarget
from controller.rollout import (
    HISTORY_LIMIT,
    EmitEvent,
    EnsureAdapterListed,
    EnsureAdapterRemoved,
    EventType,
    GateEvaluation,
    Phase,
    RolloutSpec,
    RolloutStatus,
    SetWeights,
    SpecError,
    advance,
    parse_spec,
    reject,
)
from tests.rollout.world import (
    FROM,
    FROM_SOURCE,
    START,
    TO,
    TO_SOURCE,
    World,
    drain,
    progress,
    roundtrip,
    run_healthy,
    spec,
    summary,
)

HEALTHY = summary(100, p95=0.2)
BASELINE = summary(900, p95=0.2)


def weights(*pairs: tuple[str, int]) -> SetWeights:
    return SetWeights(tuple(WeightedTarget(name, weight) for name, weight in pairs))


def gate(status: RolloutStatus, name: str) -> GateEvaluation:
    return next(g for g in status.last_gates if g.name == name)


def loaded(world: World, rollout: RolloutSpec) -> RolloutStatus:
    """Pending → Loading → the first step, `to` loaded on every pod."""
    status = world.tick(rollout, RolloutStatus()).status
    assert status.phase is Phase.LOADING
    world.pods_with_to = world.ready_pods
    world.wait(seconds=30)
    status = world.tick(rollout, status).status
    assert status.current_step == 0  # Progressing, or Paused on a manual step
    return status


def bake(world: World, rollout: RolloutSpec, status: RolloutStatus, **serve: Any) -> RolloutStatus:
    """Serve figures for the current step's window, wait out its pause, decide."""
    world.serve(**({"canary": HEALTHY, "baseline": BASELINE} | serve))
    world.wait(minutes=5)
    return world.tick(rollout, status).status


# --- stickiness --------------------------------------------------------------------------


def test_the_sticky_header_goes_with_every_weight_written() -> None:
    world = World()
    run_healthy(world, spec(stickiness={"header": "X-User-Id"}))
    written = [action for action in world.applied if isinstance(action, SetWeights)]
    assert written[0] == SetWeights(
        (WeightedTarget(FROM, 90), WeightedTarget(TO, 10)), "x-user-id"
    ), "users are pinned from the first weight that moves any of them"
    assert {action.sticky_header for action in written} == {"x-user-id"}
    assert world.sticky_header == "x-user-id"


def test_a_sticky_header_taken_off_the_model_is_put_back() -> None:
    world = World()
    rollout = spec(stickiness={"header": "x-user-id"})
    status = loaded(world, rollout)
    world.sticky_header = None  # someone edited the InferenceModel's annotations
    decision = world.tick(rollout, status)
    assert weights((FROM, 90), (TO, 10)).targets == world.targets
    assert [a for a in decision.actions if isinstance(a, SetWeights)] == [
        SetWeights(world.targets, "x-user-id")
    ]


def test_without_stickiness_a_header_set_by_hand_is_left_alone() -> None:
    world = World(sticky_header="x-team")
    run_healthy(world, spec())
    assert world.sticky_header == "x-team"
    assert all(a.sticky_header is None for a in world.applied if isinstance(a, SetWeights))


# --- the happy path ---------------------------------------------------------------------


def test_healthy_canary_walks_every_step_and_promotes() -> None:
    world = World()
    statuses = run_healthy(world, spec())
    final = statuses[-1]

    assert final.phase is Phase.PROMOTED
    assert world.applied == [
        EnsureAdapterListed(TO, TO_SOURCE),
        weights((FROM, 90), (TO, 10)),
        weights((FROM, 50), (TO, 50)),
        weights((TO, 100)),  # a 0 % target is left out: InferenceModel weights are 1..1e6
        EnsureAdapterRemoved(FROM),
    ]
    assert world.ensure_exist == {TO: TO_SOURCE}
    assert world.ensure_not_exist == {FROM}
    assert world.event_reasons() == [
        "LoadingAdapter",
        "StepStarted",
        "StepStarted",
        "StepStarted",
        "Promoted",
    ]
    assert [(h.phase, h.step) for h in final.history] == [
        (Phase.LOADING, -1),
        (Phase.PROGRESSING, 0),
        (Phase.PROGRESSING, 1),
        (Phase.PROGRESSING, 2),
        (Phase.PROMOTED, 2),
    ]
    steps = final.history[1:]
    assert all(b.at - a.at >= timedelta(minutes=5) for a, b in itertools.pairwise(steps))
    assert final.weights == {TO: 100}
    assert final.to_weight == 100
    assert all(g.passed for g in final.last_gates)


def test_each_step_records_weights_and_the_gate_numbers_that_passed_it() -> None:
    world = World()
    rollout = spec()
    status = loaded(world, rollout)
    assert status.weights == {FROM: 90, TO: 10}
    assert status.to_weight == 10

    status = bake(world, rollout, status)
    assert status.current_step == 1
    passed = world.events[-1]
    assert passed == EmitEvent(EventType.NORMAL, "StepStarted", passed.message)
    assert "step 1/3 (10%) passed its gates" in passed.message
    assert "step 2/3 (50%): 50% of food-review to food-review-2" in passed.message


def test_steps_not_ending_at_100_promote_after_the_last_one() -> None:
    world = World()
    rollout = spec(steps=[{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "5m"}])
    status = bake(world, rollout, loaded(world, rollout))
    status = bake(world, rollout, status)

    assert status.phase is Phase.PROMOTED
    assert world.weights() == {TO: 100}
    assert world.applied[-1] == weights((TO, 100))
    assert "all steps done" in status.message
    drain(world, rollout, status)
    assert world.applied[-1:] == [EnsureAdapterRemoved(FROM)]


def test_a_step_without_pause_passes_as_soon_as_its_gates_do() -> None:
    world = World()
    rollout = spec(steps=[{"weight": 10}, {"weight": 100}])
    status = loaded(world, rollout)
    world.serve(canary=summary(5))
    world.wait(seconds=10)
    status = world.tick(rollout, status).status
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)  # 5 of 20 requests

    world.serve(canary=HEALTHY, baseline=BASELINE)
    world.wait(seconds=10)
    assert world.tick(rollout, status).status.current_step == 1


def test_a_zero_percent_step_only_waits_for_the_inventory() -> None:
    world = World()
    rollout = spec(steps=[{"weight": 0, "pause": "1m"}, {"weight": 100}])
    status = loaded(world, rollout)
    assert status.weights == {FROM: 100, TO: 0}
    assert world.applied == [EnsureAdapterListed(TO, TO_SOURCE)]  # weights already as wanted

    world.wait(minutes=1)
    status = world.tick(rollout, status).status
    assert status.current_step == 1
    assert [g.name for g in status.last_gates] == ["minReadyFraction"]  # what passed step 1


# --- gates ------------------------------------------------------------------------------


def test_error_rate_failing_twice_aborts_and_returns_traffic_to_from() -> None:
    world = World()
    rollout = spec()
    status = loaded(world, rollout)
    first_window = status.step_started_at

    status = bake(world, rollout, status, canary=summary(100, errors=5))
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)
    assert status.consecutive_gate_failures == 1
    assert status.step_started_at == world.now != first_window  # the step is watched anew
    errors = gate(status, "maxErrorRate")
    assert (errors.passed, errors.value, errors.threshold) == (False, 0.05, 0.01)
    assert "5 errors in 100 requests to food-review-2" in errors.detail
    assert world.events[-1].type is EventType.WARNING
    assert world.events[-1].reason == "GateFailed"
    assert world.weights() == {FROM: 90, TO: 10}

    decision = world.tick(rollout, status)  # same window, no figures yet: nothing happens
    assert decision.actions == ()
    status = bake(world, rollout, status, canary=summary(100, errors=3))

    assert status.phase is Phase.ABORTED
    assert world.weights() == {FROM: 100}
    assert world.applied[-1] == weights((FROM, 100))
    assert world.events[-1].reason == "GatesFailed"
    assert "failed its gates (2 of 2)" in status.message
    assert status.weights == {FROM: 100}
    assert status.to_weight == 0
    drain(world, rollout, status)  # requests already routed to `to` finish first
    assert world.ensure_exist == {FROM: FROM_SOURCE}
    assert world.ensure_not_exist == {TO}
    assert world.applied[-1:] == [EnsureAdapterRemoved(TO)]


def test_a_passing_check_resets_the_failure_count() -> None:
    world = World()
    rollout = spec()
    status = bake(world, rollout, loaded(world, rollout), canary=summary(100, errors=5))
    assert status.consecutive_gate_failures == 1
    status = bake(world, rollout, status)
    assert (status.current_step, status.consecutive_gate_failures) == (1, 0)
    status = bake(world, rollout, status, canary=summary(100, errors=5))
    assert (status.phase, status.consecutive_gate_failures) == (Phase.PROGRESSING, 1)


def test_bad_errors_fail_without_waiting_out_the_pause() -> None:
    world = World()
    rollout = spec(steps=[{"weight": 10, "pause": "1h"}, {"weight": 100}])
    status = loaded(world, rollout)
    world.serve(canary=summary(50, errors=10), baseline=BASELINE)
    world.wait(minutes=2)
    status = world.tick(rollout, status).status
    assert status.consecutive_gate_failures == 1
    assert world.events[-1].reason == "GateFailed"


def test_good_figures_do_not_cut_the_pause_short() -> None:
    world = World()
    rollout = spec()
    status = loaded(world, rollout)
    world.serve(canary=HEALTHY, baseline=BASELINE)
    world.wait(minutes=4, seconds=59)
    status = world.tick(rollout, status).status
    assert status.current_step == 0
    assert "holding until 2026-05-01T09:05:30Z" in status.message
    assert all(g.passed for g in status.last_gates)  # measured, shown, not yet acted on


@pytest.mark.parametrize(
    ("canary_p95", "ratio_limit", "failed"),
    [(0.5, 1.5, True), (0.25, 1.5, False), (0.5, 3.0, False), (0.5, None, False)],
)
def test_p95_latency_ratio_gate(canary_p95: float, ratio_limit: float | None, failed: bool) -> None:
    world = World()
    rollout = spec(gates={"maxP95LatencyRatio": ratio_limit})
    status = bake(world, rollout, loaded(world, rollout), canary=summary(100, p95=canary_p95))
    assert (status.consecutive_gate_failures == 1) is failed
    assert (status.current_step == 0) is failed
    if ratio_limit is None:
        assert "maxP95LatencyRatio" not in [g.name for g in status.last_gates]
    elif failed:
        latency = gate(status, "maxP95LatencyRatio")
        assert latency.value == pytest.approx(2.5)
        assert latency.detail == "p95 0.500s against 0.200s for food-review-1"


def test_too_few_requests_waits_then_fails_after_the_timeout() -> None:
    world = World()
    rollout = spec(gates={"minRequests": 20, "minRequestsTimeout": "30m"})
    status = bake(world, rollout, loaded(world, rollout), canary=summary(5, errors=5))

    assert (status.phase, status.current_step, status.consecutive_gate_failures) == (
        Phase.PROGRESSING,
        0,
        0,
    )
    requests = gate(status, "minRequests")
    assert (requests.passed, requests.value, requests.threshold) == (False, 5, 20)
    assert "maxErrorRate" not in [g.name for g in status.last_gates]  # 5 answers judge nothing
    assert "waiting for 20 requests until 2026-05-01T09:35:30Z" in status.message

    world.wait(minutes=29)
    status = world.tick(rollout, status).status
    assert status.consecutive_gate_failures == 0
    world.wait(minutes=1)
    status = world.tick(rollout, status).status
    assert status.consecutive_gate_failures == 1
    assert "still short of 20 after minRequestsTimeout" in status.message


def test_without_a_requests_timeout_a_quiet_step_waits_for_ever() -> None:
    world = World()
    rollout = spec(gates={"minRequestsTimeout": None})
    status = bake(world, rollout, loaded(world, rollout), canary=summary(3))
    world.wait(hours=12)
    status = world.tick(rollout, status).status
    assert (status.phase, status.current_step, status.consecutive_gate_failures) == (
        Phase.PROGRESSING,
        0,
        0,
    )
    assert "waiting for 20 requests" in status.message
    assert " until " not in status.message


def test_inventory_dropping_during_a_step_is_a_gate_failure() -> None:
    world = World()
    rollout = spec()
    status = loaded(world, rollout)
    world.pods_with_to = 2
    status = bake(world, rollout, status)
    ready = gate(status, "minReadyFraction")
    assert not ready.passed
    assert ready.value == pytest.approx(2 / 3)
    assert status.consecutive_gate_failures == 1


# --- Loading ----------------------------------------------------------------------------


def test_loading_waits_for_the_ready_fraction_with_to_loaded() -> None:
    world = World()
    rollout = spec(gates={"minReadyFraction": 1.0})
    decision = world.tick(rollout, RolloutStatus())
    assert decision.actions[0] == EnsureAdapterListed(TO, TO_SOURCE)
    status = decision.status
    assert status.phase is Phase.LOADING
    assert world.weights() == {FROM: 100}  # no traffic moves before `to` is loaded

    world.pods_with_to = 2
    world.wait(minutes=1)
    status = world.tick(rollout, status).status
    assert status.phase is Phase.LOADING
    assert "2 of 3 ready pods have food-review-2 loaded" in status.message
    assert "giving up at 2026-05-01T09:10:00Z" in status.message
    assert gate(status, "minReadyFraction").value == pytest.approx(2 / 3)

    world.pods_with_to = 3
    world.wait(minutes=1)
    status = world.tick(rollout, status).status
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)


def test_a_lower_ready_fraction_starts_with_some_pods_still_loading() -> None:
    world = World(pods_with_to=2)
    status = world.tick(spec(gates={"minReadyFraction": 0.6}), RolloutStatus()).status
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)
    assert world.event_reasons() == ["LoadingAdapter", "StepStarted"]
    assert status.step_started_at == START + timedelta(seconds=1)  # a new window, not Loading's


def test_no_ready_pods_never_counts_as_loaded() -> None:
    world = World(ready_pods=0)
    status = world.tick(spec(), RolloutStatus()).status
    assert status.phase is Phase.LOADING
    assert gate(status, "minReadyFraction").detail == "no ready pods in the pool"


def test_loading_timeout_aborts_and_says_why() -> None:
    world = World(pods_with_to=1, load_problems=("pod-b: LoRA rank 16 > max_lora_rank 8",))
    rollout = spec()
    status = world.tick(rollout, RolloutStatus()).status
    world.wait(minutes=9, seconds=59)
    assert world.tick(rollout, status).status.phase is Phase.LOADING
    world.wait(seconds=1)
    decision = world.tick(rollout, status)

    assert decision.status.phase is Phase.ABORTED
    assert decision.actions[:-1] == (EnsureAdapterRemoved(TO),)  # the weights never moved
    event = decision.actions[-1]
    assert isinstance(event, EmitEvent)
    assert (event.type, event.reason) == (EventType.WARNING, "LoadTimeout")
    assert "1 of 3 ready pods have food-review-2 loaded" in event.message
    assert "LoRA rank 16 > max_lora_rank 8" in event.message


# --- commands ---------------------------------------------------------------------------


def test_pause_holds_the_step_and_resume_continues_it_without_repeating() -> None:
    world = World()
    status = loaded(world, spec())
    step_start = status.step_started_at
    world.wait(minutes=2)
    status = world.tick(spec(paused=True), status).status
    assert (status.phase, status.current_step) == (Phase.PAUSED, 0)
    assert world.events[-1].reason == "Paused"

    world.serve(canary=summary(100, errors=50), baseline=BASELINE)
    world.wait(hours=1)
    status = world.tick(spec(paused=True), status).status
    assert status.phase is Phase.PAUSED  # a person is in charge: figures shown, not acted on
    assert not gate(status, "maxErrorRate").passed
    assert world.weights() == {FROM: 90, TO: 10}

    world.serve(canary=HEALTHY, baseline=BASELINE)
    status = world.tick(spec(), status).status
    assert world.event_reasons()[-2:] == ["Resumed", "StepStarted"]
    assert status.current_step == 1
    assert [h.step for h in status.history if h.reason == "StepStarted"] == [0, 1]
    assert world.applied.count(weights((FROM, 90), (TO, 10))) == 1
    assert world.observations[-1][0].step_started_at == step_start  # the same window resumed


def test_pause_before_the_first_step_keeps_loading() -> None:
    world = World()
    status = world.tick(spec(paused=True), RolloutStatus()).status
    assert status.phase is Phase.LOADING
    world.pods_with_to = 3
    status = world.tick(spec(paused=True), status).status
    assert (status.phase, status.current_step) == (Phase.PAUSED, -1)
    assert status.message == "paused by spec.paused before the first step"
    assert world.weights() == {FROM: 100}

    status = world.tick(spec(), status).status
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)
    assert "resumed; step 1/3 (10%)" in status.history[-1].message


def test_manual_step_waits_for_approval_of_that_step() -> None:
    steps = [
        {"weight": 10, "pause": "5m", "manual": True},
        {"weight": 50, "manual": True},
        {"weight": 100},
    ]
    world = World()
    status = loaded(world, spec(steps=steps))
    assert (status.phase, status.current_step) == (Phase.PAUSED, 0)
    assert world.event_reasons()[-2:] == ["StepStarted", "AwaitingApproval"]
    assert "spec.approvedStep: 0" in status.message
    assert world.weights() == {FROM: 90, TO: 10}  # held at the step's weight

    status = bake(world, spec(steps=steps), status)
    assert status.phase is Phase.PAUSED

    world.serve(canary=HEALTHY, baseline=BASELINE)
    status = world.tick(spec(steps=steps, approvedStep=0), status).status
    assert (status.phase, status.current_step) == (Phase.PAUSED, 1)  # approving 0 is not 1
    assert world.event_reasons()[-3:] == ["Resumed", "StepStarted", "AwaitingApproval"]

    world.serve(canary=HEALTHY, baseline=BASELINE)
    world.wait(seconds=5)
    status = world.tick(spec(steps=steps, approvedStep=1), status).status
    assert status.current_step == 2


def test_approval_does_not_skip_the_pause_or_the_gates() -> None:
    steps = [{"weight": 10, "pause": "5m", "manual": True}, {"weight": 100}]
    world = World()
    status = loaded(world, spec(steps=steps))
    world.serve(canary=summary(100, errors=10), baseline=BASELINE)
    world.wait(minutes=1)
    status = world.tick(spec(steps=steps, approvedStep=0), status).status
    assert (status.phase, status.current_step) == (Phase.PROGRESSING, 0)
    assert status.consecutive_gate_failures == 1


@pytest.mark.parametrize("paused", [False, True])
def test_promote_skips_to_100_percent_now(paused: bool) -> None:
    world = World()
    status = loaded(world, spec())
    if paused:
        status = world.tick(spec(paused=True), status).status
    decision = world.tick(spec(promote=True, paused=paused), status)

    assert decision.status.phase is Phase.PROMOTED
    assert decision.actions[0] == weights((TO, 100))
    assert "promoted by spec.promote at step 1/3 (10%)" in decision.status.message
    drain(world, spec(promote=True, paused=paused), decision.status)
    assert world.applied[-1] == EnsureAdapterRemoved(FROM)


def test_promote_during_loading_waits_for_the_adapter_to_load() -> None:
    world = World()
    status = world.tick(spec(promote=True), RolloutStatus()).status
    assert status.phase is Phase.LOADING
    world.pods_with_to = 3
    status = world.tick(spec(promote=True), status).status
    assert status.phase is Phase.PROMOTED
    drain(world, spec(promote=True), status)
    assert world.applied == [
        EnsureAdapterListed(TO, TO_SOURCE),
        weights((TO, 100)),
        EnsureAdapterRemoved(FROM),
    ]


@pytest.mark.parametrize(("keep", "removed"), [(False, [EnsureAdapterRemoved(TO)]), (True, [])])
def test_abort_returns_traffic_to_from(keep: bool, removed: list[EnsureAdapterRemoved]) -> None:
    world = World()
    status = bake(world, spec(), loaded(world, spec()))
    assert status.current_step == 1
    applied = len(world.applied)
    decision = world.tick(spec(abort=True, keepOnAbort=keep), status)

    assert decision.status.phase is Phase.ABORTED
    if not keep:
        drain(world, spec(abort=True), decision.status)
    assert world.applied[applied:] == [weights((FROM, 100)), *removed]
    assert (TO in world.ensure_exist) is keep
    event = decision.actions[-1]
    assert isinstance(event, EmitEvent)
    assert (event.type, event.reason) == (EventType.WARNING, "AbortRequested")


@pytest.mark.parametrize(
    "phase_of",
    [
        lambda world: RolloutStatus(),
        lambda world: world.tick(spec(), RolloutStatus()).status,
        lambda world: world.tick(spec(paused=True), loaded(world, spec())).status,
    ],
    ids=["Pending", "Loading", "Paused"],
)
def test_abort_works_from_every_live_phase(phase_of: Callable[[World], RolloutStatus]) -> None:
    world = World()
    status = phase_of(world)
    status = world.tick(spec(abort=True, paused=True), status).status
    assert status.phase is Phase.ABORTED
    assert world.weights() == {FROM: 100}
    if status.unlist_after is not None:  # `to` had traffic (Paused at 10 %): drained first
        assert TO in world.ensure_exist
        drain(world, spec(abort=True, paused=True), status)
    assert TO not in world.ensure_exist


def test_the_adapter_leaving_waits_for_its_drain_and_for_the_weights_to_be_seen() -> None:
    world = World()
    rollout = spec(steps=[{"weight": 50}], drain="30s")
    status = world.tick(rollout, loaded(world, rollout)).status  # no figures yet: holds
    world.serve(canary=HEALTHY, baseline=BASELINE)
    world.wait(seconds=5)
    status = world.tick(rollout, status).status
    assert status.phase is Phase.PROMOTED
    assert status.unlist_after == world.now + timedelta(seconds=30)
    assert "food-review-1 moves to ensureNotExist once drained (30s)" in status.message

    world.wait(seconds=29)
    assert world.tick(rollout, status).actions == ()
    assert FROM in world.ensure_exist  # requests routed to it before still finish

    world.wait(seconds=1)
    world.targets = (WeightedTarget(FROM, 100),)  # someone put the old weights back
    decision = world.tick(rollout, status)
    assert decision.actions == (weights((TO, 100)),)
    assert decision.status.unlist_after == world.now + timedelta(seconds=30)  # drains anew
    world.wait(seconds=30)
    decision = world.tick(rollout, decision.status)
    assert decision.actions == (EnsureAdapterRemoved(FROM),)
    assert decision.status.unlist_after is None
    assert decision.status.history == status.history  # no transition, nor event

    world.ensure_exist[FROM] = FROM_SOURCE  # listed again by hand, later: left alone
    world.wait(hours=1)
    assert world.tick(rollout, decision.status).actions == ()


def test_an_abort_before_any_traffic_unlists_at_once() -> None:
    world = World()
    status = world.tick(spec(), RolloutStatus()).status  # Loading
    decision = world.tick(spec(abort=True), status)
    assert decision.status.unlist_after is None
    assert decision.actions[0] == EnsureAdapterRemoved(TO)


def test_abort_wins_over_promote() -> None:
    world = World()
    status = world.tick(spec(abort=True, promote=True), loaded(world, spec())).status
    assert status.phase is Phase.ABORTED


# --- terminal phases, restarts, idempotence ---------------------------------------------


def test_terminal_phases_do_nothing_further() -> None:
    world = World()
    final = run_healthy(world, spec())[-1]
    world.targets = (WeightedTarget("someone-else", 100),)
    world.wait(hours=1)
    for commanded in (spec(), spec(abort=True), spec(promote=True)):
        decision = advance(commanded, final, world.observe(final))
        assert decision == type(decision)(final, ())


def test_every_decision_survives_a_restart_that_lost_the_status_write() -> None:
    """Actions applied, status not written: the old status decides the same again."""
    world = World()
    rollout = spec()
    status = RolloutStatus()
    while status.phase is not Phase.PROMOTED:
        observation = world.observe(status)
        decision = advance(rollout, status, observation)
        world.apply(decision)
        retried = advance(rollout, roundtrip(status), world.observe(status))
        assert retried.status == decision.status
        assert all(isinstance(action, EmitEvent) for action in retried.actions)
        status = decision.status
        world.observe(status)  # the next window
        world.pods_with_to = world.ready_pods
        world.serve(canary=HEALTHY, baseline=BASELINE)
        world.wait(minutes=5)


def test_same_inputs_after_settling_give_the_same_status() -> None:
    world = World()
    rollout = spec()
    status = loaded(world, rollout)
    world.serve(canary=HEALTHY, baseline=BASELINE)
    world.wait(minutes=1)
    observation = world.observe(status)
    first = advance(rollout, status, observation)
    assert first.actions == ()
    assert advance(rollout, first.status, observation) == first


def test_status_records_the_observed_generation() -> None:
    world = World(generation=7)
    assert world.tick(spec(), RolloutStatus()).status.observed_generation == 7


def test_history_keeps_the_last_entries_only() -> None:
    world = World()
    rollout = spec(
        steps=[{"weight": 10}, {"weight": 100}],
        gates={"maxConsecutiveFailures": 100, "minRequests": 1},
    )
    status = loaded(world, rollout)
    for _ in range(HISTORY_LIMIT + 5):
        world.serve(canary=summary(10, errors=10))
        world.wait(seconds=1)
        status = world.tick(rollout, status).status
    assert len(status.history) == HISTORY_LIMIT
    assert status.history[-1].reason == "GateFailed"
    assert status.consecutive_gate_failures == HISTORY_LIMIT + 5


def test_observation_time_must_carry_a_timezone() -> None:
    world = World()
    world.now = datetime(2026, 5, 1, 9, 0)  # naive: the mistake under test
    with pytest.raises(ValueError, match="timezone"):
        advance(spec(), RolloutStatus(), world.observe(RolloutStatus()))


# --- invalid specs ----------------------------------------------------------------------


def _other_pool(world: World) -> None:
    world.model_pool = "another-pool"


def _no_model(world: World) -> None:
    world.model_pool = None


def _no_pool(world: World) -> None:
    world.pool_exists = False


def _no_config_map(world: World) -> None:
    world.config_map_exists = False


def _other_target(world: World) -> None:
    world.targets = (WeightedTarget("food-review-0", 100),)


def _already_split(world: World) -> None:
    world.targets = (WeightedTarget(FROM, 90), WeightedTarget(TO, 10))


def _to_listed_elsewhere(world: World) -> None:
    world.ensure_exist[TO] = "/adapters/other-weights"


def _as_is(world: World) -> None:
    pass


@pytest.mark.parametrize(
    ("overrides", "setup", "fragment"),
    [
        ({"to": {"id": FROM, "source": FROM_SOURCE}}, _as_is, "two different adapters"),
        (
            {"steps": [{"weight": 50}, {"weight": 10}]},
            _as_is,
            "spec.steps[1].weight 10 is below the step before it (50)",
        ),
        ({"to": {"id": "team/x", "source": TO_SOURCE}}, _as_is, "spec.to.id: id 'team/x'"),
        ({"to": {"id": TO, "source": "s3://b/x"}}, _as_is, "s3:// sources are not supported"),
        ({}, _no_model, "no InferenceModel serves model 'food-review'"),
        ({}, _other_pool, "belongs to pool 'another-pool'"),
        ({}, _no_pool, "InferencePool 'vllm-llama3-8b-instruct' not found"),
        ({}, _no_config_map, "ConfigMap 'vllm-llama3-8b-instruct-adapters'"),
        ({}, _other_target, "routes to food-review-0 (weight 100)"),
        ({}, _already_split, "food-review-1 (weight 90), food-review-2 (weight 10)"),
        ({}, _to_listed_elsewhere, "one id must always mean the same weights"),
    ],
)
def test_invalid_rollouts_fail_with_the_problem_and_change_nothing(
    overrides: dict[str, Any], setup: Callable[[World], None], fragment: str
) -> None:
    world = World()
    setup(world)
    before = (dict(world.ensure_exist), set(world.ensure_not_exist), world.targets)
    decision = world.tick(spec(**overrides), RolloutStatus())

    assert decision.status.phase is Phase.FAILED
    assert fragment in decision.status.message
    assert "nothing was changed" in decision.status.message
    assert decision.actions == (
        EmitEvent(EventType.WARNING, "InvalidSpec", decision.status.message),
    )
    assert (world.ensure_exist, world.ensure_not_exist, world.targets) == before

    world.__init__()  # type: ignore[misc]  # a healthy cluster does not revive a failed rollout
    assert world.tick(spec(**overrides), decision.status).actions == ()


def test_every_problem_is_named_at_once() -> None:
    world = World(pool_exists=False, config_map_exists=False)
    message = world.tick(spec(), RolloutStatus()).status.message
    assert "InferencePool" in message
    assert "ConfigMap" in message


def test_a_spec_that_does_not_parse_fails_a_new_rollout() -> None:
    world = World()
    with pytest.raises(SpecError) as caught:
        parse_spec({"pool": "p", "steps": [{"weight": 10, "pause": "5 min"}]})
    decision = reject(RolloutStatus(), caught.value.problems, world.observe(RolloutStatus()))
    assert decision.status.phase is Phase.FAILED
    assert "spec.steps[0].pause: '5 min' is not a duration" in decision.status.message
    assert [type(a) for a in decision.actions] == [EmitEvent]


def test_a_spec_broken_mid_rollout_holds_without_touching_anything() -> None:
    world = World()
    status = bake(world, spec(), loaded(world, spec()))
    held = reject(status, ["spec.gates.maxErrorRate: bad"], world.observe(status))
    assert progress(held.status) == progress(status)
    assert held.actions == ()
    assert "holds where it is: spec.gates.maxErrorRate: bad" in held.status.message

    fewer_steps = spec(steps=[{"weight": 10}])
    held = advance(fewer_steps, status, world.observe(status))
    assert progress(held.status) == progress(status)
    assert held.actions == ()
    assert "status.currentStep 1 but spec.steps has 1" in held.status.message

    final = run_healthy(World(), spec())[-1]
    assert reject(final, ["x"], world.observe(final)) == type(held)(final, ())
