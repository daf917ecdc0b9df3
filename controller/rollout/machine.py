"""The rollout state machine: (spec, status, what the cluster looks like now) → decision.

Pure: no clock, no API calls. The caller observes the world, calls `advance`,
applies the decision's actions in order, and writes the decision's status only
once every action succeeded. If an action fails, the status is not written and
the next call decides the same thing again: actions are idempotent, so nothing
is done twice in effect, and a step is entered exactly when the status says so.

    Pending ──invalid──► Failed                       (nothing was changed)
       │ valid (spec.abort: ► Aborted)
       ▼
    Loading: `to` listed in ensureExist ──loadTimeout──► Aborted
       │ ready pods with `to` ≥ minReadyFraction (spec.promote: ► Promoted)
       ▼
    Progressing step i: weights set; after the pause the gates judge the window
       │  ├─ pass: step i+1, or ► Promoted after the last step (100 % implied)
       │  ├─ too few requests: wait (a failure after minRequestsTimeout)
       │  ├─ fail: window restarts; maxConsecutiveFailures in a row ► Aborted
       │  └─ error rate or latency failing during the pause: a failure at once
       ▲▼ spec.paused, or a manual step not yet approved (spec.approvedStep < i)
    Paused: weights held, gates measured but not acted on; resuming continues step i
    spec.abort from any live phase ► Aborted: all traffic to `from`, `to` unlisted
    spec.promote once `to` is loaded ► Promoted: all traffic to `to`, `from` unlisted

Every transition adds a history entry and an Event. The actions are not a log of
transitions but the difference between the world the status implies and the
world observed, so calling `advance` again after applying them yields none, and
a terminal phase, once its work is done, asks for nothing even if the world drifts.

The adapter leaving the traffic (`from` on promotion, `to` on an abort after it had
some) is unlisted only once it is drained: `spec.drain` after the InferenceModel is
seen without it (status.unlistAfter).
Unlisting at once would unload it under requests already routed to it, and under
pickers that have not seen the new weights yet: clients would get 404s.

`from` is required: the CLI fills it from the InferenceModel, and a model's first
adapter needs no canary (there is nothing to compare it with). Weights are the
percent of the model's traffic on `to`; `from` has the rest, and a target at 0 %
is left out of the InferenceModel, whose weights are 1..1e6.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from controller.models import WeightedTarget
from controller.rollout.gates import (
    GateReport,
    Inventory,
    Traffic,
    Verdict,
    evaluate_step,
    inventory_gate,
)
from controller.rollout.spec import (
    HISTORY_LIMIT,
    TERMINAL_PHASES,
    AdapterRef,
    HistoryEntry,
    Phase,
    RolloutSpec,
    RolloutStatus,
    parse_duration,
    validate_spec,
)
from sidecar.config import DesiredState
from sidecar.sources import parse_source

# Enough for the longest chain in one call (Pending → Loading → step 0 → Paused); more is a bug.
_MAX_TRANSITIONS = 8


@dataclass(frozen=True)
class ModelView:
    """The InferenceModel (or Rewrite rule) that routes spec.model."""

    pool: str
    targets: tuple[WeightedTarget, ...]
    """Effective targets in order; an object without targets routes to its own model name
    (weight 100)."""
    sticky_header: str | None = None
    """The header the picker hashes for this model (the object's annotation)."""


@dataclass(frozen=True)
class Observation:
    now: datetime
    model: ModelView | None
    """None: no InferenceModel in the namespace serves spec.model."""
    pool_exists: bool
    config_map: DesiredState | None
    """The parsed adapter config under spec.configMap.key; None when missing or unusable."""
    inventory: Inventory
    config_map_error: str | None = None
    """Why config_map is None when the ConfigMap exists: key missing, config rejected."""
    traffic: Traffic | None = None
    """Figures since status.stepStartedAt; None (or another `since`) until measured."""
    generation: int = 0
    """metadata.generation of the AdapterRollout, echoed as status.observedGeneration."""


@dataclass(frozen=True)
class EnsureAdapterListed:
    """`id` in ensureExist with `source`, and not in ensureNotExist."""

    id: str
    source: str


@dataclass(frozen=True)
class EnsureAdapterRemoved:
    """`id` out of ensureExist and into ensureNotExist, so the sidecars unload it."""

    id: str


@dataclass(frozen=True)
class SetWeights:
    """The model's targets exactly these, in this order (`from` first): with sticky
    routing each target owns a consecutive range, so users only ever move forward."""

    targets: tuple[WeightedTarget, ...]
    sticky_header: str | None = None
    """spec.stickiness.header, written with the weights so no user is moved by them unpinned."""


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class EmitEvent:
    type: EventType
    reason: str
    message: str


Action = EnsureAdapterListed | SetWeights | EnsureAdapterRemoved | EmitEvent


@dataclass(frozen=True)
class Decision:
    status: RolloutStatus
    actions: tuple[Action, ...]
    """Apply in order (load before traffic, traffic before unload), then write status."""


@dataclass(frozen=True)
class _Outcome:
    status: RolloutStatus
    event: EmitEvent | None  # None: the rollout stays where it is (figures may be fresher)


def advance(spec: RolloutSpec, status: RolloutStatus, observation: Observation) -> Decision:
    now = _whole_seconds(observation.now)
    if status.phase not in TERMINAL_PHASES and status.phase is not Phase.PENDING:
        problems = _cannot_continue(spec, status)
        if problems:
            return _hold_on_bad_spec(status, problems, observation.generation)
    state: RolloutStatus = status
    events: list[EmitEvent] = []
    for _ in range(_MAX_TRANSITIONS):
        outcome = _next(spec, state, observation, now)
        state = outcome.status
        if outcome.event is None:
            break
        events.append(outcome.event)
    else:
        raise AssertionError(f"rollout did not settle after {_MAX_TRANSITIONS} transitions")
    state = state.model_copy(update={"observed_generation": observation.generation})
    # A terminal phase reached earlier is left alone (the world may have moved on since),
    # once the adapter it unlists is drained and gone.
    draining = state.unlist_after is not None
    settled = state.phase in TERMINAL_PHASES and not events and not draining
    world = () if settled else _world_actions(spec, state, observation, now)
    if draining:
        unlist_after = _unlist_after(spec, state, observation, now)
        state = state.model_copy(update={"unlist_after": unlist_after})
    return Decision(state, (*world, *events))


def reject(status: RolloutStatus, problems: list[str], observation: Observation) -> Decision:
    """For a spec that does not parse (see `parse_spec`): fail a rollout that has not
    started; hold one that has, touching nothing, until the spec is fixed."""
    if status.phase is not Phase.PENDING:
        if status.phase in TERMINAL_PHASES:
            return Decision(status, ())
        return _hold_on_bad_spec(status, problems, observation.generation)
    outcome = _fail(status, problems, _whole_seconds(observation.now))
    failed = outcome.status.model_copy(update={"observed_generation": observation.generation})
    return Decision(failed, () if outcome.event is None else (outcome.event,))


def _whole_seconds(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("Observation.now must carry a timezone")
    # Kubernetes keeps times to the second; so does the status, so it round-trips exactly.
    return now.astimezone(UTC).replace(microsecond=0)


def _cannot_continue(spec: RolloutSpec, status: RolloutStatus) -> list[str]:
    # The CRD makes the spec immutable but for its commands and gates; an API server without
    # the CRD's rules, or a hand-edited status, can still break what a started rollout relies on.
    problems = validate_spec(spec)
    if status.current_step >= len(spec.steps):
        problems.append(
            f"status.currentStep {status.current_step} but spec.steps has {len(spec.steps)}"
        )
    if status.step_started_at is None:
        problems.append(f"status.stepStartedAt is missing in phase {status.phase}")
    return problems


def _hold_on_bad_spec(status: RolloutStatus, problems: list[str], generation: int) -> Decision:
    message = (
        "the spec was changed into one the rollout cannot follow, so it holds where it is: "
        + "; ".join(problems)
    )
    held = status.model_copy(update={"message": message, "observed_generation": generation})
    return Decision(held, ())


def _next(spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime) -> _Outcome:
    if status.phase in TERMINAL_PHASES:
        return _Outcome(status, None)
    if status.phase is Phase.PENDING:
        return _start(spec, status, obs, now)
    if spec.abort:
        return _abort(spec, status, now, "AbortRequested", "aborted by spec.abort")
    if status.phase is Phase.LOADING:
        return _loading(spec, status, obs, now)
    if spec.promote:
        return _promote(spec, status, now, f"promoted by spec.promote {_at(spec, status)}")
    return _progress(spec, status, obs, now)


# --- Pending ---------------------------------------------------------------------------


def _start(spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime) -> _Outcome:
    problems = validate_spec(spec) + _world_problems(spec, obs)
    if problems:
        return _fail(status, problems, now)
    if spec.abort:
        return _abort(spec, status, now, "AbortRequested", "aborted by spec.abort before start")
    gates = spec.gates
    return _transition(
        status,
        now,
        Phase.LOADING,
        "LoadingAdapter",
        f"listing {spec.to.id} in ConfigMap {spec.config_map.name}; waiting until "
        f"{_percent(gates.min_ready_fraction)} of ready pods have it loaded "
        f"(at most {gates.load_timeout})",
        step_started_at=now,
    )


def _fail(status: RolloutStatus, problems: list[str], now: datetime) -> _Outcome:
    message = "the rollout cannot start, nothing was changed: " + "; ".join(problems)
    return _transition(status, now, Phase.FAILED, "InvalidSpec", message, warning=True)


def _world_problems(spec: RolloutSpec, obs: Observation) -> list[str]:
    problems: list[str] = []
    if not obs.pool_exists:
        problems.append(f"InferencePool {spec.pool!r} not found: fix spec.pool")
    problems.extend(_model_problems(spec, obs.model))
    problems.extend(_config_map_problems(spec, obs))
    return problems


def _model_problems(spec: RolloutSpec, model: ModelView | None) -> list[str]:
    if model is None:
        return [f"no InferenceModel serves model {spec.model!r}: create it or fix spec.model"]
    problems: list[str] = []
    if model.pool != spec.pool:
        problems.append(
            f"the InferenceModel for {spec.model!r} belongs to pool {model.pool!r}, "
            f"not spec.pool {spec.pool!r}"
        )
    serving = [t for t in model.targets if t.weight > 0]
    if [t.name for t in serving] != [spec.from_.id]:
        routes = ", ".join(f"{t.name} (weight {t.weight})" for t in serving) or "nothing"
        problems.append(
            f"the InferenceModel for {spec.model!r} routes to {routes}; a rollout starts with "
            f"all traffic on spec.from ({spec.from_.id}): fix spec.from or the InferenceModel"
        )
    return problems


def _config_map_problems(spec: RolloutSpec, obs: Observation) -> list[str]:
    name = spec.config_map.name
    if obs.config_map is None:
        why = obs.config_map_error or "not found"
        return [f"ConfigMap {name!r} (key {spec.config_map.key!r}): {why}: fix spec.configMap"]
    listed = obs.config_map.ensure_exist.get(spec.to.id)
    if listed is not None and listed.source_key != _source_key(spec.to):
        return [
            f"{spec.to.id!r} is already in ConfigMap {name!r} with source {listed.source_key}, "
            f"not {spec.to.source}: one id must always mean the same weights; pick a new id"
        ]
    return []


# --- Loading ---------------------------------------------------------------------------


def _loading(spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime) -> _Outcome:
    gate = inventory_gate(spec.gates, obs.inventory, spec.to.id)
    status = status.model_copy(update={"last_gates": (gate,)})
    if gate.passed:
        if spec.promote:
            return _promote(spec, status, now, f"{gate.detail}; promoted by spec.promote")
        if spec.paused:
            return _pause(status, now, "Paused", f"{gate.detail}; paused before the first step")
        return _enter_step(spec, status, 0, now, f"{gate.detail}; ")
    deadline = _started(status) + parse_duration(spec.gates.load_timeout)
    if now >= deadline:
        message = f"{gate.detail} after loadTimeout {spec.gates.load_timeout}"
        return _abort(spec, status, now, "LoadTimeout", message)
    message = f"waiting for {spec.to.id} to load: {gate.detail}; giving up at {_rfc3339(deadline)}"
    return _Outcome(status.model_copy(update={"message": message}), None)


# --- Progressing and Paused ------------------------------------------------------------


def _progress(
    spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime
) -> _Outcome:
    hold = _hold_reason(spec, status)
    if hold is not None:
        reason, message = hold
        return _pause(_measured(spec, status, obs), now, reason, message)
    if status.phase is Phase.PAUSED:
        if status.current_step < 0:
            return _enter_step(spec, status, 0, now, "resumed; ")
        return _transition(
            status, now, Phase.PROGRESSING, "Resumed", f"resumed {_at(spec, status)}"
        )
    return _evaluate(spec, status, obs, now)


def _hold_reason(spec: RolloutSpec, status: RolloutStatus) -> tuple[str, str] | None:
    if spec.paused:
        return "Paused", f"paused by spec.paused {_at(spec, status)}"
    index = status.current_step
    if index >= 0 and spec.steps[index].manual and spec.approved_step < index:
        return "AwaitingApproval", (
            f"{_where(spec, status)} waits for approval: `loractl canary resume` "
            f"(spec.approvedStep: {index})"
        )
    return None


def _pause(status: RolloutStatus, now: datetime, reason: str, message: str) -> _Outcome:
    if status.phase is Phase.PAUSED:
        return _Outcome(status.model_copy(update={"message": message}), None)
    return _transition(status, now, Phase.PAUSED, reason, message)


def _measured(spec: RolloutSpec, status: RolloutStatus, obs: Observation) -> RolloutStatus:
    """While paused, keep the gates' numbers fresh for the person deciding; act on none."""
    report = _report(spec, status, obs, overdue=False)
    if report is None:
        return status
    return status.model_copy(update={"last_gates": report.evaluations})


def _evaluate(
    spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime
) -> _Outcome:
    step = spec.steps[status.current_step]
    pause_end = _started(status) + (parse_duration(step.pause) if step.pause else timedelta(0))
    timeout = spec.gates.min_requests_timeout
    deadline = None if timeout is None else pause_end + parse_duration(timeout)
    report = _report(spec, status, obs, overdue=deadline is not None and now >= deadline)
    if report is None:  # no figures for this window yet
        return _Outcome(status, None)
    status = status.model_copy(update={"last_gates": report.evaluations})
    if now < pause_end:
        # Errors or latency bad enough to fail need not wait out the pause.
        if report.traffic_failed:
            return _gate_failure(spec, status, report, now)
        return _waiting(spec, status, f"holding until {_rfc3339(pause_end)}")
    if report.verdict is Verdict.PASS:
        return _step_passed(spec, status, now)
    if report.verdict is Verdict.FAIL:
        return _gate_failure(spec, status, report, now)
    until = "" if deadline is None else f" until {_rfc3339(deadline)}"
    return _waiting(spec, status, f"waiting for {spec.gates.min_requests} requests{until}")


def _report(
    spec: RolloutSpec, status: RolloutStatus, obs: Observation, overdue: bool
) -> GateReport | None:
    traffic = obs.traffic
    # Figures from another window (a step ago, or before a restart of the window) judge nothing.
    if status.current_step < 0 or traffic is None or traffic.since != status.step_started_at:
        return None
    weight = spec.steps[status.current_step].weight
    ids = (spec.from_.id, spec.to.id)
    return evaluate_step(spec.gates, weight, obs.inventory, traffic, ids, overdue)


def _waiting(spec: RolloutSpec, status: RolloutStatus, what: str) -> _Outcome:
    message = f"{_where(spec, status)}: {what}"
    return _Outcome(status.model_copy(update={"message": message}), None)


def _step_passed(spec: RolloutSpec, status: RolloutStatus, now: datetime) -> _Outcome:
    passed = f"{_where(spec, status)} passed its gates"
    if status.current_step + 1 < len(spec.steps):
        return _enter_step(spec, status, status.current_step + 1, now, f"{passed}; ")
    return _promote(spec, status, now, f"{passed}; all steps done")


def _gate_failure(
    spec: RolloutSpec, status: RolloutStatus, report: GateReport, now: datetime
) -> _Outcome:
    failures = status.consecutive_gate_failures + 1
    limit = spec.gates.max_consecutive_failures
    what = f"{_where(spec, status)} failed its gates ({failures} of {limit}): {report.failures()}"
    status = status.model_copy(update={"consecutive_gate_failures": failures})
    if failures >= limit:
        return _abort(spec, status, now, "GatesFailed", what)
    return _transition(
        status,
        now,
        Phase.PROGRESSING,
        "GateFailed",
        f"{what}; watching the step again from now",
        warning=True,
        step_started_at=_new_window(status, now),
    )


# --- entering steps, the two ends -------------------------------------------------------


def _enter_step(
    spec: RolloutSpec, status: RolloutStatus, index: int, now: datetime, why: str
) -> _Outcome:
    weight = spec.steps[index].weight
    entered = status.model_copy(update={"current_step": index})
    return _transition(
        entered,
        now,
        Phase.PROGRESSING,
        "StepStarted",
        f"{why}{_where(spec, entered)}: {weight}% of {spec.model} to {spec.to.id}",
        step_started_at=_new_window(status, now),
        weights={spec.from_.id: 100 - weight, spec.to.id: weight},
        to_weight=weight,
        consecutive_gate_failures=0,
    )


def _promote(spec: RolloutSpec, status: RolloutStatus, now: datetime, why: str) -> _Outcome:
    message = (
        f"{why}: all traffic to {spec.to.id}, {spec.from_.id} moves to ensureNotExist "
        f"once drained ({spec.drain})"
    )
    return _transition(
        status,
        now,
        Phase.PROMOTED,
        "Promoted",
        message,
        weights={spec.to.id: 100},
        to_weight=100,
        unlist_after=now + parse_duration(spec.drain),
    )


def _abort(
    spec: RolloutSpec, status: RolloutStatus, now: datetime, reason: str, why: str
) -> _Outcome:
    unlist_after = None  # at once: no traffic was ever sent to it
    if spec.keep_on_abort:
        kept = "kept (keepOnAbort)"
    elif status.to_weight > 0:
        kept = f"moves to ensureNotExist once drained ({spec.drain})"
        unlist_after = now + parse_duration(spec.drain)
    else:
        kept = "moved to ensureNotExist"
    message = f"{why}; all traffic back to {spec.from_.id}, {spec.to.id} {kept}"
    return _transition(
        status,
        now,
        Phase.ABORTED,
        reason,
        message,
        warning=True,
        weights={spec.from_.id: 100},
        to_weight=0,
        unlist_after=unlist_after,
    )


def _transition(
    status: RolloutStatus,
    now: datetime,
    phase: Phase,
    reason: str,
    message: str,
    warning: bool = False,
    **changes: object,
) -> _Outcome:
    entry = HistoryEntry(
        at=now, phase=phase, step=status.current_step, reason=reason, message=message
    )
    history = (*status.history, entry)[-HISTORY_LIMIT:]
    update: Mapping[str, object] = {
        "phase": phase,
        "message": message,
        "history": history,
        **changes,
    }
    event = EmitEvent(EventType.WARNING if warning else EventType.NORMAL, reason, message)
    return _Outcome(status.model_copy(update=update), event)


# --- the world the status implies -------------------------------------------------------


def _world_actions(
    spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime
) -> list[EnsureAdapterListed | SetWeights | EnsureAdapterRemoved]:
    actions: list[EnsureAdapterListed | SetWeights | EnsureAdapterRemoved] = []
    if status.phase in _TO_LISTED and _needs_listing(spec.to, obs.config_map):
        actions.append(EnsureAdapterListed(spec.to.id, spec.to.source))
    if status.phase in _WEIGHTS_SET and status.weights:
        # InferenceModel weights are 1..1e6: a target at 0 % is left out, not written as 0.
        wanted = tuple(WeightedTarget(n, w) for n, w in status.weights.items() if w > 0)
        sticky = spec.stickiness.header.lower() if spec.stickiness else None
        if (
            obs.model is None
            or obs.model.targets != wanted
            or (sticky is not None and obs.model.sticky_header != sticky)
        ):
            actions.append(SetWeights(wanted, sticky))
    removed = _removed(spec, status.phase)
    if (
        removed is not None
        and _drained(spec, status, obs, now)
        and _needs_removal(removed, obs.config_map)
    ):
        actions.append(EnsureAdapterRemoved(removed))
    return actions


def _drained(spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime) -> bool:
    """Whether the adapter leaving the traffic may be unlisted now."""
    if status.unlist_after is None:
        return True
    return now >= status.unlist_after and not _still_named(spec, status, obs)


def _unlist_after(
    spec: RolloutSpec, status: RolloutStatus, obs: Observation, now: datetime
) -> datetime | None:
    """The drain runs from when the InferenceModel is seen without the adapter leaving: while
    it still names it (the new weights not seen yet, or put back), the drain starts over."""
    assert status.unlist_after is not None
    if _still_named(spec, status, obs):
        return max(status.unlist_after, now + parse_duration(spec.drain))
    return None if now >= status.unlist_after else status.unlist_after


def _still_named(spec: RolloutSpec, status: RolloutStatus, obs: Observation) -> bool:
    removed = _removed(spec, status.phase)
    return obs.model is not None and any(t.name == removed for t in obs.model.targets)


_TO_LISTED = frozenset({Phase.LOADING, Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED})
_WEIGHTS_SET = frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED, Phase.ABORTED})


def _removed(spec: RolloutSpec, phase: Phase) -> str | None:
    if phase is Phase.PROMOTED:
        return spec.from_.id
    if phase is Phase.ABORTED and not spec.keep_on_abort:
        return spec.to.id
    return None


def _needs_listing(ref: AdapterRef, config: DesiredState | None) -> bool:
    if config is None:  # unreadable now: assert the entry, the caller reports what fails
        return True
    listed = config.ensure_exist.get(ref.id)
    return (
        listed is None or listed.source_key != _source_key(ref) or ref.id in config.ensure_not_exist
    )


def _needs_removal(adapter_id: str, config: DesiredState | None) -> bool:
    if config is None:
        return True
    return adapter_id in config.ensure_exist or adapter_id not in config.ensure_not_exist


def _source_key(ref: AdapterRef) -> str:
    # Compare canonical forms: 'org/repo' and 'hf://org/repo' are the same weights.
    return parse_source(ref.source).key()


# --- wording ------------------------------------------------------------------------------


def _new_window(status: RolloutStatus, now: datetime) -> datetime:
    # Figures are asked for by window start, to the second: a window opened in the same second
    # as the one before it would be handed that window's figures and judge them twice.
    return max(now, _started(status) + timedelta(seconds=1))


def _started(status: RolloutStatus) -> datetime:
    # Set on entering Loading and every step; _cannot_continue holds a status without it.
    assert status.step_started_at is not None
    return status.step_started_at


def _where(spec: RolloutSpec, status: RolloutStatus) -> str:
    """The current step as people count: 'step 2/3 (50%)'."""
    index = status.current_step
    return f"step {index + 1}/{len(spec.steps)} ({spec.steps[index].weight}%)"


def _at(spec: RolloutSpec, status: RolloutStatus) -> str:
    return "before the first step" if status.current_step < 0 else f"at {_where(spec, status)}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
