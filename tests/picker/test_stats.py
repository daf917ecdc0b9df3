"""Per-target traffic figures for canary gates."""

from __future__ import annotations

import time

from controller.stats import TrafficStats


def test_summary_counts_5xx_as_errors_and_reports_latency_quantiles() -> None:
    stats = TrafficStats()
    for i in range(100):
        stats.record("m", "v2", "10.0.0.1:8000", 500 if i < 5 else 200, i / 100)
    stats.record("m", "v2", "10.0.0.1:8000", 429, 0.0)
    summary = stats.summary("m", "v2")
    assert summary.requests == 101
    assert summary.errors == 5
    assert round(summary.error_rate, 3) == 0.050
    assert summary.p95_seconds is not None
    assert 0.9 <= summary.p95_seconds <= 1.0
    assert stats.summary("m", "v1").requests == 0
    assert stats.summary("m", "v1").p95_seconds is None
    assert stats.targets("m") == ["v2"]


def test_window_since_a_step_began() -> None:
    stats = TrafficStats()
    stats.record("m", "v2", "e", 500, 0.1)
    step_start = time.monotonic()
    stats.record("m", "v2", "e", 200, 0.1)
    assert stats.summary("m", "v2", since=step_start).errors == 0
    assert stats.summary("m", "v2").errors == 1
