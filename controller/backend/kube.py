"""The Kubernetes backend: one namespace's AdapterRollouts, InferenceModels and
InferenceModelRewrites, InferencePools (v1 and v1alpha2) and ConfigMaps.

Reads: one `loractl.kube.Informer` per resource, each a list+watch loop in a thread of its
own that replaces its whole map on every change. Replacing is one attribute assignment, so
a reader on the event loop always sees one consistent map per resource. A resource whose
CRD is not installed (or not allowed) reads as empty, except AdapterRollout: without it
there is nothing to do, and its watch keeps failing loudly until it is installed.

Writes: the official client, called in worker threads. Every read-modify-write is a JSON
merge patch that carries the metadata.resourceVersion it was computed from. The API server
takes that version as a precondition and answers 409 Conflict when the object has moved
on (controller-runtime's MergeFromWithOptimisticLock rests on the same rule); a patch
rather than a PUT so that only the fields we edit are sent. On 409 the object is read
again, the edit is computed again from what is there now and written again: at most
CONFLICT_ATTEMPTS times with a short jittered backoff, then ConflictError. An object that
comes without a resourceVersion (no real server does that) is refused, never written
unconditionally.

Events are core/v1 Events, counted as client-go's recorder counts them: a repeat of the
same (object, type, reason, message) patches count and lastTimestamp of the Event it
created. Only this process writes its Events, so that patch needs no precondition.

RBAC, in the namespace: get/list/watch/create/patch adapterrollouts and patch
adapterrollouts/status (loractl.io); get/list/watch/patch inferencemodels and
inferencemodelrewrites (inference.networking.x-k8s.io); list/watch inferencepools (both
groups); get/list/watch/patch configmaps; create/patch events.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import Any, NamedTuple, TypeVar

import structlog
import urllib3
from kubernetes.client import ApiClient, CoreV1Api, CoreV1Event, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from controller.backend.base import (
    ROLLOUT_API_VERSION,
    ROLLOUT_GROUP,
    ROLLOUT_KIND,
    ROLLOUT_PLURAL,
    ROLLOUT_VERSION,
    AlreadyExistsError,
    BackendError,
    EventType,
    NotFoundError,
    ObjectRef,
    StaleError,
    StoredRollout,
    TrafficSplit,
    edit_adapter_config,
    retry_on_conflict,
    routing_patch,
    traffic_split,
)
from controller.endpoints import POOL_PLURAL, POOL_V1, POOL_V1ALPHA2, PoolApi
from controller.model_sources import MODEL_GROUP, MODEL_VERSION, PLURALS
from controller.models import INFERENCE_MODEL, INFERENCE_MODEL_REWRITE
from loractl.kube import MERGE_PATCH, REQUEST_TIMEOUT, STOP_WAIT, Informer, describe
from sidecar.config import ConfigError

log = structlog.get_logger("controller")

EVENT_COMPONENT = "loractl-controller"
EVENTS_REMEMBERED = 1024  # repeats are counted for this many distinct events
POOL_APIS = (POOL_V1, POOL_V1ALPHA2)
# What a call through the official client raises when the API answers with an error
# (ApiException) or cannot be reached (urllib3 and socket errors).
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)

T = TypeVar("T")
Objects = dict[str, dict[str, Any]]


class _Watched(NamedTuple):
    """One resource the backend watches, and where its objects go."""

    what: str  # for logs
    list_function: Callable[..., Any]
    args: tuple[Any, ...]
    convert: Callable[[dict[str, Any]], Any]
    store: Callable[[dict[str, Any]], None]
    absent_is_empty: bool  # a CRD that is not installed reads as no objects


@dataclasses.dataclass(frozen=True)
class _RecordedEvent:
    name: str
    count: int


class KubeBackend:
    """The `Backend` for one namespace of a Kubernetes cluster."""

    def __init__(self, api_client: ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self._core = CoreV1Api(api_client)
        self._custom = CustomObjectsApi(api_client)
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the informers report from threads of their own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._rollouts: dict[str, StoredRollout] = {}
        self._models: dict[str, Objects] = {kind: {} for kind in PLURALS}
        self._pools: dict[PoolApi, dict[str, bool]] = {api: {} for api in POOL_APIS}
        self._configmaps: dict[str, dict[str, str]] = {}
        self._events: OrderedDict[tuple[ObjectRef, str, str, str], _RecordedEvent] = OrderedDict()
        watched = self._watched()
        self._informers = [self._informer(watch) for watch in watched]
        self._unsynced = {watch.what for watch in watched}

    # ---- watching ----

    def _watched(self) -> list[_Watched]:
        ns = self.namespace
        custom = self._custom.list_namespaced_custom_object
        return [
            _Watched(f"{ROLLOUT_PLURAL} {ns}", custom,
                     (ROLLOUT_GROUP, ROLLOUT_VERSION, ns, ROLLOUT_PLURAL),
                     _stored_rollout, self._store_rollouts, absent_is_empty=False),
            *(_Watched(f"{plural} {ns}", custom, (MODEL_GROUP, MODEL_VERSION, ns, plural),
                       _identified(kind), partial(self._store_models, kind), absent_is_empty=True)
              for kind, plural in PLURALS.items()),
            *(_Watched(f"{api.name} {ns}", custom, (api.group, api.version, ns, POOL_PLURAL),
                       _exists, partial(self._store_pools, api), absent_is_empty=True)
              for api in POOL_APIS),
            _Watched(f"configmaps {ns}", self._core.list_namespaced_config_map, (ns,),
                     _configmap_data, self._store_configmaps, absent_is_empty=False),
        ]  # fmt: skip

    def _informer(self, watch: _Watched) -> Informer[Any]:
        def on_state(state: dict[str, Any] | None) -> None:
            watch.store(state or {})
            self._changed(watch.what)

        return Informer(
            watch.what,
            watch.list_function,
            watch.args,
            {},
            watch.convert,
            on_state,
            self._stopping,
            unavailable_is_absent=watch.absent_is_empty,
        )

    def _store_rollouts(self, state: dict[str, StoredRollout]) -> None:
        self._rollouts = state

    # Two informers share each of these maps, one key each: assigning an existing key is
    # atomic and never resizes the map, so neither a writer nor a reader can trip the other.
    def _store_models(self, kind: str, state: Objects) -> None:
        self._models[kind] = state

    def _store_pools(self, api: PoolApi, state: dict[str, bool]) -> None:
        self._pools[api] = state

    def _store_configmaps(self, state: dict[str, dict[str, str]]) -> None:
        self._configmaps = state

    def _changed(self, what: str) -> None:
        """In a watch thread: notifies the loop, once every cache has been filled."""
        with self._lock:
            self._unsynced.discard(what)
            if self._unsynced or self._loop is None:
                return
        try:
            self._loop.call_soon_threadsafe(self._notify)
        except RuntimeError:  # the loop is closed: nobody is left to notify
            self._stopping.set()

    def _notify(self) -> None:
        if self._stopping.is_set():
            return
        self._synced.set()
        for callback in list(self._callbacks):
            callback()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for informer in self._informers:
            informer.start()
        await self._synced.wait()
        log.info("backend_synced", namespace=self.namespace, rollouts=len(self._rollouts))

    async def stop(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + STOP_WAIT
        for informer in self._informers:
            await asyncio.to_thread(informer.join, deadline)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    # ---- reads, from the caches ----

    def rollouts(self) -> list[StoredRollout]:
        return [_copy(rollout) for _, rollout in sorted(self._rollouts.items())]

    def rollout(self, name: str) -> StoredRollout | None:
        rollout = self._rollouts.get(name)
        return None if rollout is None else _copy(rollout)

    def inference_model(self, model_name: str, pool: str | None = None) -> TrafficSplit | None:
        models = self._models
        for kind in (INFERENCE_MODEL, INFERENCE_MODEL_REWRITE):
            for _, obj in sorted(models[kind].items()):
                split = traffic_split(obj, model_name)
                if split is not None and pool in (None, split.pool):
                    return split
        return None

    def pool(self, name: str) -> bool:
        return any(name in names for names in self._pools.values())

    def configmap(self, name: str) -> dict[str, str] | None:
        data = self._configmaps.get(name)
        return None if data is None else dict(data)

    # ---- writes ----

    async def ensure_adapters(
        self, configmap: str, key: str, listed: Mapping[str, str], removed: Collection[str]
    ) -> bool:
        what = f"ConfigMap {self.namespace}/{configmap}"

        def attempt() -> bool:
            obj = raw_json(self._core.read_namespaced_config_map(configmap, self.namespace, **_RAW))
            text = (obj.get("data") or {}).get(key)
            if not isinstance(text, str):
                raise BackendError(f"{what} has no key {key!r} holding the adapter document")
            try:
                edited = edit_adapter_config(text, listed, removed)
            except ConfigError as error:
                raise BackendError(f"{what}, key {key}: {error}; fix it first") from error
            if edited is None:
                return False
            body = _conditional(what, obj, {"data": {key: edited}})
            self._core.patch_namespaced_config_map(configmap, self.namespace, body, **_PATCH)
            return True

        written = await self._compare_and_swap(what, attempt)
        if written:
            log.info("adapters_written", configmap=configmap, key=key,
                     listed=sorted(listed), removed=sorted(removed))  # fmt: skip
        return written

    async def set_weights(
        self,
        model_name: str,
        weights: Mapping[str, int],
        pool: str | None = None,
        sticky: str | None = None,
    ) -> bool:
        split = self.inference_model(model_name, pool)
        if split is None:
            for_pool = "" if pool is None else f" for pool {pool}"
            raise NotFoundError(
                f"no InferenceModel or InferenceModelRewrite in {self.namespace} routes "
                f"model {model_name!r}{for_pool}"
            )
        kind, name = split.ref.kind, split.ref.name
        what = f"{kind} {self.namespace}/{name}"
        where = (MODEL_GROUP, MODEL_VERSION, self.namespace, PLURALS[kind], name)

        def attempt() -> bool:
            obj = _identified(kind)(
                raw_json(self._custom.get_namespaced_custom_object(*where, **_RAW))
            )
            patch = routing_patch(obj, model_name, weights, sticky)
            if patch is None:
                return False
            body = _conditional(what, obj, patch)
            self._custom.patch_namespaced_custom_object(*where, body, **_PATCH)
            return True

        written = await self._compare_and_swap(what, attempt)
        if written:
            log.info("weights_written", model=model_name, object=what, weights=dict(weights),
                     sticky_header=sticky)  # fmt: skip
        return written

    async def update_rollout_status(
        self, name: str, status: Mapping[str, Any], expected_resource_version: str
    ) -> str:
        what = f"{ROLLOUT_KIND} {self.namespace}/{name}"
        where = self._rollout_path(name)

        def attempt() -> str:
            obj = raw_json(self._custom.get_namespaced_custom_object(*where, **_RAW))
            version = _version(what, obj)
            if version != expected_resource_version:
                raise StaleError(
                    f"{what} is at version {version}, not {expected_resource_version}: "
                    "status not written"
                )
            patch = merge_patch(obj.get("status") or {}, status)
            if not patch:
                return version
            body = {"metadata": {"resourceVersion": version}, "status": patch}
            patch_status = self._custom.patch_namespaced_custom_object_status
            return _version(what, raw_json(patch_status(*where, body, **_PATCH_RAW)))

        return await self._call(what, attempt)

    async def patch_rollout_spec(
        self, name: str, patch: Mapping[str, Any], expected_resource_version: str | None = None
    ) -> str:
        what = f"{ROLLOUT_KIND} {self.namespace}/{name}"
        body: dict[str, Any] = {"spec": dict(patch)}
        if expected_resource_version is not None:
            body["metadata"] = {"resourceVersion": expected_resource_version}
        call = partial(
            self._custom.patch_namespaced_custom_object,
            *self._rollout_path(name),
            body,
            **_PATCH_RAW,
        )
        return _version(what, raw_json(await self._call(what, call)))

    async def create_rollout(self, obj: Mapping[str, Any]) -> StoredRollout:
        body = copy.deepcopy(dict(obj))
        metadata = body.setdefault("metadata", {})
        if not metadata.get("name"):
            raise ValueError(f"an {ROLLOUT_KIND} needs metadata.name")
        body.update(apiVersion=ROLLOUT_API_VERSION, kind=ROLLOUT_KIND)
        metadata["namespace"] = self.namespace
        what = f"{ROLLOUT_KIND} {self.namespace}/{metadata['name']}"
        call = partial(
            self._custom.create_namespaced_custom_object,
            ROLLOUT_GROUP,
            ROLLOUT_VERSION,
            self.namespace,
            ROLLOUT_PLURAL,
            body,
            **_RAW,
        )
        created = await self._call(what, call, conflict=AlreadyExistsError)
        return _stored_rollout(raw_json(created))

    async def emit_event(
        self, involved: ObjectRef, event_type: EventType, reason: str, message: str
    ) -> None:
        key = (involved, event_type, reason, message)
        what = f"Event about {involved.kind} {involved.namespace}/{involved.name}"
        now = _timestamp()
        recorded = self._events.pop(key, None)
        try:
            if recorded is not None:
                recorded = await self._count_again(what, involved, recorded, now)
            if recorded is None:
                create = partial(self._create_event, involved, event_type, reason, message, now)
                recorded = await self._call(what, create)
        except BackendError as error:
            log.warning("event_not_recorded", reason=reason, error=str(error))
            return
        self._events[key] = recorded
        while len(self._events) > EVENTS_REMEMBERED:
            self._events.popitem(last=False)  # the least recently emitted

    # ---- write plumbing ----

    def _rollout_path(self, name: str) -> tuple[str, str, str, str, str]:
        return ROLLOUT_GROUP, ROLLOUT_VERSION, self.namespace, ROLLOUT_PLURAL, name

    async def _call(
        self, what: str, function: Callable[[], T], conflict: type[BackendError] = StaleError
    ) -> T:
        """Calls the client in a worker thread; its errors become BackendErrors (409: the
        `conflict` class)."""
        try:
            return await asyncio.to_thread(function)
        except ApiException as error:
            if error.status == HTTPStatus.NOT_FOUND:
                raise NotFoundError(f"{what} not found") from error
            if error.status == HTTPStatus.CONFLICT:
                raise conflict(f"{what}: {describe(error)}") from error
            raise BackendError(f"{what}: {describe(error)}") from error
        except API_ERRORS as error:
            raise BackendError(f"{what}: {describe(error)}") from error

    async def _compare_and_swap(self, what: str, attempt: Callable[[], bool]) -> bool:
        """Runs attempt (read, compute, conditional write) until no conflict refuses it."""
        return await retry_on_conflict(what, lambda: self._call(what, attempt))

    def _create_event(
        self, involved: ObjectRef, event_type: EventType, reason: str, message: str, now: str
    ) -> _RecordedEvent:
        namespace = involved.namespace or self.namespace
        # As client-go names them: unique per object and creation time.
        name = f"{involved.name}.{time.time_ns():x}"
        reference = {
            "apiVersion": involved.api_version,
            "kind": involved.kind,
            "namespace": namespace,
            "name": involved.name,
        }
        if involved.uid:
            reference["uid"] = involved.uid
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": reference,
            "type": event_type,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
        }
        event = CoreV1Event.model_validate(body)
        self._core.create_namespaced_event(namespace, event, _request_timeout=REQUEST_TIMEOUT)
        return _RecordedEvent(name, 1)

    async def _count_again(
        self, what: str, involved: ObjectRef, recorded: _RecordedEvent, now: str
    ) -> _RecordedEvent | None:
        """Counts a repeat on the Event already created; None when it is gone (Events
        expire, an hour by default) and a new one is needed."""
        count = recorded.count + 1
        patch = partial(
            self._core.patch_namespaced_event,
            recorded.name,
            involved.namespace or self.namespace,
            {"count": count, "lastTimestamp": now},
            **_PATCH,
        )
        try:
            await self._call(what, patch)
        except NotFoundError:
            return None
        return _RecordedEvent(recorded.name, count)


# ---- helpers ----

# Calls that return the raw response (see _json), and merge patches; all bounded in time.
_RAW: dict[str, Any] = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}
_PATCH: dict[str, Any] = {"_content_type": MERGE_PATCH, "_request_timeout": REQUEST_TIMEOUT}
_PATCH_RAW: dict[str, Any] = {**_PATCH, **_RAW}


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns old into new; {} when they are equal.
    None in new means absent, since a merge patch cannot store a null."""
    patch: dict[str, Any] = {
        key: None for key, value in old.items() if value is not None and new.get(key) is None
    }
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif value is not None and value != before:
            patch[key] = value
    return patch


def raw_json(response: Any) -> dict[str, Any]:
    """The body of a call made with _preload_content=False: the JSON as the server sent
    it, not the client's typed model (which drops fields it does not know)."""
    body: dict[str, Any] = json.loads(response.data)
    return body


def _version(what: str, obj: Mapping[str, Any]) -> str:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    if not version:
        # Every API server sets one; without it a write could only be blind.
        raise BackendError(f"{what} came without a resourceVersion")
    return str(version)


def _conditional(what: str, obj: Mapping[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that applies only while obj is at the version it was read at."""
    return {
        **body,
        "metadata": {**body.get("metadata", {}), "resourceVersion": _version(what, obj)},
    }


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy(rollout: StoredRollout) -> StoredRollout:
    # A caller that edits the dicts must not edit the cache.
    return dataclasses.replace(
        rollout, spec=copy.deepcopy(rollout.spec), status=copy.deepcopy(rollout.status)
    )


def _stored_rollout(obj: dict[str, Any]) -> StoredRollout:
    metadata = obj.get("metadata") or {}
    ref = ObjectRef(
        ROLLOUT_API_VERSION,
        ROLLOUT_KIND,
        str(metadata.get("namespace") or ""),
        str(metadata.get("name") or ""),
        str(metadata.get("uid") or ""),
    )
    return StoredRollout(
        ref,
        obj.get("spec") or {},
        obj.get("status") or {},
        str(metadata.get("resourceVersion") or ""),
        int(metadata.get("generation") or 0),
    )


def _identified(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    # List items of custom resources may come without kind and apiVersion; the split's
    # reference needs both.
    def convert(obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "kind": kind, "apiVersion": f"{MODEL_GROUP}/{MODEL_VERSION}"}

    return convert


def _exists(obj: dict[str, Any]) -> bool:
    return True


def _configmap_data(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj.get("data") or {})
