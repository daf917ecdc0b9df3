"""Residency estimation: which adapters each endpoint is believed to hold in GPU slots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

import pytest

from controller.inventory import Endpoint, EndpointView, MetricsObservation
from controller.scheduling.columns import Columns
from controller.scheduling.residency import ResidencyTracker, registration
from controller.scheduling.types import Affinity

ADDRESS = "10.0.0.1:8000"
HOT, WARM, COLD, MISSING = Affinity.HOT, Affinity.WARM, Affinity.COLD, Affinity.MISSING


def metrics(
    *,
    running: Iterable[str] = (),
    waiting: Iterable[str] = (),
    max_lora: int | None = 4,
    gpu: Iterable[str] | None = None,
    queue: int = 0,
    requests: int = 0,
    kv: float = 0.0,
) -> MetricsObservation:
    # The newest label set is also the newest busy one when it names any adapter.
    running, waiting = frozenset(running), frozenset(waiting)
    return MetricsObservation(
        running=requests,
        waiting=queue,
        kv_cache_usage=kv,
        max_lora=max_lora,
        running_adapters=running,
        waiting_adapters=waiting,
        gpu_adapters=None if gpu is None else frozenset(gpu),
        cpu_adapters=None,
        last_busy_running=running,
        last_busy_waiting=waiting,
    )


def make_view(
    address: str = ADDRESS,
    *,
    observed: MetricsObservation | None = None,
    registered: Iterable[str] | None = ("a", "b", "c", "d", "e"),
    sidecar: dict[str, str] | None = None,
    ready: bool = True,
) -> EndpointView:
    """A view with fresh metrics (idle, 4 slots) unless told otherwise."""
    return EndpointView(
        endpoint=Endpoint(address=address, ready=ready),
        metrics=metrics() if observed is None else observed,
        registered=None if registered is None else frozenset(registered),
        sidecar_states=sidecar,
    )


def blind_view(address: str = ADDRESS) -> EndpointView:
    """A view whose metrics are unknown (stale or never scraped)."""
    view = make_view(address)
    return EndpointView(view.endpoint, None, view.registered, view.sidecar_states)


def test_idle_adapter_invisible_in_metrics_is_remembered_from_our_assignment() -> None:
    tracker = ResidencyTracker()
    view = make_view()  # lora_requests_info shows nothing running or waiting
    assert tracker.classify(view, "a", now=0.0) is WARM
    tracker.record_assignment(ADDRESS, "a", now=1.0)
    assert tracker.classify(view, "a", now=2.0) is HOT
    assert tracker.classify(view, "b", now=2.0) is WARM


def test_running_and_waiting_adapters_are_hot_without_any_assignment() -> None:
    tracker = ResidencyTracker()
    view = make_view(observed=metrics(running=["a"], waiting=["b"]))
    assert tracker.classify(view, "a", 0.0) is HOT
    assert tracker.classify(view, "b", 0.0) is HOT
    assert tracker.classify(view, "c", 0.0) is WARM


def test_assigning_a_new_adapter_to_a_full_endpoint_evicts_the_least_recent() -> None:
    tracker = ResidencyTracker()
    view = make_view(observed=metrics(max_lora=2))
    for when, adapter in enumerate(["a", "b", "c"]):
        tracker.record_assignment(ADDRESS, adapter, float(when), max_lora=2)
    assert [tracker.classify(view, name, 5.0) for name in "abc"] == [COLD, HOT, HOT]
    tracker.record_assignment(ADDRESS, "b", 6.0, max_lora=2)  # b is now the most recent
    tracker.record_assignment(ADDRESS, "a", 7.0, max_lora=2)  # so c goes
    assert [tracker.classify(view, name, 8.0) for name in "abc"] == [HOT, HOT, COLD]


def test_active_adapters_take_their_slots_first() -> None:
    tracker = ResidencyTracker()
    tracker.record_assignment(ADDRESS, "a", 1.0)
    tracker.record_assignment(ADDRESS, "b", 2.0)
    # Two slots, one pinned by a running request for d: only the latest of ours fits.
    view = make_view(observed=metrics(max_lora=2, running=["d"]))
    assert [tracker.classify(view, name, 3.0) for name in "abd"] == [COLD, HOT, HOT]
    assert tracker.classify(view, "c", 3.0) is COLD


def test_waiting_adapters_count_against_the_slots() -> None:
    tracker = ResidencyTracker()
    view = make_view(observed=metrics(max_lora=2, running=["a"], waiting=["b"]))
    assert tracker.classify(view, "c", 0.0) is COLD


def test_adapters_seen_active_stay_remembered_once_idle() -> None:
    tracker = ResidencyTracker()
    tracker.classify(make_view(observed=metrics(running=["c"])), "a", 1.0)
    # The next scrape (a new observation) shows nothing in flight; c is still in its slot.
    assert tracker.classify(make_view(), "c", 2.0) is HOT


def test_gpu_adapters_are_authoritative() -> None:
    tracker = ResidencyTracker()
    tracker.record_assignment(ADDRESS, "a", 1.0)
    with_gpu = make_view(observed=metrics(max_lora=2, running=["c"], gpu=["b"]))
    assert tracker.classify(with_gpu, "b", 2.0) is HOT  # idle, yet reported resident
    assert tracker.classify(with_gpu, "a", 2.0) is WARM  # our memory is overruled
    assert tracker.classify(with_gpu, "c", 2.0) is WARM  # running yet not reported
    full = make_view(observed=metrics(max_lora=2, gpu=["b", "d"]))
    assert tracker.classify(full, "a", 3.0) is COLD


def test_a_vanished_adapter_means_a_restart_and_all_memory_goes() -> None:
    tracker = ResidencyTracker()
    for when, adapter in enumerate(["a", "b"]):
        tracker.record_assignment(ADDRESS, adapter, float(when))
    assert tracker.classify(make_view(registered=["a", "b"]), "b", 2.0) is HOT
    after_restart = make_view(registered=["b"])  # the sidecar is reloading a
    assert tracker.classify(after_restart, "a", 3.0) is MISSING
    assert tracker.classify(after_restart, "b", 3.0) is WARM
    reloaded = make_view(registered=["a", "b"])
    assert tracker.classify(reloaded, "a", 4.0) is WARM


def test_unknown_registration_counts_as_registered_unless_the_sidecar_says_otherwise() -> None:
    tracker = ResidencyTracker()
    assert tracker.classify(make_view(registered=None), "z", 0.0) is WARM
    failed = make_view(registered=None, sidecar={"z": "failed"})
    assert tracker.classify(failed, "z", 0.0) is MISSING
    assert tracker.classify(make_view(registered=["a"]), "z", 0.0) is MISSING
    # The sidecar saw the load succeed before the model list was scraped again.
    just_loaded = make_view(registered=["a"], sidecar={"z": "loaded"})
    assert tracker.classify(just_loaded, "z", 0.0) is WARM


def test_registration_combines_the_model_list_and_the_sidecar() -> None:
    assert registration(make_view(registered=["a"]), "a") is True
    assert registration(make_view(registered=["a"]), "b") is False
    assert registration(make_view(registered=None), "b") is None
    assert registration(make_view(registered=None, sidecar={"a": "loaded"}), "b") is None
    assert registration(make_view(registered=None, sidecar={"b": "loading"}), "b") is False
    assert registration(make_view(registered=["a"], sidecar={"b": "loaded"}), "b") is True


def test_remembered_use_expires_after_idle_seconds() -> None:
    tracker = ResidencyTracker(idle_seconds=10.0)
    view = make_view()
    tracker.record_assignment(ADDRESS, "a", 0.0)
    assert tracker.classify(view, "a", 9.0) is HOT
    assert tracker.classify(view, "a", 10.0) is WARM


def test_default_max_lora_applies_while_the_endpoint_has_not_reported_one() -> None:
    tracker = ResidencyTracker(default_max_lora=1)
    view = make_view(observed=metrics(max_lora=None))
    tracker.record_assignment(ADDRESS, "a", 0.0)
    assert tracker.classify(view, "a", 1.0) is HOT
    assert tracker.classify(view, "b", 1.0) is COLD


def test_own_memory_still_counts_without_fresh_metrics() -> None:
    tracker = ResidencyTracker(default_max_lora=2)
    tracker.record_assignment(ADDRESS, "a", 0.0)
    assert tracker.classify(blind_view(), "a", 1.0) is HOT
    assert tracker.classify(blind_view(), "b", 1.0) is WARM
    tracker.record_assignment(ADDRESS, "b", 2.0)
    assert tracker.classify(blind_view(), "c", 3.0) is COLD


def test_forget_drops_an_endpoint() -> None:
    tracker = ResidencyTracker()
    tracker.record_assignment(ADDRESS, "a", 0.0)
    tracker.forget(ADDRESS)
    tracker.forget("10.9.9.9:8000")  # unknown addresses are fine
    assert tracker.classify(make_view(), "a", 1.0) is WARM


def test_classify_all_matches_classify_per_endpoint() -> None:
    tracker = ResidencyTracker()
    views = [
        make_view("10.0.0.1:8000", observed=metrics(running=["a"])),
        make_view("10.0.0.2:8000", registered=["b"]),
        make_view("10.0.0.3:8000", observed=metrics(max_lora=1, running=["b"])),
        blind_view("10.0.0.4:8000"),
    ]
    expected = [HOT, MISSING, COLD, WARM]
    columns = Columns()
    columns.update(views)
    assert tracker.classify_all(columns, [0, 1, 2, 3], "a", 0.0) == expected
    assert tracker.classify_all(columns, [3, 0], "a", 0.0) == [WARM, HOT]
    assert [tracker.classify(view, "a", 0.0) for view in views] == expected


def test_classify_all_follows_new_views_assignments_expiry_and_forget() -> None:
    """classify_all keeps each endpoint's memory by position between calls: every way an
    estimate goes out of date must reach it."""
    tracker = ResidencyTracker(idle_seconds=10.0)
    columns = Columns()
    first, second = make_view("10.0.0.1:8000"), make_view("10.0.0.2:8000")
    columns.update([first, second])
    assert tracker.classify_all(columns, [0, 1], "a", 0.0) == [WARM, WARM]
    tracker.record_assignment("10.0.0.2:8000", "a", 1.0)
    assert tracker.classify_all(columns, [0, 1], "a", 2.0) == [WARM, HOT]
    columns.update([make_view("10.0.0.1:8000", observed=metrics(running=["a"])), second])
    assert tracker.classify_all(columns, [0, 1], "a", 3.0) == [HOT, HOT]
    assert tracker.classify_all(columns, [0, 1], "a", 11.0) == [HOT, WARM]  # ours expired
    tracker.record_assignment("10.0.0.2:8000", "a", 12.0)
    tracker.forget("10.0.0.2:8000")
    assert tracker.classify_all(columns, [0, 1], "a", 13.0) == [HOT, WARM]


def test_classify_all_reads_an_endpoint_only_while_it_is_a_candidate() -> None:
    """A scrape that came and went while the endpoint was filtered out is never seen, as
    when every estimate was looked up per request: the estimate depends on the
    observations, not on which other requests were scheduled meanwhile."""
    tracker = ResidencyTracker()
    columns = Columns()
    other = make_view("10.0.0.1:8000")
    columns.update([other, make_view("10.0.0.2:8000")])
    assert tracker.classify_all(columns, [0, 1], "c", 0.0) == [WARM, WARM]
    columns.update([other, make_view("10.0.0.2:8000", observed=metrics(running=["c"]))])
    assert tracker.classify_all(columns, [0], "c", 1.0) == [WARM]
    columns.update([other, make_view("10.0.0.2:8000")])
    assert tracker.classify_all(columns, [0, 1], "c", 2.0) == [WARM, WARM]


def test_a_repeat_assignment_of_a_resident_adapter_keeps_the_estimate_right() -> None:
    tracker = ResidencyTracker()
    view = make_view(observed=metrics(max_lora=2))
    tracker.record_assignment(ADDRESS, "a", 0.0, max_lora=2)
    tracker.record_assignment(ADDRESS, "b", 1.0, max_lora=2)
    assert tracker.classify(view, "a", 2.0) is HOT
    tracker.record_assignment(ADDRESS, "a", 3.0, max_lora=2)  # resident: no re-derivation
    tracker.record_assignment(ADDRESS, "c", 4.0, max_lora=2)  # evicts b, not a
    assert [tracker.classify(view, name, 5.0) for name in "abc"] == [HOT, COLD, HOT]


@pytest.mark.parametrize(("default_max_lora", "idle_seconds"), [(0, 10.0), (1, 0.0), (1, -1.0)])
def test_invalid_settings_are_refused(default_max_lora: int, idle_seconds: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        ResidencyTracker(default_max_lora=default_max_lora, idle_seconds=idle_seconds)


def test_decisions_do_not_depend_on_the_string_hash_seed() -> None:
    """Adapters seen in the same scrape enter the memory in an order of their own (see
    residency._in_recency_order), not in the order of a set, which follows the process's
    hash seed: a seeded run repeats exactly."""
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-m", "tests.support.decision_replay", "--decisions", "800"]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=True
        )
        outputs.append(done.stdout.splitlines())
    assert len(outputs[0]) == 4 * 800 + 1
    assert outputs[0] == outputs[1]
