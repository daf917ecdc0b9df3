"""What a scheduling decision is made from and what it produces."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from controller.inventory import EndpointView


class Criticality(enum.StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"


class Affinity(enum.StrEnum):
    """Where the target adapter stood on the chosen endpoint when it was picked."""

    HOT = "hot"  # in a GPU slot (or believed to be)
    WARM = "warm"  # registered, and a GPU slot is free
    COLD = "cold"  # registered, but would need to evict another adapter
    MISSING = "missing"  # not registered there
    BASE = "base"  # a base-model request: no adapter involved


@dataclass(frozen=True)
class SchedulingRequest:
    model: str  # the name the client asked for
    target: str  # the resolved target model name (an adapter name, or the base model)
    is_adapter: bool  # False when target is the base model
    criticality: Criticality = Criticality.STANDARD
    subset: frozenset[str] | None = None  # addresses from the gateway's subset hint
    headers: Mapping[str, str] = field(default_factory=dict)


TOTAL: Final = "total"
"""Key of the weighted sum in SchedulingResult.scores, next to each scorer's own score."""


# Ranking and SchedulingResult are built once per decision: not frozen, because compiled
# (setup.py) a frozen dataclass costs thousands of instructions to build, a plain one tens.
@dataclass
class Ranking:
    """How the pipeline scored the candidates: each scorer's scores and the weighted totals,
    one item per candidate, and the candidates it returned (positions, best first)."""

    names: tuple[str, ...]
    scores: list[list[float]]
    totals: list[float]
    chosen: list[int]


@dataclass
class SchedulingResult:
    endpoints: list[EndpointView]  # best first; the rest are fallbacks
    affinity: Affinity
    ranking: Ranking | None = None  # None when nothing was scored

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """address → scorer name (and TOTAL) → score of each returned endpoint, for
        debugging and logs: built when asked, since no decision needs it."""
        ranking = self.ranking
        if ranking is None:
            return {}
        scores: dict[str, dict[str, float]] = {}
        for view, index in zip(self.endpoints, ranking.chosen, strict=True):
            columns = zip(ranking.names, ranking.scores, strict=True)
            by_name = {name: column[index] for name, column in columns}
            by_name[TOTAL] = ranking.totals[index]
            scores[view.address] = by_name
        return scores
