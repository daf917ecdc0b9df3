"""AdapterRollout spec and status models: durations, parsing, cross-field rules."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from controller.rollout import (
    DurationError,
    Phase,
    RolloutSpec,
    RolloutStatus,
    SpecError,
    parse_duration,
    parse_spec,
    validate_spec,
)
from tests.rollout.world import TO_SOURCE, World, run_healthy, spec


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("0s", 0)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "5 min", "1.5h", "-1s", "1d", "m5", "5M", " 5m"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(DurationError, match=r"is not a duration: .* e\.g\. 30s, 5m, 1h or 1h30m"):
        parse_duration(text)


def test_defaults() -> None:
    rollout = spec()
    assert rollout.config_map.key == "configmap.yaml"
    gates = rollout.gates
    assert (gates.min_ready_fraction, gates.max_error_rate, gates.max_p95_latency_ratio) == (
        1.0,
        0.01,
        1.5,
    )
    assert (gates.min_requests, gates.max_consecutive_failures) == (20, 2)
    assert (gates.min_requests_timeout, gates.load_timeout) == ("30m", "10m")
    assert (rollout.paused, rollout.abort, rollout.promote, rollout.approved_step) == (
        False,
        False,
        False,
        -1,
    )
    assert rollout.stickiness is None
    assert not rollout.keep_on_abort


def test_api_names_are_camel_case_and_python_names_work_too() -> None:
    rollout = spec(gates={"maxErrorRate": 0.05}, keepOnAbort=True)
    api = rollout.to_api()
    assert api["from"]["id"] == "food-review-1"
    assert api["configMap"] == {"name": "vllm-llama3-8b-instruct-adapters", "key": "configmap.yaml"}
    assert api["gates"]["maxErrorRate"] == 0.05
    assert api["keepOnAbort"] is True
    assert parse_spec(api) == rollout

    python = rollout.model_dump()
    assert {"from_", "config_map", "keep_on_abort"} <= python.keys()
    assert python["gates"]["max_error_rate"] == 0.05
    by_name = RolloutSpec.model_validate(python)
    assert by_name == rollout


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"from": None}, "spec.from: Input should be a valid dictionary"),
        ({"steps": []}, "spec.steps: Tuple should have at least 1 item"),
        ({"steps": [{"weight": 101}]}, "spec.steps[0].weight: Input should be less than or equal"),
        (
            {"steps": [{"weight": 10, "pause": "5 min"}]},
            "spec.steps[0].pause: '5 min' is not a duration",
        ),
        ({"gates": {"maxErrorRatio": 0.1}}, "spec.gates.maxErrorRatio: Extra inputs"),
        ({"gates": {"loadTimeout": "soon"}}, "spec.gates.loadTimeout: 'soon' is not a duration"),
        ({"gates": {"maxP95LatencyRatio": 0}}, "spec.gates.maxP95LatencyRatio: Input should be"),
        ({"approvedStep": -2}, "spec.approvedStep: Input should be greater than or equal to -1"),
    ],
)
def test_schema_problems_name_the_field(changes: dict[str, Any], problem: str) -> None:
    raw = spec().to_api() | changes
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_a_missing_from_is_a_schema_problem() -> None:
    raw = spec().to_api()
    del raw["from"]
    with pytest.raises(SpecError, match=r"spec\.from: Field required"):
        parse_spec(raw)


def test_every_schema_problem_is_listed() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({"model": "m"})
    assert len(caught.value.problems) == 5  # pool, configMap, from, to, steps


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"to": {"id": "food-review-1", "source": TO_SOURCE}}, "both 'food-review-1'"),
        ({"to": {"id": "a..b", "source": TO_SOURCE}}, "spec.to.id: id 'a..b' is not a safe"),
        ({"from": {"id": "-x", "source": TO_SOURCE}}, "spec.from.id: id '-x' is not a safe"),
        ({"to": {"id": "x", "source": "relative/dir/x"}}, "spec.to.source: source"),
        ({"to": {"id": "x", "source": "ftp://h/x"}}, "ftp:// sources are not supported"),
        (
            {"steps": [{"weight": 10}, {"weight": 50}, {"weight": 20}]},
            "spec.steps[2].weight 20 is below the step before it (50)",
        ),
        (
            {"stickiness": {"header": "x user"}},
            "spec.stickiness.header 'x user' is not an HTTP header name: use letters, digits",
        ),
    ],
)
def test_cross_field_rules(changes: dict[str, Any], fragment: str) -> None:
    problems = validate_spec(spec(**changes))
    assert len(problems) == 1
    assert fragment in problems[0]


def test_valid_specs_have_no_problems() -> None:
    assert validate_spec(spec()) == []
    # Equal weights in a row are fine: e.g. a manual check, then a timed bake at the same weight.
    same = [{"weight": 50, "manual": True}, {"weight": 50, "pause": "1h"}]
    assert validate_spec(spec(steps=same)) == []


def test_status_round_trips_through_its_api_form() -> None:
    statuses = run_healthy(World(), spec())
    for status in statuses:
        api = status.to_api()
        assert RolloutStatus.model_validate(api) == status
    final = statuses[-1].to_api()
    assert final["phase"] == "Promoted"
    assert final["history"][0]["at"] == "2026-05-01T09:00:00Z"
    assert set(final) >= {"currentStep", "stepStartedAt", "lastGates", "consecutiveGateFailures"}


def test_a_new_status_is_pending_before_the_first_step() -> None:
    status = RolloutStatus.model_validate({})
    assert (status.phase, status.current_step, status.weights) == (Phase.PENDING, -1, {})


def test_status_ignores_fields_a_newer_controller_wrote() -> None:
    assert RolloutStatus.model_validate({"phase": "Loading", "future": 1}).phase is Phase.LOADING
