"""What a scheduling decision is made from and what it produces."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class SchedulingResult:
    endpoints: list[EndpointView]  # best first; the rest are fallbacks
    affinity: Affinity
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """address → scorer name → score, for debugging and logs."""
