"""Scheduling profiles: a small YAML document naming the plugins of a Pipeline.

    filters: [ready, subset, adapter-registered]     # names, or {name: ..., <parameters>}
    scorers:                                         # weight 1 unless given, as upstream
      - {name: lora-affinity, weight: 2}
      - {name: queue, weight: 2, scale: 2}           # parameters sit next to name/weight
      - {name: kv-cache, weight: 2}
    picker: {name: max-score, fallbacks: 2}
    saturation: {queue_threshold: 5, kv_threshold: 0.8}
    residency: {default_max_lora: 4, idle_seconds: 300}

Every key is optional (defaults: no filters, no scorers, max-score without fallbacks,
the saturation and residency defaults). A mistake raises ProfileError naming where it
is and what would have been valid; nothing is silently ignored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import yaml

from controller.scheduling.filters import (
    AdapterRegisteredFilter,
    ReadyFilter,
    SaturationThresholds,
    SubsetFilter,
    saturated,
)
from controller.scheduling.pickers import MaxScorePicker
from controller.scheduling.pipeline import Filter, Picker, Pipeline, Scorer
from controller.scheduling.residency import (
    DEFAULT_IDLE_SECONDS,
    DEFAULT_MAX_LORA,
    ResidencyTracker,
)
from controller.scheduling.scorers import (
    IN_FLIGHT_SCALE,
    QUEUE_SCALE,
    RUNNING_SCALE,
    InFlightScorer,
    KvCacheScorer,
    LoraAffinityScorer,
    QueueScorer,
    RunningRequestsScorer,
)
from controller.scheduling.upstream import (
    UPSTREAM_PROFILE,
    UpstreamKvCacheScorer,
    UpstreamLoraAffinityScorer,
    UpstreamQueueScorer,
)

__all__ = [
    "DEFAULT_PROFILE",
    "UPSTREAM_PROFILE",
    "ProfileError",
    "SaturationThresholds",
    "load_profile",
    "plugin_names",
    "saturated",
]

DEFAULT_PROFILE: Final = """\
filters: [ready, subset, adapter-registered]
scorers:
  - {name: lora-affinity, weight: 4}
  - {name: queue, weight: 2}
  - {name: kv-cache, weight: 2}
  - {name: in-flight, weight: 2}
picker: {name: max-score, fallbacks: 2}
saturation: {queue_threshold: 5, kv_threshold: 0.8}
residency: {default_max_lora: 4, idle_seconds: 300}
"""
"""Ours: LoRA affinity balanced against load (see scorers.AFFINITY_SCORES). With only the
queue and KV cache against it, affinity at weight 4 out-weighed any queue once every pod's
slots were full, so a popular adapter stayed on the few pods that grabbed it first and
queued there; at weight 2 it spread, but a pod with a full batch and nobody waiting yet
still looked idle, and every decision between two scrapes saw the same figures. The
in-flight scorer (which counts what this picker sent since the last scrape) answers
both, with affinity back at 4 to keep swaps down (bench/RESULTS.md, routing quality)."""


class ProfileError(ValueError):
    """A profile that cannot be built; the message says where and what is valid."""


class _Args:
    """The parameters of one profile entry, read with checks and then closed."""

    def __init__(self, where: str, values: Mapping[str, Any], rng: random.Random | None) -> None:
        self.where = where
        self.rng = rng
        self._values = dict(values)

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self._values.pop(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (positive and value == 0)
        ):
            wanted = "a positive number" if positive else "a number >= 0"
            raise ProfileError(f"{self.where}.{key}: expected {wanted}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self._values.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ProfileError(
                f"{self.where}.{key}: expected an integer >= {minimum}, got {value!r}"
            )
        return value

    def close(self, accepted: tuple[str, ...]) -> None:
        if self._values:
            raise ProfileError(
                f"{self.where}: unknown key {sorted(self._values)[0]!r}; "
                f"valid keys: {', '.join(accepted)}"
            )


P = TypeVar("P", covariant=True)


@dataclass(frozen=True)
class _Plugin(Generic[P]):
    build: Callable[[_Args, ResidencyTracker], P]
    parameters: tuple[str, ...] = ()


def _no_parameters(cls: Callable[[], P]) -> _Plugin[P]:
    return _Plugin(lambda _args, _residency: cls())


_FILTERS: Final[Mapping[str, _Plugin[Filter]]] = {
    ReadyFilter.name: _no_parameters(ReadyFilter),
    SubsetFilter.name: _no_parameters(SubsetFilter),
    AdapterRegisteredFilter.name: _no_parameters(AdapterRegisteredFilter),
}

_SCORERS: Final[Mapping[str, _Plugin[Scorer]]] = {
    LoraAffinityScorer.name: _Plugin(lambda _args, residency: LoraAffinityScorer(residency)),
    QueueScorer.name: _Plugin(
        lambda args, _residency: QueueScorer(args.number("scale", QUEUE_SCALE, positive=True)),
        ("scale",),
    ),
    RunningRequestsScorer.name: _Plugin(
        lambda args, _residency: RunningRequestsScorer(
            args.number("scale", RUNNING_SCALE, positive=True)
        ),
        ("scale",),
    ),
    InFlightScorer.name: _Plugin(
        lambda args, _residency: InFlightScorer(
            args.number("scale", IN_FLIGHT_SCALE, positive=True)
        ),
        ("scale",),
    ),
    KvCacheScorer.name: _no_parameters(KvCacheScorer),
    UpstreamQueueScorer.name: _no_parameters(UpstreamQueueScorer),
    UpstreamKvCacheScorer.name: _no_parameters(UpstreamKvCacheScorer),
    UpstreamLoraAffinityScorer.name: _no_parameters(UpstreamLoraAffinityScorer),
}

_PICKERS: Final[Mapping[str, _Plugin[Picker]]] = {
    MaxScorePicker.name: _Plugin(
        lambda args, _residency: MaxScorePicker(
            args.integer("fallbacks", 0, minimum=0), rng=args.rng
        ),
        ("fallbacks",),
    ),
}

_REGISTRIES: Final[Mapping[str, Mapping[str, _Plugin[Any]]]] = {
    "filter": _FILTERS,
    "scorer": _SCORERS,
    "picker": _PICKERS,
}

_TOP_LEVEL: Final = ("filters", "scorers", "picker", "saturation", "residency")


def plugin_names(kind: str) -> list[str]:
    """The registered names of one kind: "filter", "scorer" or "picker"."""
    return sorted(_REGISTRIES[kind])


def load_profile(
    profile: str | Mapping[str, Any] = DEFAULT_PROFILE, *, rng: random.Random | None = None
) -> Pipeline:
    """Build a Pipeline from YAML text or an already parsed mapping.

    `rng` drives the picker's tie-breaks; pass a seeded one for reproducible runs.
    Raises ProfileError.
    """
    document = _parse(profile)
    unknown = sorted(set(document) - set(_TOP_LEVEL))
    if unknown:
        raise ProfileError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(_TOP_LEVEL)}")
    residency = _residency(document.get("residency", {}))
    filters = [
        _plugin(_FILTERS, "filter", f"filters[{i}]", entry, residency, rng)
        for i, entry in enumerate(_sequence(document, "filters"))
    ]
    scorers = [
        _weighted(f"scorers[{i}]", entry, residency, rng)
        for i, entry in enumerate(_sequence(document, "scorers"))
    ]
    names = [scorer.name for scorer, _ in scorers]
    for name in names:
        if names.count(name) > 1:
            raise ProfileError(f"scorers: {name!r} is listed twice")
    picker = _plugin(
        _PICKERS, "picker", "picker", document.get("picker", MaxScorePicker.name), residency, rng
    )
    return Pipeline(
        filters, scorers, picker, residency, _saturation(document.get("saturation", {}))
    )


def _parse(profile: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(profile, str):
        try:
            profile = yaml.safe_load(profile)
        except yaml.YAMLError as error:
            raise ProfileError(f"profile is not valid YAML: {error}") from error
    if not isinstance(profile, Mapping):
        raise ProfileError(f"profile must be a mapping, got {type(profile).__name__}")
    return profile


def _sequence(document: Mapping[str, Any], key: str) -> list[Any]:
    value = document.get(key, [])
    if not isinstance(value, list):
        raise ProfileError(f"{key}: expected a list, got {value!r}")
    return value


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(f"{where}: expected a mapping, got {value!r}")
    return value


def _plugin(
    registry: Mapping[str, _Plugin[P]],
    kind: str,
    where: str,
    entry: Any,
    residency: ResidencyTracker,
    rng: random.Random | None,
) -> P:
    """Build one filter, scorer or picker from a name or a {name: ..., <parameters>} mapping."""
    entry = _entry(kind, where, entry)
    name = entry.pop("name", None)
    plugin = registry.get(name) if isinstance(name, str) else None
    if plugin is None:
        raise ProfileError(
            f"{where}: {_describe(kind, name)}; valid {kind}s: {', '.join(sorted(registry))}"
        )
    args = _Args(f"{where} ({name})", entry, rng)
    built = plugin.build(args, residency)
    args.close(("name", *(("weight",) if kind == "scorer" else ()), *plugin.parameters))
    return built


def _entry(kind: str, where: str, entry: Any) -> dict[str, Any]:
    """A plugin entry is a bare name or a mapping with `name` and parameters."""
    if isinstance(entry, str):
        return {"name": entry}
    if isinstance(entry, Mapping):
        return dict(entry)
    raise ProfileError(f"{where}: expected a {kind} name or a mapping, got {entry!r}")


def _describe(kind: str, name: Any) -> str:
    if not isinstance(name, str):
        return f"expected a {kind} name, got {name!r}"
    for other, registry in _REGISTRIES.items():
        if name in registry:
            return f"{name!r} is a {other}, not a {kind}"
    return f"unknown {kind} {name!r}"


def _weighted(
    where: str, entry: Any, residency: ResidencyTracker, rng: random.Random | None
) -> tuple[Scorer, float]:
    entry = _entry("scorer", where, entry)
    weight = _Args(where, {"weight": entry.pop("weight", 1.0)}, rng).number("weight", 1.0)
    return _plugin(_SCORERS, "scorer", where, entry, residency, rng), weight


def _saturation(value: Any) -> SaturationThresholds:
    args = _Args("saturation", _mapping("saturation", value), None)
    defaults = SaturationThresholds()
    thresholds = SaturationThresholds(
        queue_threshold=args.integer("queue_threshold", defaults.queue_threshold, minimum=0),
        kv_threshold=args.number("kv_threshold", defaults.kv_threshold, positive=True),
    )
    args.close(("queue_threshold", "kv_threshold"))
    if thresholds.kv_threshold > 1:
        raise ProfileError(
            f"saturation.kv_threshold: expected at most 1, got {thresholds.kv_threshold}"
        )
    return thresholds


def _residency(value: Any) -> ResidencyTracker:
    args = _Args("residency", _mapping("residency", value), None)
    tracker = ResidencyTracker(
        default_max_lora=args.integer("default_max_lora", DEFAULT_MAX_LORA, minimum=1),
        idle_seconds=args.number("idle_seconds", DEFAULT_IDLE_SECONDS, positive=True),
    )
    args.close(("default_max_lora", "idle_seconds"))
    return tracker
