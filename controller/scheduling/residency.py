"""Which LoRA adapters each endpoint is believed to hold in its GPU slots.

vLLM runs at most `--max-loras` adapters per batch, one per GPU slot, and keeps an
adapter in its slot after its requests finish until another adapter needs the slot
(least recently used goes first). What it exports says little about that:
`vllm:lora_requests_info` names only adapters with requests in flight, so an idle
adapter still sitting in a slot is invisible there. The tracker combines what is
observable, strongest evidence first:

1. `gpu_adapters` (`vllm:lora_adapter_loaded{level="gpu"}`, proposed upstream): when
   an endpoint exports it, it is the truth and nothing else is consulted.
2. Adapters in the running or waiting label sets: certainly in (or about to take) a
   slot, and pinned there while their requests run.
3. Remembered use: this picker's own assignments to the endpoint, and adapters seen
   running or waiting in earlier scrapes. Most recent first, they fill the slots the
   active adapters leave free: the order vLLM's LRU evicts in. The capacity is the
   endpoint's `max_lora`, or `default_max_lora` while unknown.

Remembered use is forgotten after `idle_seconds`: vLLM would keep an idle adapter in
its slot indefinitely, but traffic this picker does not see (another picker replica,
direct requests) may have evicted it, so the memory is long but not permanent. When
vLLM's model list no longer shows a remembered adapter, the whole memory of that
endpoint is dropped: an unload and a restart look alike from here, and a restart
empties every slot. A restart that the model list never shows (the sidecar
re-registered everything before the next successful scrape) is the caller's to report
through `forget`, e.g. when the endpoint turns unready.

Registration comes first: an adapter that is known not to be registered is MISSING
whatever the slots say. Unknown registration (no fresh `/v1/models` and no sidecar
word on the adapter) is treated as registered, because whether to route there at all
is the adapter-registered filter's decision; the tracker only answers where the
adapter would stand if the request went there.

Single-threaded by design: the picker calls it from one event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Generic, NamedTuple, TypeVar

from controller.inventory import EndpointView, MetricsObservation
from controller.scheduling.columns import Columns, changed_positions
from controller.scheduling.types import Affinity
from sidecar.status import AdapterState

T = TypeVar("T")

DEFAULT_MAX_LORA = 4
"""GPU slots assumed while an endpoint has not reported `max_lora` (vLLM's own default is 1,
but a pool serving many adapters is started with more)."""

DEFAULT_IDLE_SECONDS = 300.0
"""How long remembered use counts. Long, because vLLM never evicts an idle adapter by
itself; it only bounds how long evictions by traffic we do not see go unnoticed."""

_NOTHING: frozenset[str] = frozenset()


def registration(view: EndpointView, adapter: str) -> bool | None:
    """Whether `adapter` is registered on the endpoint: True, False, or None when unknown.

    vLLM's model list and the sidecar's "loaded" both count: the sidecar reports a load
    the moment vLLM accepted it, possibly before the next model-list scrape shows it.
    A sidecar state other than loaded (loading, failed, ...) means known not registered.
    """
    registered = view.registered
    if registered is not None and adapter in registered:
        return True
    states = view.sidecar_states
    if states is not None:
        state = states.get(adapter)
        if state == AdapterState.LOADED:
            return True
        if state is not None:
            return False
    return None if registered is None else False


class _Memory:
    """This picker's memory of one endpoint, and the estimate derived from it.

    The estimate depends only on the endpoint's observations and our assignments, not on
    the request, so it is derived once and reused until one of its inputs changes: new
    metrics or model-list objects (a scrape; compared by identity, one pointer comparison
    each), an assignment, or the expiry of a remembered use it counted. The view it was
    last checked against is kept too: while the inventory hands out the same view object,
    one identity check tells that the observations did not change.
    """

    __slots__ = (
        "absent", "lru", "metrics", "pinned", "registered", "resident", "valid_until", "view"
    )  # fmt: skip

    def __init__(self) -> None:
        self.lru: dict[str, float] = {}
        """adapter → when it was last seen used (our assignment, or running or waiting in
        a scrape), oldest first."""
        self.view: EndpointView | None = None
        self.metrics: MetricsObservation | None = None
        self.registered: frozenset[str] | None = None
        """The observations the estimate was derived from."""
        self.resident: frozenset[str] = _NOTHING
        """Adapters believed in a GPU slot."""
        self.absent = Affinity.WARM
        """Where an adapter that is not resident stands: WARM while a slot is believed
        free, COLD once every slot is taken (it would evict one)."""
        self.pinned = False
        """Every slot holds an adapter with requests running (at the last scrape): vLLM
        cannot evict any of them, so a request for another adapter waits until one of
        them has no request left, however long that takes."""
        self.valid_until = -math.inf
        """When the estimate must be derived again even if nothing else changed."""


class ResidencyTracker:
    """The per-endpoint estimate described in the module doc. Every `now` is a reading of
    one monotonic clock, in seconds (the pipeline's)."""

    def __init__(
        self,
        *,
        default_max_lora: int = DEFAULT_MAX_LORA,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> None:
        if default_max_lora < 1:
            raise ValueError("default_max_lora must be at least 1")
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be positive")
        self.default_max_lora = default_max_lora
        self.idle_seconds = idle_seconds
        self._endpoints: dict[str, _Memory] = {}
        # The memory column: the memory of each view `classify_all` last saw, by position,
        # so that the hot path reads one list item per candidate instead of a dictionary
        # lookup and two freshness checks. What can make an entry out of date is tracked
        # instead: a new view at that position (`_pending` until the position is a
        # candidate: an estimate is brought up to date only when it is read, as when it
        # was looked up per request, so it sees the same scrapes), an assignment
        # (`_stale`), the earliest expiry of a remembered use (`_next_expiry`, a lower
        # bound), and `forget`, which replaces memory objects (`_forgotten`).
        self._views: list[EndpointView] = []
        self._column: list[_Memory] = []
        self._pending: set[int] = set()
        self._stale: list[_Memory] = []
        self._next_expiry = math.inf
        self._forgotten = False

    def record_assignment(
        self, address: str, adapter: str, now: float, max_lora: int | None = None
    ) -> None:
        """Remember that a request for `adapter` was just sent to `address`.

        `max_lora` is the endpoint's slot count when known; older assignments beyond
        it cannot still be resident on our evidence alone, so they are dropped.
        """
        memory = self._memory(address)
        trimmed = _touch(memory.lru, adapter, now, max_lora or self.default_max_lora)
        if trimmed or adapter not in memory.resident:
            # The resident set may have changed: derive it again. When an adapter that
            # was resident only moved up the LRU, the same adapters remain the most
            # recent ones and the estimate stands (at worst it is re-derived at an
            # expiry that no longer applies: that costs time, not correctness).
            memory.valid_until = -math.inf
            self._stale.append(memory)

    def forget(self, address: str) -> None:
        """Drop everything remembered about an endpoint. Call it when the endpoint leaves
        the pool (memory is kept per address until then), turns unready, or its address
        now belongs to another pod."""
        if self._endpoints.pop(address, None) is not None:
            self._forgotten = True

    def classify(self, view: EndpointView, adapter: str, now: float) -> Affinity:
        """Where `adapter` stands on the endpoint: HOT, WARM, COLD or MISSING (see module doc)."""
        memory = self._endpoints.get(view.address)
        if memory is None or memory.view is not view or now >= memory.valid_until:
            memory = self._refresh(view, now)
        return _classify([view], [view.loaded], [memory], [0], adapter, _AFFINITIES)[0]

    def classify_all(
        self, columns: Columns, candidates: list[int], adapter: str, now: float
    ) -> list[Affinity]:
        """`classify` for the candidates (indices into `columns`), in order."""
        memories = self._sync(columns.views, candidates, now)
        return _classify(columns.views, columns.loaded, memories, candidates, adapter, _AFFINITIES)

    def score_all(
        self,
        columns: Columns,
        candidates: list[int],
        adapter: str,
        now: float,
        scores: ByAffinity[float],
    ) -> list[float]:
        """`classify_all` with each affinity replaced by its score, in the same pass: the
        affinity scorer's hot path."""
        memories = self._sync(columns.views, candidates, now)
        return _classify(columns.views, columns.loaded, memories, candidates, adapter, scores)

    def _sync(self, views: list[EndpointView], candidates: list[int], now: float) -> list[_Memory]:
        """The memory column for `views`, up to date at the candidates' positions."""
        column, pending = self._column, self._pending
        if self._forgotten or len(views) != len(self._views):
            self._views = list(views)
            column = self._column = [self._memory(view.address) for view in views]
            pending.update(range(len(views)))
            self._forgotten = False
        else:
            for index in changed_positions(views, self._views):
                self._views[index] = views[index]
                pending.add(index)
        if pending:
            due = pending.intersection(candidates)
            for index in due:
                memory = column[index] = self._refresh(views[index], now)
                self._next_expiry = min(self._next_expiry, memory.valid_until)
            pending -= due
        if self._stale:
            for memory in self._stale:
                if now >= memory.valid_until and memory.view is not None:
                    self._derive(memory, memory.view, now)
            self._stale.clear()
        if now >= self._next_expiry:
            # Positions still pending keep their old view until they are read.
            for index, memory in enumerate(column):
                if now >= memory.valid_until and index not in pending:
                    self._derive(memory, views[index], now)
            self._next_expiry = min(
                (memory.valid_until for i, memory in enumerate(column) if i not in pending),
                default=math.inf,
            )
        return column

    def _refresh(self, view: EndpointView, now: float) -> _Memory:
        memory = self._memory(view.address)
        if (
            memory.metrics is not view.metrics
            or memory.registered is not view.registered
            or now >= memory.valid_until
        ):
            self._derive(memory, view, now)
        memory.view = view
        return memory

    def _memory(self, address: str) -> _Memory:
        memory = self._endpoints.get(address)
        if memory is None:
            memory = self._endpoints[address] = _Memory()
        return memory

    def _derive(self, memory: _Memory, view: EndpointView, now: float) -> None:
        registered, metrics = view.registered, view.metrics
        if registered is not None and registered is not memory.registered:
            _reconcile(memory.lru, registered)
        scraped = metrics is not memory.metrics
        memory.metrics, memory.registered = metrics, registered
        memory.valid_until = math.inf
        if metrics is None:
            active, capacity = _NOTHING, self.default_max_lora
            memory.pinned = False
        else:
            capacity = metrics.max_lora or self.default_max_lora
            memory.pinned = len(metrics.running_adapters) >= capacity
            if metrics.gpu_adapters is not None:  # authoritative: nothing else to consult
                memory.resident = metrics.gpu_adapters
                memory.absent = _absent(len(metrics.gpu_adapters), capacity)
                return
            active = metrics.running_adapters
            if metrics.waiting_adapters:
                active = active | metrics.waiting_adapters
            if scraped:
                # Used just now, so the last to be evicted once idle: remember them like
                # our own assignments (they may come from another picker replica).
                for name in _in_recency_order(memory.lru, active):
                    _touch(memory.lru, name, now, capacity)
        # Remembered adapters fill the free slots, most recent first, as vLLM's LRU would.
        remembered: list[str] = []
        used = len(active)
        for name, used_at in reversed(memory.lru.items()):
            if used >= capacity or now - used_at >= self.idle_seconds:
                break  # every older entry is evicted or expired too
            if name not in active:
                remembered.append(name)
                used += 1
                memory.valid_until = min(memory.valid_until, used_at + self.idle_seconds)
        memory.resident = active.union(remembered) if remembered else active
        memory.absent = _absent(used, capacity)
        self._next_expiry = min(self._next_expiry, memory.valid_until)


class ByAffinity(NamedTuple, Generic[T]):
    """A value for each affinity a classification can give (what `_classify` answers)."""

    hot: T
    warm: T
    cold: T
    pinned: T
    """COLD on an endpoint whose every slot is pinned by running requests (`_Memory.pinned`)."""
    missing: T


def by_affinity(values: Mapping[Affinity, T], pinned: T) -> ByAffinity[T]:
    return ByAffinity(
        values[Affinity.HOT], values[Affinity.WARM], values[Affinity.COLD], pinned,
        values[Affinity.MISSING],
    )  # fmt: skip


_AFFINITIES = ByAffinity(
    Affinity.HOT, Affinity.WARM, Affinity.COLD, Affinity.COLD, Affinity.MISSING
)  # fmt: skip


def _classify(
    views: list[EndpointView],
    loaded: list[frozenset[str]],
    memories: list[_Memory],
    candidates: list[int],
    adapter: str,
    values: ByAffinity[T],
) -> list[T]:
    """The affinity at each candidate index, as its item of `values`, from index-aligned
    views, their `loaded` sets and up-to-date memories. Known not registered comes first
    (MISSING); `loaded` answers most endpoints without the slower `registration`."""
    hot, warm, cold, pinned, missing = values
    free_slot = Affinity.WARM
    return [
        missing
        if adapter not in loaded[i] and registration(views[i], adapter) is False
        else hot
        if adapter in (memory := memories[i]).resident
        else warm
        if memory.absent is free_slot
        else pinned
        if memory.pinned
        else cold
        for i in candidates
    ]


def _absent(used: int, capacity: int) -> Affinity:
    return Affinity.COLD if used >= capacity else Affinity.WARM


def _touch(lru: dict[str, float], adapter: str, now: float, limit: int) -> bool:
    """Make `adapter` the most recently used; drop the oldest beyond `limit`. Whether any was."""
    lru.pop(adapter, None)
    lru[adapter] = now
    trimmed = len(lru) > limit
    while len(lru) > limit:
        del lru[next(iter(lru))]
    return trimmed


def _in_recency_order(lru: dict[str, float], used: frozenset[str]) -> list[str]:
    """`used` (adapters seen in use at the same moment) ordered for touching: those already
    remembered keep their relative order, the others follow by name. Never the set's own
    order, which follows the process's string-hash seed (a seeded run would not repeat),
    nor plain name order, which would make some names always count as the older."""
    remembered = [name for name in lru if name in used]
    if len(remembered) == len(used):
        return remembered
    return remembered + sorted(used.difference(remembered))


def _reconcile(lru: dict[str, float], registered: frozenset[str]) -> None:
    """Forget everything when vLLM no longer lists an adapter we remember: it was unloaded,
    or the process restarted with empty slots while the sidecar re-registers adapters.
    The two look alike from here, and after a restart nothing remembered is true."""
    if not registered.issuperset(lru):
        lru.clear()
