"""The controller's view of the cluster: the few reads and writes a rollout performs.

Two implementations share this interface: the Kubernetes API (`controller.backend.kube`)
and a directory of YAML files (local mode, `controller.backend.local`). Everything above
the interface is the same code in both modes, so nothing here speaks HTTP: a resource
version is an opaque string that changes whenever its object changes, and errors are the
classes below.

Reads come from caches the backend keeps current: cheap, synchronous, possibly a moment
behind the source. Writes are async, idempotent (nothing is written when nothing would
change) and conflict-safe: a compare-and-swap on the object's version, re-read and retried
a bounded number of times, never a blind overwrite.

The document edits are defined here too, as pure functions, so that both modes edit the
adapter ConfigMap and the traffic split in exactly the same way.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import structlog
import yaml

from controller.models import (
    INFERENCE_MODEL,
    INFERENCE_MODEL_REWRITE,
    STICKY_HEADER_ANNOTATION,
    WeightedTarget,
    sticky_header,
)
from controller.rollout.spec import GROUP, KIND, PLURAL, VERSION
from sidecar.config import ROOT_KEY, id_problem, parse_config
from sidecar.sources import SourceError, parse_source

log = structlog.get_logger("controller")
T = TypeVar("T")

# One definition of the API: the rollout models own it.
ROLLOUT_GROUP = GROUP
ROLLOUT_VERSION = VERSION
ROLLOUT_API_VERSION = f"{GROUP}/{VERSION}"
ROLLOUT_KIND = KIND
ROLLOUT_PLURAL = PLURAL
MAX_WEIGHT = 1_000_000  # InferenceModel's and InferenceModelRewrite's bound

EventType = Literal["Normal", "Warning"]


# ---- errors: what the layer above may catch, the same for every backend ----


class BackendError(RuntimeError):
    """A read or write that could not be done; the message names the object and why."""


class NotFoundError(BackendError):
    """The object does not exist (or no longer routes the model)."""


class AlreadyExistsError(BackendError):
    """create_rollout: an object of that name exists."""


class ConflictError(BackendError):
    """Another writer changed the object before each of our attempts; we gave up."""


class StaleError(BackendError):
    """The object is no longer at the version the caller computed from: nothing was
    written. Read it again (the change notification follows) and decide again."""


# ---- plain data ----


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""  # empty where the source has none (local files)


@dataclass(frozen=True)
class StoredRollout:
    """An AdapterRollout as stored. Treat spec and status as read-only: they are copies,
    but a change to them is written nowhere."""

    ref: ObjectRef
    spec: dict[str, Any]
    status: dict[str, Any]
    resource_version: str
    generation: int


@dataclass(frozen=True)
class TrafficSplit:
    """How one model name is split among its targets, and the object that says so: an
    InferenceModel, or the InferenceModelRewrite whose first matching rule routes it."""

    ref: ObjectRef
    model_name: str
    targets: tuple[WeightedTarget, ...]  # in listed order, zero weights kept
    pool: str | None
    resource_version: str
    sticky_header: str | None = None
    """The object's sticky header annotation (lower case), which the picker hashes."""

    def weights(self) -> dict[str, int]:
        return {target.name: target.weight for target in self.targets}


# ---- the interface ----


class Backend(Protocol):
    """Where rollouts, traffic splits, pools and adapter ConfigMaps live, for one namespace."""

    async def start(self) -> None:
        """Starts watching; returns once every cache has been filled once (a source that
        is not installed counts as filled, and empty)."""

    async def stop(self) -> None:
        """Stops watching; no change is notified after it returns."""

    def on_change(self, callback: Callable[[], None]) -> None:
        """Registers a callback, called on the event loop (after start) whenever anything
        watched changed, including the backend's own writes. It says nothing about what
        changed: read again what matters."""

    def rollouts(self) -> list[StoredRollout]:
        """Every rollout, by name."""

    def rollout(self, name: str) -> StoredRollout | None: ...

    def inference_model(self, model_name: str, pool: str | None = None) -> TrafficSplit | None:
        """The split of the model name, from its InferenceModel (spec.modelName) or else
        from the first InferenceModelRewrite rule matching it; only objects whose poolRef
        names `pool`, when given. None when there is none. With several candidates, the
        first by object name wins."""

    def pool(self, name: str) -> bool:
        """Whether an InferencePool of that name exists (under either API version)."""

    def configmap(self, name: str) -> dict[str, str] | None:
        """The ConfigMap's data, or None when it does not exist."""

    async def ensure_adapters(
        self, configmap: str, key: str, listed: Mapping[str, str], removed: Collection[str]
    ) -> bool:
        """Edits the adapter document under `key`: every id in `listed` in ensureExist with
        that source, every id in `removed` moved to ensureNotExist; see
        `edit_adapter_config`. True when it wrote, False when the document already said so.
        Raises NotFoundError (no ConfigMap), BackendError (no such key, or a document the
        sidecars would reject), ConflictError, ValueError (bad ids or sources)."""

    async def set_weights(
        self,
        model_name: str,
        weights: Mapping[str, int],
        pool: str | None = None,
        sticky: str | None = None,
    ) -> bool:
        """Makes the split `inference_model(model_name, pool)` finds exactly `weights`, and
        its sticky header `sticky` when given; see `routing_patch`. True when it wrote.
        Raises NotFoundError, ConflictError, ValueError (bad weights)."""

    async def update_rollout_status(
        self, name: str, status: Mapping[str, Any], expected_resource_version: str
    ) -> str:
        """Replaces the status, provided the rollout is still at that version (the status
        was computed from it); returns the new version. Not retried: a conflict raises
        StaleError. None values mean absent."""

    async def patch_rollout_spec(
        self, name: str, patch: Mapping[str, Any], expected_resource_version: str | None = None
    ) -> str:
        """Merges `patch` into the spec (JSON merge patch: None deletes a key, lists are
        replaced); returns the new version. With an expected version it is conditional
        (StaleError on a mismatch); without, only the named fields change."""

    async def create_rollout(self, obj: Mapping[str, Any]) -> StoredRollout:
        """Creates an AdapterRollout from a manifest (apiVersion, kind and namespace are
        filled in). Raises AlreadyExistsError."""

    async def emit_event(
        self, involved: ObjectRef, event_type: EventType, reason: str, message: str
    ) -> None:
        """Records an event about an object for `kubectl describe`; repeats of the same
        event are counted on one record. Best effort: failures are logged, never raised."""


# ---- the adapter document edit ----


def edit_adapter_config(
    text: str, listed: Mapping[str, str], removed: Collection[str]
) -> str | None:
    """The adapter document (upstream lora-syncer schema) with every id of `listed` in
    ensureExist with its source (added, or its source replaced) and out of ensureNotExist,
    and every id of `removed` moved from ensureExist to ensureNotExist. Every other entry,
    key and top-level key is kept as it was. None when the document already says all that.
    A removed id that is not in ensureExist is left alone: there is no source to name it by.

    Raises ConfigError when the document is not one the sidecars accept (editing it would
    hide the problem), ValueError for an unsafe id or an unknown source form. PyYAML does
    not keep comments: a rewritten document loses them.
    """
    _check_adapters(listed, removed)
    parse_config(text)  # raises ConfigError; past it, the shape below is known to hold
    document = yaml.safe_load(text)
    edited = copy.deepcopy(document)
    config = edited[ROOT_KEY]
    for adapter_id, source in listed.items():
        _take_out(config, "ensureNotExist", adapter_id)
        _ensure_exists(config, adapter_id, source)
    for adapter_id in removed:
        taken = _take_out(config, "ensureExist", adapter_id)
        if taken and not _entries(config, "ensureNotExist", adapter_id):
            _models(config, "ensureNotExist").append(taken[0])
    if edited == document:
        return None
    new_text = yaml.safe_dump(edited, sort_keys=False, allow_unicode=True)
    parse_config(new_text)  # what we write must parse as surely as what we read
    return new_text


def _check_adapters(listed: Mapping[str, str], removed: Collection[str]) -> None:
    both = sorted(set(listed) & set(removed))
    if both:
        raise ValueError(f"adapters both listed and removed: {', '.join(both)}")
    for adapter_id in [*listed, *removed]:
        problem = id_problem(adapter_id)
        if problem:
            raise ValueError(problem)
    for adapter_id, source in listed.items():
        try:
            parse_source(source)
        except SourceError as error:
            raise ValueError(f"adapter {adapter_id!r}: {error}") from error


def _models(config: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """The section's model list, created when absent (upstream allows `section:` empty)."""
    if not isinstance(config.get(section), dict):
        config[section] = {}
    if config[section].get("models") is None:
        config[section]["models"] = []
    models: list[dict[str, Any]] = config[section]["models"]
    return models


def _entries(config: dict[str, Any], section: str, adapter_id: str) -> list[dict[str, Any]]:
    models = (config.get(section) or {}).get("models") or []
    return [entry for entry in models if entry.get("id") == adapter_id]


def _take_out(config: dict[str, Any], section: str, adapter_id: str) -> list[dict[str, Any]]:
    """Removes the id's entries from the section; returns them. Sections are touched only
    when they hold the id, so that an unchanged document compares equal."""
    taken = _entries(config, section, adapter_id)
    if taken:
        models = _models(config, section)
        models[:] = [entry for entry in models if entry.get("id") != adapter_id]
    return taken


def _ensure_exists(config: dict[str, Any], adapter_id: str, source: str) -> None:
    entries = _entries(config, "ensureExist", adapter_id)
    if not entries:
        _models(config, "ensureExist").append({"id": adapter_id, "source": source})
    for entry in entries:
        if entry.get("source") != source:
            entry["source"] = source
            # A revision pinned the old source; applied to the new one it would be wrong.
            entry.pop("revision", None)


# ---- the traffic split ----


def traffic_split(obj: Mapping[str, Any], model_name: str) -> TrafficSplit | None:
    """The split `obj` (an InferenceModel or InferenceModelRewrite) gives the model name,
    or None when it does not route that name. A target without a weight counts 1, as the
    picker counts it (weights are set on all targets or on none)."""
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    found = _routing(obj, model_name)
    if found is None:
        return None
    entries, name_key = found
    ref = ObjectRef(
        str(obj.get("apiVersion") or ""),
        str(obj.get("kind") or ""),
        str(metadata.get("namespace") or ""),
        str(metadata.get("name") or ""),
        str(metadata.get("uid") or ""),
    )
    targets = tuple(WeightedTarget(str(entry.get(name_key)), _weight(entry)) for entry in entries)
    pool = (spec.get("poolRef") or {}).get("name")
    version = str(metadata.get("resourceVersion") or "")
    return TrafficSplit(ref, model_name, targets, pool, version, sticky_header(obj)[0])


def routing_patch(
    obj: Mapping[str, Any],
    model_name: str,
    weights: Mapping[str, int],
    sticky: str | None = None,
) -> dict[str, Any] | None:
    """The merge patch of obj that routes the model to exactly `weights` (`reweighted_spec`)
    and, given a `sticky` header, names it in the annotation the picker reads, in one write:
    users are pinned from the first weight that moves them. None when nothing changes."""
    patch: dict[str, Any] = {}
    spec = reweighted_spec(obj, model_name, weights)
    if spec is not None:
        patch["spec"] = spec
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if sticky is not None and annotations.get(STICKY_HEADER_ANNOTATION) != sticky:
        patch["metadata"] = {"annotations": {STICKY_HEADER_ANNOTATION: sticky}}
    return patch or None


def _weight(entry: Mapping[str, Any]) -> int:
    # The CRD schemas make weights integers; an absent one is an equal share.
    weight = entry.get("weight")
    return weight if isinstance(weight, int) else 1


def reweighted_spec(
    obj: Mapping[str, Any], model_name: str, weights: Mapping[str, int]
) -> dict[str, Any] | None:
    """The part of obj's spec to merge so that the model's targets are exactly `weights`:
    listed targets keep their place and their other keys, new ones are appended in the
    order given, the others are dropped. Order matters: with sticky routing each target
    owns a consecutive hash range, so keeping it moves users only from the old target to
    the new one. None when nothing changes; NotFoundError when obj does not route the model.
    """
    _check_weights(weights)
    spec = obj.get("spec") or {}
    found = _routing(obj, model_name)
    if found is None:
        name = (obj.get("metadata") or {}).get("name")
        raise NotFoundError(f"{obj.get('kind')} {name} no longer routes model {model_name!r}")
    entries, name_key = found
    present = {entry.get(name_key) for entry in entries}
    targets = [
        {**entry, "weight": weights[entry[name_key]]}
        for entry in entries
        if entry.get(name_key) in weights
    ] + [
        {name_key: name, "weight": weight}
        for name, weight in weights.items()
        if name not in present
    ]
    if targets == entries:
        return None
    if obj.get("kind") == INFERENCE_MODEL:
        return {"targetModels": targets}
    # A merge patch replaces lists whole: send every rule, only this one changed.
    rules = copy.deepcopy(spec.get("rules") or [])
    rules[_matching_rule(rules, model_name)]["targets"] = targets
    return {"rules": rules}


def _check_weights(weights: Mapping[str, int]) -> None:
    for name, weight in weights.items():
        if not name:
            raise ValueError("a target needs a name")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of {name!r} must be an integer 0..{MAX_WEIGHT}: {weight!r}")
    if sum(weights.values()) == 0:
        raise ValueError("the weights must not add up to 0: no target would get traffic")


def _routing(obj: Mapping[str, Any], model_name: str) -> tuple[list[dict[str, Any]], str] | None:
    """The target list that routes the model in obj, and the key naming a target."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == INFERENCE_MODEL and spec.get("modelName") == model_name:
        # No targetModels: the model name is its own (only) target.
        return list(spec.get("targetModels") or [{"name": model_name}]), "name"
    if kind == INFERENCE_MODEL_REWRITE:
        rules = spec.get("rules") or []
        index = _matching_rule(rules, model_name)
        if index >= 0:
            return list(rules[index].get("targets") or []), "modelRewrite"
    return None


def _matching_rule(rules: list[dict[str, Any]], model_name: str) -> int:
    """The index of the first rule matching the name (the one requests use), or -1. The
    match type is not looked at, as the picker does not: Exact is the only one."""
    for index, rule in enumerate(rules):
        for match in rule.get("matches") or []:
            model = match.get("model") or {}
            if model.get("value") == model_name:
                return index
    return -1


# ---- optimistic concurrency, shared by every backend ----

CONFLICT_ATTEMPTS = 5
CONFLICT_BACKOFF = 0.05  # seconds before the second attempt; doubles, jittered ±50%


async def retry_on_conflict(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs attempt (read, compute, conditional write) until no concurrent change refuses it
    with StaleError; ConflictError after CONFLICT_ATTEMPTS tries."""
    for number in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            return await attempt()
        except StaleError:
            log.info("write_conflict", object=what, attempt=number, of=CONFLICT_ATTEMPTS)
        if number < CONFLICT_ATTEMPTS:
            await asyncio.sleep(CONFLICT_BACKOFF * 2 ** (number - 1) * random.uniform(0.5, 1.5))
    raise ConflictError(
        f"{what} was changed by another writer before each of {CONFLICT_ATTEMPTS} "
        "attempts; gave up (it is retried on the next reconcile)"
    )
