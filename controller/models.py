"""Model resolution: the `model` a client sends → the target model that serves it.

Weights come from InferenceModel v1alpha2 (`spec.targetModels`) or
InferenceModelRewrite (`spec.rules[].targets`). With a sticky key (e.g. a user
id header) the choice is a consistent hash: each key owns a fixed point in
[0, total weight), and targets own consecutive ranges in the order they are
listed. Shifting weight from the first target to the second therefore only
ever moves users forward, never back and forth, during a canary.

The sticky header is the controller's `--sticky-header`, or per object the
`loractl.io/sticky-header` annotation, which a rollout with `spec.stickiness`
writes together with the weights.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from controller.scheduling.types import Criticality
from loractl.flags import header_problem

INFERENCE_MODEL = "InferenceModel"
INFERENCE_MODEL_REWRITE = "InferenceModelRewrite"
STICKY_HEADER_ANNOTATION = "loractl.io/sticky-header"


class ModelConfigError(ValueError):
    """An InferenceModel or Rewrite the picker cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class WeightedTarget:
    name: str
    weight: int


@dataclass(frozen=True)
class ModelRoute:
    model: str
    targets: tuple[WeightedTarget, ...]
    criticality: Criticality = Criticality.STANDARD
    pool: str | None = None
    source: str = ""  # "InferenceModel/ns/name", for messages
    sticky_header: str | None = None
    """Lower case, as Envoy passes header names; None: the controller's own, if any."""

    def choose(self, sticky_key: str | None, rng: random.Random) -> str:
        if len(self.targets) == 1:
            return self.targets[0].name
        total = sum(t.weight for t in self.targets)
        if sticky_key is None:
            point = rng.randrange(total)
        else:
            digest = hashlib.blake2b(f"{self.model}\0{sticky_key}".encode(), digest_size=8)
            point = int.from_bytes(digest.digest()) % total
        for target in self.targets:
            if point < target.weight:
                return target.name
            point -= target.weight
        raise AssertionError("unreachable: point is below the total weight")


class ModelTable:
    """Every model name the pool serves, from the InferenceModel / Rewrite objects, and what
    was wrong with the objects it could not use (or used without their sticky header)."""

    def __init__(self, routes: Iterable[ModelRoute] = (), errors: Iterable[str] = ()) -> None:
        self._routes = {route.model: route for route in routes}
        self.errors = tuple(errors)

    def resolve(self, model: str) -> ModelRoute | None:
        return self._routes.get(model)

    def routes(self) -> list[ModelRoute]:
        return list(self._routes.values())

    @classmethod
    def from_objects(
        cls, objects: Iterable[Mapping[str, Any]], pool: str | None = None
    ) -> ModelTable:
        """Build from API objects; bad objects are skipped and their errors kept in `errors`."""
        routes: list[ModelRoute] = []
        errors: list[str] = []
        for obj in objects:
            try:
                found = list(routes_from_object(obj))
            except ModelConfigError as exc:
                errors.append(str(exc))
                continue
            header, problem = sticky_header(obj)
            if problem is not None:
                errors.append(problem)  # the object still routes, without stickiness
            routes.extend(
                r if header is None else replace(r, sticky_header=header)
                for r in found
                if pool is None or r.pool in (None, pool)
            )
        return cls(routes, errors)


def routes_from_object(obj: Mapping[str, Any]) -> Iterable[ModelRoute]:
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    source = f"{kind}/{meta.get('namespace', '')}/{meta.get('name', '?')}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise ModelConfigError(f"{source}: no spec")
    pool = (spec.get("poolRef") or {}).get("name")
    if kind == INFERENCE_MODEL:
        yield _inference_model(spec, source, pool)
    elif kind == INFERENCE_MODEL_REWRITE:
        yield from _rewrite(spec, source, pool)
    else:
        raise ModelConfigError(
            f"{source}: kind must be {INFERENCE_MODEL} or {INFERENCE_MODEL_REWRITE}"
        )


def sticky_header(obj: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The object's sticky header annotation, lower case, or why it cannot be used."""
    meta = obj.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(STICKY_HEADER_ANNOTATION)
    if value is None:
        return None, None
    problem = header_problem(value) if isinstance(value, str) else "not a string"
    if problem is not None:
        source = f"{obj.get('kind')}/{meta.get('namespace', '')}/{meta.get('name', '?')}"
        return None, f"{source}: annotation {STICKY_HEADER_ANNOTATION} {problem}"
    return value.lower(), None


def _inference_model(spec: Mapping[str, Any], source: str, pool: str | None) -> ModelRoute:
    model = spec.get("modelName")
    if not isinstance(model, str) or not model:
        raise ModelConfigError(f"{source}: spec.modelName is required")
    raw_targets = spec.get("targetModels") or [{"name": model}]
    targets = _targets(raw_targets, "name", source, "spec.targetModels")
    try:
        criticality = Criticality(spec.get("criticality") or Criticality.STANDARD)
    except ValueError as exc:
        raise ModelConfigError(
            f"{source}: spec.criticality {spec.get('criticality')!r} is not one of "
            f"{', '.join(c.value for c in Criticality)}"
        ) from exc
    return ModelRoute(model, targets, criticality, pool, source)


def _rewrite(spec: Mapping[str, Any], source: str, pool: str | None) -> Iterable[ModelRoute]:
    for index, rule in enumerate(spec.get("rules") or []):
        where = f"spec.rules[{index}]"
        targets = _targets(rule.get("targets") or [], "modelRewrite", source, f"{where}.targets")
        for match in rule.get("matches") or []:
            model = (match.get("model") or {}).get("value")
            if not isinstance(model, str) or not model:
                raise ModelConfigError(f"{source}: {where}.matches[].model.value is required")
            yield ModelRoute(model, targets, Criticality.STANDARD, pool, source)


def _targets(raw: Any, name_key: str, source: str, where: str) -> tuple[WeightedTarget, ...]:
    if not isinstance(raw, list) or not raw:
        raise ModelConfigError(f"{source}: {where} must be a non-empty list")
    weights = [t.get("weight") for t in raw]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        raise ModelConfigError(f"{source}: {where}: set a weight on every target or on none")
    targets = []
    for item in raw:
        name = item.get(name_key)
        weight = item.get("weight", 1)
        if not isinstance(name, str) or not name:
            raise ModelConfigError(f"{source}: {where}[].{name_key} is required")
        if not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise ModelConfigError(
                f"{source}: {where}: weight {weight!r} of {name!r} must be 0..1000000"
            )
        targets.append(WeightedTarget(name, weight))
    if sum(t.weight for t in targets) == 0:
        raise ModelConfigError(f"{source}: {where}: the weights add up to 0")
    return tuple(t for t in targets if t.weight > 0)
