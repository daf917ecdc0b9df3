"""Pickers: turn the candidates' total scores into the endpoints to send to, best first."""

from __future__ import annotations

import random
from typing import Final


class MaxScorePicker:
    """The highest total first, then up to `fallbacks` runners-up, as upstream's max-score
    picker with maxNumOfEndpoints = 1 + fallbacks.

    Equal totals are ordered uniformly at random (upstream shuffles every candidate and
    then sorts stably; the outcome has the same distribution), so that a pool where many
    endpoints tie, as at start-up, is not fed in inventory order. Only the ties that reach
    the returned prefix are drawn, which keeps the cost independent of how many endpoints
    tie. Seed `rng` for reproducible runs.
    """

    name: Final = "max-score"
    kind: Final = "picker"

    def __init__(self, fallbacks: int = 0, rng: random.Random | None = None) -> None:
        if fallbacks < 0:
            raise ValueError("fallbacks must not be negative")
        self.fallbacks = fallbacks
        self._rng = rng or random.Random()

    def pick(self, totals: list[float]) -> list[int]:
        """Indices into `totals`, best first: 1 + fallbacks of them, or all if fewer."""
        wanted = min(len(totals), 1 + self.fallbacks)
        if wanted == 0:
            return []
        # Only the candidates scoring at least the wanted-th best can be returned: those,
        # ties with the last one included, are the head of the best-first order, so only
        # they are sorted. Stable: ties stay in input order until drawn below.
        last = max(totals) if wanted == 1 else sorted(totals, reverse=True)[wanted - 1]
        order = [i for i in range(len(totals)) if totals[i] >= last]
        order.sort(key=totals.__getitem__, reverse=True)
        count = len(order)
        start = 0
        while start < wanted:
            score = totals[order[start]]
            end = start + 1
            while end < count and totals[order[end]] == score:
                end += 1
            if end - start > 1:
                # When the tie runs past the prefix, the tail left behind may repeat
                # drawn indices; it is cut off below and never read again.
                taken = min(end, wanted) - start
                order[start : start + taken] = self._rng.sample(order[start:end], taken)
            start = end
        return order[:wanted]
