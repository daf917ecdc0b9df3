"""Routed requests and their outcomes, without sockets: the ledger and access log entries."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from controller.extproc.access_log import ROUTE_NAMESPACE, entry_outcome
from controller.extproc.outcomes import Outcomes
from tests.support.envoy import access_log_entry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


Reported = list[tuple[object, int, float]]


def ledger(
    clock: Clock, grace_s: float = 5.0, max_age_s: float = 60.0
) -> tuple[Outcomes, Reported]:
    reported: Reported = []
    outcomes = Outcomes(
        lambda context, status, elapsed: reported.append((context, status, elapsed)),
        grace_s=grace_s,
        max_age_s=max_age_s,
        clock=clock,
    )
    return outcomes, reported


def test_the_first_source_to_answer_reports_and_the_other_finds_nothing() -> None:
    outcomes, reported = ledger(Clock())
    first, second = outcomes.open("a", 99.0), outcomes.open("b", 99.5)
    assert first != second
    assert outcomes.answered(second, 200, 0.25, "response_headers")
    assert not outcomes.answered(second, 200, 0.3, "access_log")  # after the headers: too late
    assert not outcomes.answered("not-ours-1", 500, 1.0, "access_log")
    assert reported == [("b", 200, 0.25)]
    assert len(outcomes) == 1
    assert outcomes.counts == {"response_headers": 1}


def test_ids_of_another_process_never_match() -> None:
    clock = Clock()
    before_restart, _ = ledger(clock)
    after_restart, reported = ledger(clock)
    old_id = before_restart.open("old", 99.0)
    after_restart.open("new", 99.0)
    assert not after_restart.answered(old_id, 200, 0.1, "access_log")
    assert reported == []


def test_a_stream_closed_without_answer_waits_for_the_access_log() -> None:
    clock = Clock()
    outcomes, reported = ledger(clock, grace_s=5.0)
    logged, silent = outcomes.open("logged", 99.0), outcomes.open("silent", 99.0)
    outcomes.unanswered(logged)
    outcomes.unanswered(silent)  # at 100.0: the request lived one second
    clock.now = 101.0
    outcomes.unanswered(silent)  # a second close changes nothing
    clock.now = 104.0
    assert outcomes.expire() == 0
    assert outcomes.answered(logged, 503, 0.5, "access_log")  # the log came within the grace
    clock.now = 105.0
    assert outcomes.expire() == 1
    assert reported == [("logged", 503, 0.5), ("silent", 0, 1.0)]
    assert len(outcomes) == 0
    assert outcomes.counts == {"access_log": 1, "timed_out": 1}
    late = outcomes.answered(silent, 200, 0.1, "access_log")
    assert not late  # a log entry after the grace is too late


def test_a_gateway_that_tells_no_outcome_at_all_is_named_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    outcomes, reported = ledger(clock, grace_s=1.0)
    for _ in range(3):
        outcomes.unanswered(outcomes.open("x", clock.now))
        clock.now += 2.0
        outcomes.expire()
    assert [status for _, status, _ in reported] == [0, 0, 0]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "not_arriving" in line]
    assert len(warnings) == 1
    assert "response_header_mode: SEND" in warnings[0]
    assert "envoy.access_loggers.http_grpc" in warnings[0]


def test_routes_nobody_reports_are_forgotten_after_the_maximum_age() -> None:
    clock = Clock()
    outcomes, reported = ledger(clock, max_age_s=60.0)
    outcomes.open("lost", 100.0)
    kept = outcomes.open("recent", 130.0)
    clock.now = 161.0
    assert outcomes.expire() == 1
    assert len(outcomes) == 1
    assert reported == []  # status 0 would be a guess: the request may have succeeded
    assert outcomes.counts == {"forgotten": 1}
    assert outcomes.answered(kept, 200, 1.0, "access_log")


def test_a_failing_report_costs_nothing_else() -> None:
    def broken(context: object, status: int, elapsed: float) -> None:
        raise RuntimeError("reporting bug")

    outcomes = Outcomes(broken)
    route_id = outcomes.open("x", 1.0)
    assert outcomes.answered(route_id, 200, 0.1, "access_log")
    assert len(outcomes) == 0


def test_an_access_log_entry_gives_status_and_time_to_the_first_byte() -> None:
    assert entry_outcome(access_log_entry("r-1", 404)) == ("r-1", 404, 0.12)


def test_an_answer_envoy_made_itself_counts_until_its_last_byte() -> None:
    assert entry_outcome(access_log_entry("r-1", 503, first_upstream_byte_ms=None)) == (
        "r-1",
        503,
        0.15,
    )


def test_a_request_that_got_no_response_has_status_0() -> None:
    outcome = entry_outcome(access_log_entry("r-1", 0, first_upstream_byte_ms=None))
    assert outcome is not None
    assert outcome[1] == 0


def test_entries_the_picker_did_not_route_are_not_ours() -> None:
    assert entry_outcome(access_log_entry(None)) is None  # refused, or the fail-open fallback route
    assert entry_outcome(accesslog_pb2.HTTPAccessLogEntry()) is None
    other_key = access_log_entry(None)
    other_key.common_properties.metadata.filter_metadata[ROUTE_NAMESPACE].fields[
        "something-else"
    ].string_value = "x"
    assert entry_outcome(other_key) is None
