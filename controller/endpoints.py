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
import dataclasses
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi

from controller.inventory import Endpoint
from loractl.kube import STOP_WAIT, Informer

log = structlog.get_logger("controller")

SIDECAR_PORT_ANNOTATION = "loractl.io/sidecar-port"
POOL_PLURAL = "inferencepools"

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


def parse_endpoint_list(text: str) -> tuple[list[Endpoint], list[str]]:
    """Endpoints from "ip:port [sidecar=PORT]" entries separated by commas or new lines,
    and a message for every entry that is not one."""
    endpoints: list[Endpoint] = []
    errors: list[str] = []
    for entry in filter(None, (e.strip() for e in re.split(r"[,\n]", text))):
        address, *options = entry.split()
        try:
            endpoint = Endpoint(parse_address(address))
            for option in options:
                key, _, value = option.partition("=")
                if key != "sidecar" or not value.isdigit() or not 0 < int(value) < 65536:
                    raise ValueError(
                        f"{option!r} in endpoint {entry!r}: the only option is sidecar=PORT"
                    )
                # host is already bracketed when it is IPv6
                sidecar = f"http://{endpoint.host}:{int(value)}"
                endpoint = dataclasses.replace(endpoint, sidecar_url=sidecar)
        except ValueError as error:
            errors.append(str(error))
            continue
        endpoints.append(endpoint)
    return endpoints, errors


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
            "inferencepool_malformed",
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
        "sidecar_port_annotation_invalid",
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
        self._informers: list[Informer[Any]] = [
            Informer(
                "pods",
                core.list_namespaced_pod,
                (namespace,),
                {},
                ready_pod,
                self._on_pods,
                self._stopping,
            ),
            *(
                Informer(
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
                "inferencepool_read",
                pool=self._pool_name,
                api=pool.api.name,
                selector=dict(pool.selector),
                ports=list(pool.ports),
            )
        elif pool is None:
            log.warning(
                "inferencepool_not_found",
                pool=self._pool_name,
                namespace=self._namespace,
            )

    def _hand_over(self, endpoints: list[Endpoint]) -> None:
        if not self._stopping.is_set():
            self._on_change(endpoints)
