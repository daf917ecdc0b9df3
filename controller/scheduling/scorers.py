"""Scorers: each rates every candidate in [0, 1], higher is better, in candidate order.

A scorer sees the whole candidate list at once, because relative scores need the
spread across candidates and because one list comprehension per scorer is far cheaper
in CPython than a call per endpoint. Candidates are indices into the pipeline's columns
(see columns.py), whose figures are read once per changed view rather than per request.
The pipeline multiplies by the profile's weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast

from controller.scheduling.columns import Columns, known_or
from controller.scheduling.residency import ResidencyTracker, by_affinity
from controller.scheduling.types import Affinity, SchedulingRequest

NEUTRAL: Final = 0.5
"""The score of an endpoint whose figures are unknown: neither preferred nor avoided."""

AFFINITY_SCORES: Final[Mapping[Affinity, float]] = {
    Affinity.HOT: 1.0,
    Affinity.WARM: 0.8,
    Affinity.COLD: 0.4,
    Affinity.MISSING: 0.0,
}
"""Why these values (with the default weights: affinity 4, queue 2, in-flight 2, KV cache 2;
among pods with equal affinity the load decides: one more request in flight costs 0.4
points, one more waiting 1.07, the queue's 0.67 on top):

- HOT → WARM costs 0.2 (0.8 points): a free slot is filled from vLLM's CPU cache in
  milliseconds, so a request leaves a hot pod for a free slot once the hot pod has three
  more requests in flight, or one more waiting.
- WARM → COLD costs 0.4 (1.6 points), twice as much: on a full pod the request evicts
  another adapter that its users will pay to bring back. HOT → COLD (2.4 points) takes
  about five more waiting requests: a popular adapter spreads to more pods once its pods
  queue, not while their batches are merely busy (in-flight alone is worth under 2).
- PINNED_SCORE (below) sits between COLD and MISSING.
- COLD → MISSING costs the rest: a MISSING pod answers 404. The adapter-registered filter
  normally removes those; the value matters only when it had to keep them.
"""


PINNED_SCORE: Final = 0.1
"""A COLD endpoint whose every slot is pinned by running requests: the request waits there
until one of those adapters has no request left (vLLM evicts only idle adapters), which
at a full batch is a whole request's duration or more, not a swap of milliseconds. HOT →
pinned (3.6 points) is more than any realistic load difference: a request goes there only
when no pod holds its adapter or has a slot it could take. Reported as COLD."""


class LoraAffinityScorer:
    """Prefers endpoints where the target adapter is believed resident (see residency).

    An endpoint without fresh metrics is still scored from the tracker's estimate (our
    own assignments against the default slot count), not as unknown: that estimate is
    real evidence, and the load scorers already rate such an endpoint neutral.
    """

    name: Final = "lora-affinity"
    kind: Final = "scorer"

    def __init__(self, residency: ResidencyTracker) -> None:
        self._residency = residency
        self._scores = by_affinity(AFFINITY_SCORES, PINNED_SCORE)  # once: read on every decision

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        if not request.is_adapter:
            return [1.0] * len(candidates)  # the base model is always loaded
        target = request.target
        return self._residency.score_all(columns, candidates, target, now, self._scores)


QUEUE_SCALE: Final = 2.0
"""Waiting requests above the least loaded candidate at which the queue score halves."""

RUNNING_SCALE: Final = 8.0
"""The same for running requests: a few more sequences in a batch cost little."""

IN_FLIGHT_SCALE: Final = 4.0
"""The same for requests in flight (running, waiting and just sent)."""


def relative_load(loads: list[int | None], scale: float, all_known: bool = False) -> list[float]:
    """Score each load against the least loaded candidate: 1 for it, 1/2 at `scale` more.

    Relative, so that it adapts to the pool's load level, but not min-max normalised:
    a difference of one request must not swing the full weight the way it does when the
    spread is 0 to 1. Unknown loads (None) score NEUTRAL; `all_known` says there are none
    (the columns know it), which saves looking.
    """
    if not all_known and None in loads:  # rare: a missed scrape
        known = [load for load in loads if load is not None]
        if not known:
            return [NEUTRAL] * len(loads)
        base = min(known) - scale
        return [NEUTRAL if load is None else scale / (load - base) for load in loads]
    exact = cast(list[int], loads)  # no None in it
    low, high = _bounds(exact)
    if low == high:  # typical at low load: nobody waits
        return [1.0] * len(exact)
    base = low - scale
    return [scale / (load - base) for load in exact]


def _bounds(loads: list[int]) -> tuple[int, int]:
    """min(loads), max(loads) of a non-empty list, in one loop: compiled (see setup.py),
    a native loop over small ints, where the two builtin calls cost some 6,000
    instructions each at 64 endpoints."""
    low = high = loads[0]
    for load in loads:
        if load < low:
            low = load
        elif load > high:
            high = load
    return low, high


class _RelativeLoadScorer:
    """Scores a load figure per candidate (`loads`) with `relative_load`."""

    kind: Final = "scorer"

    def __init__(self, scale: float) -> None:
        if scale <= 0:
            raise ValueError("scale must be positive")
        self._scale = scale

    def loads(self, columns: Columns, candidates: list[int]) -> list[int | None]:
        raise NotImplementedError

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        return relative_load(self.loads(columns, candidates), self._scale, columns.all_known)


class QueueScorer(_RelativeLoadScorer):
    """Fewer waiting requests is better: a waiting request means the pod is already full."""

    name: Final = "queue"

    def __init__(self, scale: float = QUEUE_SCALE) -> None:
        super().__init__(scale)

    def loads(self, columns: Columns, candidates: list[int]) -> list[int | None]:
        return columns.gather(columns.waiting, candidates)


class RunningRequestsScorer(_RelativeLoadScorer):
    """Fewer running requests is better: a larger batch decodes each sequence more slowly,
    but mildly, hence a larger default scale than the queue's."""

    name: Final = "running-requests"

    def __init__(self, scale: float = RUNNING_SCALE) -> None:
        super().__init__(scale)

    def loads(self, columns: Columns, candidates: list[int]) -> list[int | None]:
        return columns.gather(columns.running, candidates)


class InFlightScorer(_RelativeLoadScorer):
    """Fewer requests in flight is better: running and waiting at the last scrape, plus
    those this picker sent since (`Columns.sent`). The queue alone is a late signal: a pod
    whose batch is full but has nobody waiting yet looks as good as an idle one, and every
    decision between two scrapes (50 ms, a few requests at moderate load) sees the same
    figures, so they would all pile onto the same pod."""

    name: Final = "in-flight"

    def __init__(self, scale: float = IN_FLIGHT_SCALE) -> None:
        super().__init__(scale)

    def loads(self, columns: Columns, candidates: list[int]) -> list[int | None]:
        in_flight, sent = columns.in_flight, columns.sent
        if columns.all_known:
            known = cast(list[int], in_flight)
            return [known[i] + sent[i] for i in candidates]
        return [None if (load := in_flight[i]) is None else load + sent[i] for i in candidates]


class KvCacheScorer:
    """More free KV cache is better (1 - usage), as upstream; unknown is NEUTRAL."""

    name: Final = "kv-cache"
    kind: Final = "scorer"

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        return known_or(columns.gather(columns.kv_free, candidates), NEUTRAL, columns.all_known)
