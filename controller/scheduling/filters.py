"""Filters: which endpoints a request may go to at all. Each takes and returns candidate
indices into the pipeline's columns, keeping their order, and returns its input list
itself when it keeps every candidate (later plugins then read whole columns).

Also the saturation check the caller uses to shed Sheddable requests (429): it is not
a filter (it never removes endpoints), but it reads the same per-endpoint figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from controller.inventory import EndpointView
from controller.scheduling.columns import Columns
from controller.scheduling.residency import registration
from controller.scheduling.types import SchedulingRequest


class ReadyFilter:
    name: Final = "ready"
    kind: Final = "filter"

    def filter(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int]
    ) -> list[int]:
        if columns.all_ready:  # the usual case: no pass over the candidates
            return candidates
        ready = columns.ready
        return [i for i in candidates if ready[i]]


class SubsetFilter:
    """Only the addresses of the gateway's subset hint, when it sent one."""

    name: Final = "subset"
    kind: Final = "filter"

    def filter(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int]
    ) -> list[int]:
        subset = request.subset
        if subset is None:
            return candidates
        address = columns.address
        return [i for i in candidates if address[i] in subset]


class AdapterRegisteredFilter:
    """Never send an adapter request to a pod that would answer 404 while another can serve.

    Keeps, in order of preference, the first non-empty of:
    1. endpoints where the adapter is known registered (vLLM lists it or its sidecar
       reports it loaded);
    2. endpoints where that is unknown (no fresh model list, no sidecar word);
    3. all endpoints. Every candidate is known to lack the adapter, so the model name
       resolved to a target the pool does not serve: letting a backend answer vLLM's own
       404 "model does not exist" tells the client the truth, where an empty candidate
       list would become a 503 that looks like an outage and invites retries.

    Base-model requests pass through.
    """

    name: Final = "adapter-registered"
    kind: Final = "filter"

    def filter(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int]
    ) -> list[int]:
        if not request.is_adapter:
            return candidates
        target = request.target
        if candidates is columns.everyone:
            known = columns.holding(target)  # cached per adapter while registrations stand
        else:
            loaded = columns.loaded
            known = [i for i in candidates if target in loaded[i]]
        if known:
            return candidates if len(known) == len(candidates) else known
        views = columns.views
        unknown = [i for i in candidates if registration(views[i], target) is None]
        return unknown or candidates


@dataclass(frozen=True)
class SaturationThresholds:
    """An endpoint is saturated above either threshold (same defaults as upstream's
    saturation detector: more than 5 waiting requests, or more than 80 % KV cache)."""

    queue_threshold: int = 5
    kv_threshold: float = 0.8


def saturated(views: Sequence[EndpointView], thresholds: SaturationThresholds) -> bool:
    """True when every endpoint is above the queue or the KV threshold.

    An endpoint without fresh metrics counts as not saturated: shedding is a deliberate
    refusal of service, so it needs evidence, not a missed scrape. No endpoints at all is
    not saturation either (the caller answers 503 for that).
    """
    queue_threshold, kv_threshold = thresholds.queue_threshold, thresholds.kv_threshold
    for view in views:
        metrics = view.metrics
        if metrics is None or (
            metrics.waiting <= queue_threshold and metrics.kv_cache_usage <= kv_threshold
        ):
            return False
    return bool(views)
