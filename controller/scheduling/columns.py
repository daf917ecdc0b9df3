"""The per-endpoint figures the scheduling plugins read, kept as columns.

A decision reads the same few figures of every endpoint (ready, the adapters known
registered, waiting and running requests, free KV cache), while the inventory builds a
new view only when an observation of that endpoint changes. So the figures are kept in
one list per figure, position i for the snapshot's i-th view, and re-read only at the
positions whose view object changed: the plugins then pass candidate indices around and
read one list item per figure, instead of following view → metrics → figure for every
endpoint of every request.
"""

from __future__ import annotations

from typing import TypeVar, cast

from controller.inventory import EndpointView, MetricsObservation

T = TypeVar("T")

_NOTHING: frozenset[str] = frozenset()


def changed_positions(new: list[EndpointView], old: list[EndpointView]) -> list[int]:
    """The positions where `new` holds another object than `old` (same lengths).

    An index loop: compiled (see setup.py) it is a few instructions per endpoint, where
    the C iterator chain `compress(range(n), map(is_not, new, old))`, which is slightly
    faster interpreted, costs some 300 per endpoint in calls and boxed indices.
    """
    return [i for i in range(len(new)) if new[i] is not old[i]]


def known_or(figures: list[T | None], unknown: T, all_known: bool) -> list[T]:
    """A copy of `figures` with `unknown` for every None. `all_known` (the columns' flag:
    no endpoint lacks fresh metrics, the usual case) makes it one copy in C."""
    if all_known:
        return cast(list[T], figures[:])
    return [unknown if figure is None else figure for figure in figures]


class Columns:
    """One list per figure, index-aligned with `views` (see the module doc).

    None in a figure's column means the endpoint has no fresh metrics.
    """

    def __init__(self) -> None:
        self.views: list[EndpointView] = []
        self.everyone: list[int] = []
        """Every index: the candidates before any filter. Filters that keep every candidate
        return their input list itself, so `candidates is columns.everyone` tells a plugin
        that it may read a whole column without gathering."""
        self.all_ready = True
        self.all_known = True
        """Every endpoint has fresh metrics: no None in waiting, running, in_flight and kv_free."""
        self.ready: list[bool] = []
        self.address: list[str] = []
        self.loaded: list[frozenset[str]] = []
        self.waiting: list[int | None] = []
        self.running: list[int | None] = []
        self.kv_free: list[float | None] = []
        self.in_flight: list[int | None] = []
        """running + waiting: what `sent` adds to (see scorers.InFlightScorer)."""
        self.sent: list[int] = []
        """Requests this pipeline sent to each endpoint since its metrics were last read:
        the load a scrape has not shown yet (see `record_sent`)."""
        self._metrics: list[MetricsObservation | None] = []
        self._holding: dict[str, list[int]] = {}
        """adapter → the indices where it is known registered, computed on first use and
        dropped when any endpoint's registered set changes (contents, not objects: a
        scrape hands out an equal set most of the time)."""

    def update(self, views: list[EndpointView]) -> None:
        """Make the columns describe `views`, re-reading only the views that changed."""
        if len(views) != len(self.views):
            self._rebuild(views)
            return
        changed = changed_positions(views, self.views)
        for index in changed:
            self._read(index, views[index])
        if changed:
            self._summarise()

    def record_sent(self, index: int) -> None:
        """Count a request sent to the endpoint at `index` until its next metrics."""
        self.sent[index] += 1

    def gather(self, column: list[T], candidates: list[int]) -> list[T]:
        """The candidates' items of `column`, in candidate order (the column itself, not a
        copy, when every endpoint is a candidate: do not modify the result)."""
        if candidates is self.everyone:
            return column
        return [column[index] for index in candidates]

    def holding(self, adapter: str) -> list[int]:
        """The indices of the endpoints where `adapter` is known registered (see
        EndpointView.loaded), in order. Do not modify the result: it is cached."""
        indices = self._holding.get(adapter)
        if indices is None:
            loaded = self.loaded
            indices = self._holding[adapter] = [i for i in self.everyone if adapter in loaded[i]]
        return indices

    def _rebuild(self, views: list[EndpointView]) -> None:
        count = len(views)
        self.views = list(views)
        self.everyone = list(range(count))
        self.ready = [False] * count
        self.address = [""] * count
        self.loaded = [_NOTHING] * count
        self.waiting, self.running, self.kv_free = [None] * count, [None] * count, [None] * count
        self.in_flight = [None] * count
        self.sent = [0] * count
        self._metrics = [None] * count
        for index, view in enumerate(views):
            self._read(index, view)
        self._summarise()
        self._holding.clear()

    def _summarise(self) -> None:
        self.all_ready = all(self.ready)
        self.all_known = None not in self.waiting  # the four are None together

    def _read(self, index: int, view: EndpointView) -> None:
        self.views[index] = view
        self.ready[index] = view.ready
        self.address[index] = view.address
        if view.loaded != self.loaded[index]:
            self._holding.clear()
        self.loaded[index] = view.loaded
        metrics = view.metrics
        if metrics is not self._metrics[index]:  # a scrape (or staleness): it counts ours
            self._metrics[index] = metrics
            self.sent[index] = 0
        if metrics is None:
            self.waiting[index] = self.running[index] = self.kv_free[index] = None
            self.in_flight[index] = None
        else:
            self.waiting[index] = metrics.waiting
            self.running[index] = metrics.running
            self.in_flight[index] = metrics.running + metrics.waiting
            self.kv_free[index] = 1.0 - metrics.kv_cache_usage
