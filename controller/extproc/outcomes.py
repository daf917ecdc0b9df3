"""Routed requests waiting for their outcome: status and latency, from whichever source tells.

Envoy can tell the picker how a routed request ended in two ways: the response headers on
the ext_proc stream (one more message pair per request, and one more round trip before the
client sees its answer), or an entry in its gRPC access log (batched, after the request).
The picker does not know which one a gateway is configured for, so every routed request
gets an id (sent back to Envoy as dynamic metadata, which the access log carries) and waits
here until one source reports it; the other then finds nothing to report.

A stream that closes without response headers is not an outcome yet: with the access log
configured, that is how every request ends. It gets `grace_s` for its access log entry;
after that it is reported with status 0 (no response reached Envoy), as before there was an
access log.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger("picker")

Report = Callable[[object, int, float], None]
"""The router's `on_response(context, status, elapsed_seconds)`."""

Source = Literal["response_headers", "access_log"]
HOW_REPORTED = ("response_headers", "access_log", "timed_out", "forgotten")
"""What `Outcomes.counts` counts: reported from either source; reported with status 0 after
the grace; dropped unreported after the maximum age."""

DEFAULT_GRACE_S = 5.0  # Envoy flushes its access log every 0.1 s (envoy_config); slack for load
DEFAULT_MAX_AGE_S = 3600.0  # longer than any route timeout: nobody will report it any more


@dataclass
class _Waiting:
    context: object
    opened: float
    unanswered: bool = False


class Outcomes:
    """The routed requests not yet reported, by route id; `report` is called once for each."""

    def __init__(
        self,
        report: Report,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._grace_s = grace_s
        self._max_age_s = max_age_s
        self._clock = clock
        # A fresh prefix per process: access log entries of routes from before a restart
        # must not match the new process's routes.
        self._prefix = secrets.token_hex(4)
        self._count = 0
        self._waiting: dict[str, _Waiting] = {}
        # (closed at, route id), oldest first
        self._unanswered: deque[tuple[float, str]] = deque()
        self.counts: Counter[str] = Counter()  # by HOW_REPORTED
        self._warned_nothing_arrives = False

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, context: object, opened: float) -> str:
        """A request was routed (at monotonic time `opened`): its id for the access log."""
        self._count += 1
        route_id = f"{self._prefix}-{self._count}"
        self._waiting[route_id] = _Waiting(context, opened)
        return route_id

    def answered(self, route_id: str, status: int, elapsed_seconds: float, source: Source) -> bool:
        """Report the outcome, unless it was reported already (or the id is not ours)."""
        waiting = self._waiting.pop(route_id, None)
        if waiting is None:
            return False
        self.counts[source] += 1
        self._call_report(waiting.context, status, elapsed_seconds)
        return True

    def unanswered(self, route_id: str) -> None:
        """The ext_proc stream closed without response headers: wait for the access log."""
        waiting = self._waiting.get(route_id)
        if waiting is not None and not waiting.unanswered:
            waiting.unanswered = True
            self._unanswered.append((self._clock(), route_id))

    def expire(self) -> int:
        """Report status 0 for what the access log did not tell in time; forget the ancient.

        Returns how many were reported or forgotten. Called periodically by the server.
        """
        now = self._clock()
        done = 0
        while self._unanswered and now - self._unanswered[0][0] >= self._grace_s:
            closed, route_id = self._unanswered.popleft()
            waiting = self._waiting.pop(route_id, None)
            if waiting is not None:  # else the access log told in time
                self.counts["timed_out"] += 1
                self._warn_if_nothing_arrives()
                # How long the request lived, as before there was a grace to wait out.
                self._call_report(waiting.context, 0, closed - waiting.opened)
                done += 1
        # Routes are opened in order, so the oldest come first; a stream that never closed
        # (a lost Envoy) must not keep its route forever.
        while self._waiting:
            route_id, waiting = next(iter(self._waiting.items()))
            if now - waiting.opened < self._max_age_s:
                break
            del self._waiting[route_id]
            self.counts["forgotten"] += 1
            done += 1
            log.warning("picker_outcome_never_reported", route_id=route_id)
        return done

    def _warn_if_nothing_arrives(self) -> None:
        if (
            self._warned_nothing_arrives
            or self.counts["access_log"]
            or self.counts["response_headers"]
        ):
            return
        self._warned_nothing_arrives = True
        log.warning(
            "picker_outcomes_not_arriving",
            problem="Envoy sends the picker neither response headers on the ext_proc stream "
            "nor access log entries: every routed request is reported with status 0",
            fix="set response_header_mode: SEND, or log to the picker with an "
            "envoy.access_loggers.http_grpc access log and add 'loractl' to the ext_proc "
            "filter's metadata_options.receiving_namespaces (README, picker)",
        )

    def _call_report(self, context: object, status: int, elapsed_seconds: float) -> None:
        try:
            self._report(context, status, elapsed_seconds)
        except Exception:
            log.exception("picker_on_response_failed", status=status)
