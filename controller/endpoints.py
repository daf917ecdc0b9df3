"""Where the endpoint set comes from: a fixed list, or the ready Pods of an InferencePool.

InferencePoolEndpoints keeps three list+watch loops, each in a thread of its own (the
official client blocks; sidecar/kube.py does the same): the pool under the current API
group, the pool under the older one, and the namespace's Pods. The Pods are watched
namespace-wide and matched against the selector here, as upstream's endpoint picker does,
so a selector change applies at once, with no relist and no race between two watches.
Endpoints go out through `on_change` on the event loop, and only when they change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Generic, TypeVar, cast

import structlog
from kubernetes import watch
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from controller.inventory import Endpoint
from sidecar.kube import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    REQUEST_TIMEOUT,
    STOP_WAIT,
    WATCH_REQUEST_TIMEOUT,
    WATCH_SECONDS,
    _describe,
)

log = structlog.get_logger("controller")

SIDECAR_PORT_ANNOTATION = "loractl.io/sidecar-port"
POOL_PLURAL = "inferencepools"
# A pool API group that is not served (no CRD) or not allowed (RBAC) is asked again this
# often: a CRD installed later is found without a restart.
UNAVAILABLE_RETRY = 10.0

EndpointsCallback = Callable[[list[Endpoint]], None]


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> str:
    """A canonical "ip:port" ("[v6]:port"); the gateway's original-destination cluster
    needs an IP, never a host name."""
    host, _, port = text.strip().rpartition(":")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        number = int(port)
    except ValueError:
        raise ValueError(f"not an ip:port endpoint: {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in endpoint {text!r}")
    return join_host_port(str(ip), number)


class StaticEndpoints:
    """A fixed endpoint set, e.g. from --endpoints; delivered once, on start."""

    def __init__(self, addresses: Sequence[str], on_change: EndpointsCallback) -> None:
        self.endpoints = [Endpoint(parse_address(a)) for a in addresses]
        self._on_change = on_change

    def start(self) -> None:
        self._on_change(list(self.endpoints))

    def stop(self) -> None:
        """Nothing runs: the set never changes."""


# ---- what the API objects mean here ----


@dataclass(frozen=True)
class PoolApi:
    group: str
    version: str

    @property
    def name(self) -> str:
        return f"{POOL_PLURAL}.{self.group}/{self.version}"


POOL_V1 = PoolApi("inference.networking.k8s.io", "v1")
POOL_V1ALPHA2 = PoolApi("inference.networking.x-k8s.io", "v1alpha2")


@dataclass(frozen=True)
class PoolSpec:
    api: PoolApi
    selector: Mapping[str, str]
    ports: tuple[int, ...]

    def selects(self, labels: Mapping[str, str]) -> bool:
        # An empty selector would take every Pod in the namespace: never meant for a pool.
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector.items())


def pool_spec(api: PoolApi, obj: Mapping[str, Any]) -> PoolSpec:
    """v1: spec.selector.matchLabels, spec.targetPorts[].number; v1alpha2: spec.selector
    (a flat map), spec.targetPortNumber. A malformed pool selects nothing (and says so)."""
    spec = obj.get("spec") or {}
    try:
        if api == POOL_V1:
            selector = spec["selector"]["matchLabels"]
            ports = tuple(int(port["number"]) for port in spec["targetPorts"])
        else:
            selector = spec["selector"]
            ports = (int(spec["targetPortNumber"]),)
        if not isinstance(selector, dict) or not selector or not ports:
            raise ValueError("empty selector or no target ports")
        return PoolSpec(api, {str(k): str(v) for k, v in selector.items()}, ports)
    except (KeyError, TypeError, ValueError) as error:
        name = (obj.get("metadata") or {}).get("name")
        log.warning(
            "inferencepool is malformed; it selects nothing",
            api=api.name,
            pool=name,
            error=f"{type(error).__name__}: {error}",
        )
        return PoolSpec(api, {}, ())


@dataclass(frozen=True)
class ReadyPod:
    name: str
    ip: str
    labels: Mapping[str, str]
    sidecar_port: int | None


def ready_pod(obj: Mapping[str, Any]) -> ReadyPod | None:
    """The Pod if it can take traffic: an IP, Running, Ready, not being deleted."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    ip = status.get("podIP")
    if not (ip and ready and status.get("phase") == "Running") or metadata.get("deletionTimestamp"):
        return None
    name = str(metadata.get("name"))
    annotation = (metadata.get("annotations") or {}).get(SIDECAR_PORT_ANNOTATION)
    return ReadyPod(
        name, str(ip), dict(metadata.get("labels") or {}), _sidecar_port(name, annotation)
    )


def _sidecar_port(pod: str, annotation: str | None) -> int | None:
    if annotation is None:
        return None
    if annotation.isdigit() and 0 < int(annotation) < 65536:
        return int(annotation)
    log.warning(
        "pod annotation is not a port; no sidecar for this pod",
        pod=pod,
        annotation=SIDECAR_PORT_ANNOTATION,
        value=annotation,
    )
    return None


def pool_endpoints(pool: PoolSpec, pods: Mapping[str, ReadyPod], namespace: str) -> list[Endpoint]:
    endpoints = [
        Endpoint(
            join_host_port(pod.ip, port),
            pod=pod.name,
            namespace=namespace,
            sidecar_url=_sidecar_url(pod),
        )
        for pod in pods.values()
        if pool.selects(pod.labels)
        for port in pool.ports
    ]
    return sorted(endpoints, key=lambda e: e.address)


def _sidecar_url(pod: ReadyPod) -> str | None:
    return (
        None if pod.sidecar_port is None else f"http://{join_host_port(pod.ip, pod.sidecar_port)}"
    )


# ---- the InferencePool source ----


class _Unknown:
    """Not heard from the API yet: nothing can be said about the pool."""


_UNKNOWN = _Unknown()
_PoolState = PoolSpec | None | _Unknown  # None: no such pool under that API


class InferencePoolEndpoints:
    """The ready Pods an InferencePool selects, times its target ports.

    The pool is read under inference.networking.k8s.io/v1 and, when absent there, under
    inference.networking.x-k8s.io/v1alpha2. Needs RBAC get/list/watch on pods and on
    inferencepools of both groups (a group that answers 403 or 404 counts as absent)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        pool_name: str,
        loop: asyncio.AbstractEventLoop,
        on_change: EndpointsCallback,
    ) -> None:
        self._namespace = namespace
        self._pool_name = pool_name
        self._loop = loop
        self._on_change = on_change
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the informers' callbacks come from three threads
        self._pools: dict[PoolApi, _PoolState] = {POOL_V1: _UNKNOWN, POOL_V1ALPHA2: _UNKNOWN}
        self._pods: dict[str, ReadyPod] | None = None
        self._pool: _PoolState = _UNKNOWN
        self._delivered: list[Endpoint] | None = None
        core, custom = CoreV1Api(api_client), CustomObjectsApi(api_client)
        self._informers: list[_Informer[Any]] = [
            _Informer(
                "pods",
                core.list_namespaced_pod,
                (namespace,),
                {},
                ready_pod,
                self._on_pods,
                self._stopping,
            ),
            *(
                _Informer(
                    api.name,
                    custom.list_namespaced_custom_object,
                    (api.group, api.version, namespace, POOL_PLURAL),
                    {"field_selector": f"metadata.name={pool_name}"},
                    self._pool_reader(api),
                    self._pool_listener(api),
                    self._stopping,
                    unavailable_is_absent=True,
                )
                for api in (POOL_V1, POOL_V1ALPHA2)
            ),
        ]

    def start(self) -> None:
        for informer in self._informers:
            informer.start()

    def stop(self) -> None:
        """Returns within STOP_WAIT; nothing is delivered after."""
        self._stopping.set()
        deadline = time.monotonic() + STOP_WAIT
        for informer in self._informers:
            informer.join(deadline)

    def _pool_reader(self, api: PoolApi) -> Callable[[dict[str, Any]], PoolSpec | None]:
        def read(obj: dict[str, Any]) -> PoolSpec | None:
            # Filtered here too: not every server honours field selectors.
            if (obj.get("metadata") or {}).get("name") != self._pool_name:
                return None
            return pool_spec(api, obj)

        return read

    def _pool_listener(self, api: PoolApi) -> Callable[[dict[str, PoolSpec] | None], None]:
        def listen(pools: dict[str, PoolSpec] | None) -> None:
            with self._lock:
                self._pools[api] = next(iter((pools or {}).values()), None)
                self._update()

        return listen

    def _on_pods(self, pods: dict[str, ReadyPod] | None) -> None:
        with self._lock:
            self._pods = pods
            self._update()

    def _update(self) -> None:
        """Under the lock: recompute, and deliver when the endpoint set changed."""
        v1 = self._pools[POOL_V1]
        pool = self._pools[POOL_V1ALPHA2] if v1 is None else v1
        if pool != self._pool:
            self._pool = pool
            self._log_pool(pool)
        if isinstance(pool, _Unknown) or self._pods is None:
            return
        endpoints = [] if pool is None else pool_endpoints(pool, self._pods, self._namespace)
        if endpoints == self._delivered:
            return
        self._delivered = endpoints
        try:
            self._loop.call_soon_threadsafe(self._hand_over, endpoints)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to
            self._stopping.set()

    def _log_pool(self, pool: _PoolState) -> None:
        if isinstance(pool, PoolSpec):
            log.info(
                "inferencepool read",
                pool=self._pool_name,
                api=pool.api.name,
                selector=dict(pool.selector),
                ports=list(pool.ports),
            )
        elif pool is None:
            log.warning(
                "inferencepool not found: no endpoints",
                pool=self._pool_name,
                namespace=self._namespace,
            )

    def _hand_over(self, endpoints: list[Endpoint]) -> None:
        if not self._stopping.is_set():
            self._on_change(endpoints)


# ---- one list+watch loop ----

T = TypeVar("T")


class _Informer(Generic[T]):
    """Lists, then watches from the list's resourceVersion, in a thread of its own, keeping
    name → convert(object) for the objects convert keeps (not None). After each change it
    hands a copy to on_state; None there means the API is not served or not allowed (only
    with unavailable_is_absent; otherwise that is a failure like any other). An expired
    watch (410) relists; failures back off, capped, and relist."""

    def __init__(
        self,
        what: str,
        list_function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        convert: Callable[[dict[str, Any]], T | None],
        on_state: Callable[[dict[str, T] | None], None],
        stopping: threading.Event,
        unavailable_is_absent: bool = False,
    ) -> None:
        self._what = what
        self._list_function = list_function
        self._args = args
        self._kwargs = kwargs
        self._convert = convert
        self._on_state = on_state
        self._stopping = stopping
        self._unavailable_is_absent = unavailable_is_absent
        self._store: dict[str, T] = {}
        self._unavailable = False
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, deadline: float) -> None:
        """After `stopping` is set. A thread still connecting may outlive the deadline (it
        is a daemon) but delivers nothing more."""
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop() shuts the socket down under the blocked read. Repeated: a watch
            # that is still connecting has no socket yet.
            current = self._watch
            if current is not None:
                current.stop()  # type: ignore[no-untyped-call]
            self._thread.join(0.05)

    def _run(self) -> None:
        failures = _FailureStreak(self._what)
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch_from(resource_version, failures)
            except Exception as error:  # the thread must outlive any failure of the API
                if self._stopping.is_set():
                    return  # most likely stop() cutting the connection
                resource_version = None
                self._stopping.wait(self._after_failure(error, failures))

    def _after_failure(self, error: Exception, failures: _FailureStreak) -> float:
        """Handles a failure; returns how long to wait before relisting."""
        status = error.status if isinstance(error, ApiException) else None
        if status == HTTPStatus.GONE:
            log.info("watch expired; relisting", resource=self._what)
            return 0.0
        if self._unavailable_is_absent and status in (HTTPStatus.NOT_FOUND, HTTPStatus.FORBIDDEN):
            failures.reset()
            if not self._unavailable:  # once, not every UNAVAILABLE_RETRY
                self._unavailable = True
                # Not served is normal (only one of the pool's API groups may be installed);
                # not allowed is a Role to fix.
                say = log.info if status == HTTPStatus.NOT_FOUND else log.warning
                say(
                    "resource unavailable; counted as absent",
                    resource=self._what,
                    error=_describe(error),
                    retry_seconds=UNAVAILABLE_RETRY,
                )
            self._on_state(None)
            return UNAVAILABLE_RETRY
        return failures.record(error)

    def _list(self) -> str:
        response = self._list_function(
            *self._args, **self._kwargs, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
        listing = json.loads(response.data)
        self._unavailable = False
        self._store = {}
        for obj in listing.get("items") or []:
            self._apply("ADDED", obj)
        self._on_state(dict(self._store))
        # An empty version starts the watch from the current state: still correct.
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, resource_version: str, failures: _FailureStreak) -> str:
        self._watch = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
        for event in self._events(self._watch, resource_version):
            if isinstance(event, dict):  # the client yields None for blank lines
                failures.reset()
                resource_version = self._handle(event) or resource_version
            if self._stopping.is_set():
                break
        failures.reset()
        return resource_version

    def _handle(self, event: dict[str, Any]) -> str | None:
        """Applies one event; returns the resourceVersion it carries (bookmarks too)."""
        obj = event["raw_object"]
        if event["type"] in ("ADDED", "MODIFIED", "DELETED") and self._apply(event["type"], obj):
            self._on_state(dict(self._store))
        return cast(str | None, (obj.get("metadata") or {}).get("resourceVersion"))

    def _events(self, stream: watch.Watch, resource_version: str) -> Iterator[Any]:
        return cast(
            Iterator[Any],
            stream.stream(  # type: ignore[no-untyped-call]
                self._list_function,
                *self._args,
                **self._kwargs,
                resource_version=resource_version,
                # Bookmarks keep our version recent while nothing changes, so the next
                # watch resumes instead of expiring into a relist.
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=WATCH_REQUEST_TIMEOUT,
            ),
        )

    def _apply(self, kind: str, obj: dict[str, Any]) -> bool:
        """Applies one event to the store; True when the store changed."""
        name = str((obj.get("metadata") or {}).get("name"))
        record = None if kind == "DELETED" else self._convert(obj)
        if record is None:
            return self._store.pop(name, None) is not None
        changed = self._store.get(name) != record
        self._store[name] = record
        return changed


class _FailureStreak:
    """Capped exponential backoff that logs once when failures start and once when they end."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._count = 0

    def record(self, error: Exception) -> float:
        if self._count == 0:
            log.warning(
                "kubernetes watch failing; retrying with backoff",
                resource=self._what,
                error=_describe(error),
            )
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**self._count)
        self._count += 1
        return delay

    def reset(self) -> None:
        if self._count:
            log.info("kubernetes watch recovered", resource=self._what, failures=self._count)
            self._count = 0
