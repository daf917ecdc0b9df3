"""Live per-target traffic figures: what canary gates decide on.

The picker records every answered request (model, target, endpoint, status,
latency); readers ask for a window ("since the current step began"). Samples
are kept in time order and trimmed by age and count, so memory stays bounded.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

MAX_SAMPLES_PER_TARGET = 100_000
MAX_AGE_SECONDS = 3600.0


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic
    endpoint: str
    status: int
    seconds: float


@dataclass(frozen=True)
class TargetSummary:
    requests: int
    errors: int  # 5xx answers: the server's fault, which is what a canary must catch
    p50_seconds: float | None
    p95_seconds: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class TrafficStats:
    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], deque[Sample]] = {}

    def record(self, model: str, target: str, endpoint: str, status: int, seconds: float) -> None:
        now = time.monotonic()
        samples = self._samples.setdefault((model, target), deque(maxlen=MAX_SAMPLES_PER_TARGET))
        samples.append(Sample(now, endpoint, status, seconds))
        while samples and now - samples[0].at > MAX_AGE_SECONDS:
            samples.popleft()

    def targets(self, model: str) -> list[str]:
        return [target for (m, target) in self._samples if m == model]

    def summary(self, model: str, target: str, since: float = 0.0) -> TargetSummary:
        """Figures for answers recorded at or after monotonic time `since`."""
        samples = self._samples.get((model, target), deque())
        start = bisect.bisect_left(samples, since, key=lambda s: s.at)
        window = [samples[i] for i in range(start, len(samples))]
        latencies = sorted(s.seconds for s in window)
        return TargetSummary(
            requests=len(window),
            errors=sum(1 for s in window if s.status >= 500),
            p50_seconds=_quantile(latencies, 0.50),
            p95_seconds=_quantile(latencies, 0.95),
        )


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
