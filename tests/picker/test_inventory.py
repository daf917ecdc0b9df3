"""The inventory store: fresh figures, stale ones as unknown, and cheap repeated snapshots."""

from __future__ import annotations

import time

from controller.inventory import Endpoint, Inventory, MetricsObservation, Staleness

A, B = "10.0.0.1:8000", "10.0.0.2:8000"


def observation(waiting: int) -> MetricsObservation:
    return MetricsObservation(0, waiting, 0.0, 4, frozenset(), frozenset(), None, None)


def test_snapshots_follow_records_and_staleness() -> None:
    inventory = Inventory(Staleness(metrics=0.5, models=5.0, sidecar=5.0))
    inventory.set_endpoints([Endpoint(A), Endpoint(B)])
    now = time.monotonic()
    inventory.record_metrics(A, observation(1))
    first = inventory.snapshot(now)
    assert first[0].metrics == observation(1)
    assert first[1].metrics is None, "never scraped: unknown"
    assert inventory.snapshot(now)[0] is first[0], "unchanged views are reused"
    inventory.record_metrics(A, observation(2))
    assert inventory.snapshot(now)[0].metrics == observation(2)
    assert inventory.snapshot(now + 1.0)[0].metrics is None, "stale reads as unknown"


def test_endpoint_set_changes_keep_observations_of_those_that_stay() -> None:
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(A), Endpoint(B)])
    inventory.record_registered(A, frozenset({"x"}))
    inventory.set_endpoints([Endpoint(A, pod="pod-a")])
    [view] = inventory.snapshot()
    assert view.endpoint.pod == "pod-a"
    assert view.registered == frozenset({"x"})
    inventory.record_metrics(B, observation(1))  # gone: ignored
    inventory.record_error(A, "metrics", "timeout")
    assert inventory.errors() == {A: {"metrics": "timeout"}}


def test_staleness_follows_the_scrape_intervals() -> None:
    assert Staleness.for_intervals(0.05, 1.0, 1.0) == Staleness(), "defaults at the defaults"
    assert Staleness.for_intervals(1.0, 10.0, 2.0) == Staleness(
        metrics=10.0, models=50.0, sidecar=10.0
    )
