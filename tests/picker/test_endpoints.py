"""Endpoint sources: a static list, and an InferencePool's ready Pods through the official
client against kmock's Kubernetes emulator.

kmock keeps no resourceVersions, ignores label and field selectors (the code filters
again, as it must for any server), and starts every watch by replaying the current objects
as ADDED. Objects changed through the client publish watch events; changing
`kmock.objects` directly is a change no watch sees, which proves a relist happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from structlog.testing import capture_logs

from controller.endpoints import (
    POOL_PLURAL,
    POOL_V1,
    POOL_V1ALPHA2,
    SIDECAR_PORT_ANNOTATION,
    InferencePoolEndpoints,
    PoolApi,
    StaticEndpoints,
    parse_endpoint_list,
    ready_pod,
)
from controller.inventory import Endpoint, Inventory
from tests.support.kube import CuttableProxy, call, use_kubeconfig

NAMESPACE = "serving"
POOL = "llama-pool"
WAIT = 3.0
QUIET = 0.3
MERGE_PATCH = "application/merge-patch+json"
PODS = "v1/pods"
EXPIRED = {
    "apiVersion": "v1",
    "kind": "Status",
    "status": "Failure",
    "reason": "Expired",
    "message": "too old resource version: 1 (42)",
    "code": 410,
}


def resource(api: PoolApi) -> str:
    return f"{api.group}/{api.version}/{POOL_PLURAL}"


def v1_spec(ports: tuple[int, ...] = (8000,), **labels: str) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": labels or {"app": "vllm"}},
        "targetPorts": [{"number": port} for port in ports],
        "endpointPickerRef": {"name": "picker", "port": {"number": 9002}},
    }


def v1alpha2_spec(port: int = 8000, **labels: str) -> dict[str, Any]:
    return {
        "selector": labels or {"app": "vllm"},
        "targetPortNumber": port,
        "extensionRef": {"name": "picker"},
    }


def pod_body(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    finalizers: list[str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {"app": "vllm"} if labels is None else labels,
        "annotations": annotations or {},
    }
    if finalizers:
        metadata["finalizers"] = finalizers
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": metadata, "spec": {"containers": [{"name": "vllm"}]}, "status": status}


class Cluster:
    """The test's side of the API: the official client, from threads."""

    def __init__(self, api: ApiClient) -> None:
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)

    async def create_pod(self, name: str, ip: str | None, **kwargs: Any) -> None:
        await call(self.core.create_namespaced_pod, NAMESPACE, pod_body(name, ip, **kwargs))

    async def patch_pod(self, name: str, patch: dict[str, Any]) -> None:
        await call(
            self.core.patch_namespaced_pod, name, NAMESPACE, patch, _content_type=MERGE_PATCH
        )

    async def set_ready(self, name: str, ready: bool) -> None:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        await call(
            self.core.patch_namespaced_pod_status,
            name,
            NAMESPACE,
            {"status": {"conditions": [condition]}},
            _content_type=MERGE_PATCH,
        )

    async def delete_pod(self, name: str) -> None:
        await call(self.core.delete_namespaced_pod, name, NAMESPACE)

    async def create_pool(self, api: PoolApi, spec: dict[str, Any], name: str = POOL) -> None:
        body = {
            "apiVersion": f"{api.group}/{api.version}",
            "kind": "InferencePool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }
        await call(
            self.custom.create_namespaced_custom_object,
            api.group,
            api.version,
            NAMESPACE,
            POOL_PLURAL,
            body,
        )

    async def patch_pool(self, api: PoolApi, spec: dict[str, Any]) -> None:
        await call(
            self.custom.patch_namespaced_custom_object,
            api.group,
            api.version,
            NAMESPACE,
            POOL_PLURAL,
            POOL,
            {"spec": spec},
            _content_type=MERGE_PATCH,
        )

    async def delete_pool(self, api: PoolApi) -> None:
        await call(
            self.custom.delete_namespaced_custom_object,
            api.group,
            api.version,
            NAMESPACE,
            POOL_PLURAL,
            POOL,
        )


def serve(kmock: KubernetesEmulator, *apis: PoolApi) -> None:
    """Declares the resources the emulator serves: Pods, and the pool under these APIs."""
    kmock.resources[PODS] = ResourceInfo(namespaced=True, kind="Pod")
    for api in apis:
        kmock.resources[resource(api)] = ResourceInfo(namespaced=True, kind="InferencePool")


@pytest.fixture
def api(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiClient]:
    client = use_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def cluster(api: ApiClient) -> Cluster:
    return Cluster(api)


class Deliveries:
    """The on_change callback: feeds an inventory and records every delivery."""

    def __init__(self) -> None:
        self.inventory = Inventory()
        self.values: list[list[Endpoint]] = []

    def __call__(self, endpoints: list[Endpoint]) -> None:
        self.values.append(endpoints)
        self.inventory.set_endpoints(endpoints)

    def addresses(self) -> list[str] | None:
        return [e.address for e in self.values[-1]] if self.values else None

    async def reach(self, *addresses: str) -> None:
        """Waits until the latest delivery is exactly these addresses."""
        try:
            async with asyncio.timeout(WAIT):
                while self.addresses() != list(addresses):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"never delivered {addresses}; last: {self.addresses()}") from None

    async def none_within(self, seconds: float) -> bool:
        count = len(self.values)
        await asyncio.sleep(seconds)
        return len(self.values) == count


@asynccontextmanager
async def watching(api: ApiClient) -> AsyncIterator[tuple[Deliveries, InferencePoolEndpoints]]:
    deliveries = Deliveries()
    loop = asyncio.get_running_loop()
    source = InferencePoolEndpoints(api, NAMESPACE, POOL, loop, deliveries)
    source.start()
    try:
        yield deliveries, source
    finally:
        await asyncio.to_thread(source.stop)


async def until(condition: Callable[[], bool]) -> None:
    """Polls: kmock records requests but has no way to announce them."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_v1_pool_yields_its_ready_pods_times_its_target_ports(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1, POOL_V1ALPHA2)
    # Listed first, and the emulator ignores field selectors: only our own filter skips it.
    await cluster.create_pool(POOL_V1, v1_spec(app="other"), name="other-pool")
    await cluster.create_pool(POOL_V1, v1_spec(ports=(8000, 8001)))
    await cluster.create_pod("a", "10.0.0.1", annotations={SIDECAR_PORT_ANNOTATION: "8080"})
    await cluster.create_pod("b", "10.0.0.2")
    await cluster.create_pod("other-app", "10.0.0.3", labels={"app": "other"})
    await cluster.create_pod("not-ready", "10.0.0.4", ready=False)
    await cluster.create_pod("pending", None, phase="Pending", ready=False)
    async with watching(api) as (deliveries, _):
        await deliveries.reach("10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001")
        assert await deliveries.none_within(QUIET)
    assert len(deliveries.values) == 1
    assert deliveries.values[0][:3] == [
        Endpoint("10.0.0.1:8000", pod="a", namespace=NAMESPACE, sidecar_url="http://10.0.0.1:8080"),
        Endpoint("10.0.0.1:8001", pod="a", namespace=NAMESPACE, sidecar_url="http://10.0.0.1:8080"),
        Endpoint("10.0.0.2:8000", pod="b", namespace=NAMESPACE),
    ]
    assert deliveries.inventory.endpoints() == deliveries.values[0]


@pytest.mark.asyncio
async def test_a_v1alpha2_pool_is_read_when_v1_is_not_served(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1ALPHA2)
    await cluster.create_pool(POOL_V1ALPHA2, v1alpha2_spec(port=8200))
    await cluster.create_pod("a", "10.0.0.1")
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach("10.0.0.1:8200")
            await cluster.patch_pool(POOL_V1ALPHA2, {"targetPortNumber": 8300})
            await deliveries.reach("10.0.0.1:8300")
    unavailable = [e for e in logs if e["event"] == "kube_resource_unavailable"]
    assert [(e["log_level"], e["resource"]) for e in unavailable] == [("info", POOL_V1.name)]


@pytest.mark.asyncio
async def test_a_pool_api_we_may_not_read_counts_as_absent_and_says_so(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1, POOL_V1ALPHA2)
    kmock[f"list {resource(POOL_V1)}"] << 403  # a Role written for v1alpha2 only
    await cluster.create_pool(POOL_V1ALPHA2, v1alpha2_spec())
    await cluster.create_pod("a", "10.0.0.1")
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach("10.0.0.1:8000")
    unavailable = [e for e in logs if e["event"] == "kube_resource_unavailable"]
    assert [(e["log_level"], e["resource"]) for e in unavailable] == [("warning", POOL_V1.name)]
    assert unavailable[0]["error"].startswith("HTTP 403")


@pytest.mark.asyncio
async def test_v1_wins_over_v1alpha2_and_v1alpha2_stands_in_when_v1_goes(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1, POOL_V1ALPHA2)
    await cluster.create_pool(POOL_V1, v1_spec(app="new"))
    await cluster.create_pool(POOL_V1ALPHA2, v1alpha2_spec(app="old"))
    await cluster.create_pod("new", "10.0.0.1", labels={"app": "new"})
    await cluster.create_pod("old", "10.0.0.2", labels={"app": "old"})
    async with watching(api) as (deliveries, _):
        await deliveries.reach("10.0.0.1:8000")
        await cluster.delete_pool(POOL_V1)
        await deliveries.reach("10.0.0.2:8000")
        await cluster.create_pool(POOL_V1, v1_spec(app="new"))
        await deliveries.reach("10.0.0.1:8000")


@pytest.mark.asyncio
async def test_pods_becoming_ready_unready_and_deleted(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec())
    async with watching(api) as (deliveries, _):
        await deliveries.reach()  # a pool with no pods: known to be empty
        await cluster.create_pod("a", "10.0.0.1", ready=False)
        assert await deliveries.none_within(QUIET)
        await cluster.set_ready("a", True)
        await deliveries.reach("10.0.0.1:8000")
        await cluster.create_pod("b", "10.0.0.2")
        await deliveries.reach("10.0.0.1:8000", "10.0.0.2:8000")
        await cluster.set_ready("b", False)
        await deliveries.reach("10.0.0.1:8000")
        await cluster.delete_pod("a")
        await deliveries.reach()
        # A finalizer keeps a deleted Pod around, marked with a deletionTimestamp.
        await cluster.create_pod("c", "10.0.0.3", finalizers=["example.com/hold"])
        await deliveries.reach("10.0.0.3:8000")
        await cluster.delete_pod("c")
        await deliveries.reach()
    assert kmock.objects[PODS, NAMESPACE, "c"]["metadata"]["deletionTimestamp"]


@pytest.mark.asyncio
async def test_only_pods_matching_the_selector_count(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec(app="vllm", tier="gpu"))
    await cluster.create_pod("partial", "10.0.0.1", labels={"app": "vllm"})
    await cluster.create_pod("full", "10.0.0.2", labels={"app": "vllm", "tier": "gpu", "x": "y"})
    async with watching(api) as (deliveries, _):
        await deliveries.reach("10.0.0.2:8000")
        await cluster.patch_pod("partial", {"metadata": {"labels": {"tier": "gpu"}}})
        await deliveries.reach("10.0.0.1:8000", "10.0.0.2:8000")


@pytest.mark.asyncio
async def test_pool_changes_are_followed(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec(app="blue"))
    await cluster.create_pod("blue", "10.0.0.1", labels={"app": "blue"})
    await cluster.create_pod("green", "10.0.0.2", labels={"app": "green"})
    async with watching(api) as (deliveries, _):
        await deliveries.reach("10.0.0.1:8000")
        await cluster.patch_pool(POOL_V1, {"selector": {"matchLabels": {"app": "green"}}})
        await deliveries.reach("10.0.0.2:8000")
        await cluster.patch_pool(POOL_V1, {"targetPorts": [{"number": 9000}, {"number": 9001}]})
        await deliveries.reach("10.0.0.2:9000", "10.0.0.2:9001")
        await cluster.delete_pool(POOL_V1)
        await deliveries.reach()
        await cluster.create_pool(POOL_V1, v1_spec(app="blue"))
        await deliveries.reach("10.0.0.1:8000")


@pytest.mark.asyncio
async def test_a_missing_pool_means_no_endpoints_until_it_is_created(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1, POOL_V1ALPHA2)
    await cluster.create_pod("a", "10.0.0.1")
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach()
            await cluster.create_pool(POOL_V1ALPHA2, v1alpha2_spec())
            await deliveries.reach("10.0.0.1:8000")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["inferencepool_not_found"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "spec",
    [
        {"selector": {"matchLabels": {"app": "vllm"}}},
        {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
        {"selector": {"app": "vllm"}, "targetPorts": [{"number": 8000}]},  # v1alpha2's shape
        {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": "http"}]},
    ],
    ids=["no ports", "empty selector", "old selector shape", "named port"],
)
async def test_a_malformed_pool_selects_nothing_and_says_why(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster, spec: dict[str, Any]
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, spec)
    await cluster.create_pod("a", "10.0.0.1")
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach()
            await cluster.patch_pool(POOL_V1, v1_spec())  # fixing it is enough
            await deliveries.reach("10.0.0.1:8000")
    assert "inferencepool_malformed" in [e["event"] for e in logs]


@pytest.mark.asyncio
@pytest.mark.parametrize("as_event", [True, False], ids=["as a watch event", "as an HTTP status"])
async def test_an_expired_pod_watch_relists_and_sees_what_changed_meanwhile(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster, as_event: bool
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec())
    await cluster.create_pod("a", "10.0.0.1")
    await cluster.create_pod("b", "10.0.0.2", ready=False)

    def readied_meanwhile() -> dict[str, Any]:
        # Unseen by any watch: only a fresh list can find it.
        kmock.objects[PODS, NAMESPACE, "b"].patch(pod_body("b", "10.0.0.2"))
        return {"type": "ERROR", "object": EXPIRED} if as_event else EXPIRED

    if as_event:
        kmock["watch pods"][:1] << (readied_meanwhile,)
    else:
        kmock["watch pods"][:1] << 410 << readied_meanwhile
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach("10.0.0.1:8000", "10.0.0.2:8000")
            # Once the relist's watch is open: the emulator does not replay what happened
            # between a list and its watch (an API server does, from the resourceVersion).
            await until(lambda: len(kmock["watch pods"]) >= 2)
            await cluster.delete_pod("a")  # and the new watch holds
            await deliveries.reach("10.0.0.2:8000")
    assert len(kmock["list pods"]) == 2
    assert "kube_watch_expired" in [e["event"] for e in logs]


@pytest.mark.asyncio
async def test_a_failing_watch_backs_off_relists_and_logs_once(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec())
    await cluster.create_pod("a", "10.0.0.1")
    kmock["watch pods"][:3] << 503
    with capture_logs() as logs:
        async with watching(api) as (deliveries, _):
            await deliveries.reach("10.0.0.1:8000")
            await until(lambda: len(kmock["watch pods"]) == 4)
            await cluster.create_pod("b", "10.0.0.2")
            await deliveries.reach("10.0.0.1:8000", "10.0.0.2:8000")
    watch_logs = [(e["log_level"], e["event"]) for e in logs if e.get("resource") == "pods"]
    assert watch_logs == [
        ("warning", "kube_watch_failing"),
        ("info", "kube_watch_recovered"),
    ]
    assert len(kmock["list pods"]) == 4  # every failure relists


@pytest.mark.asyncio
async def test_a_dropped_connection_is_survived(
    kmock: KubernetesEmulator,
    cluster: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve(kmock, POOL_V1)
    await cluster.create_pool(POOL_V1, v1_spec())
    await cluster.create_pod("a", "10.0.0.1")
    proxy = CuttableProxy(kmock.servers[0].port)
    server = await proxy.serve()
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    through_proxy = use_kubeconfig(url, tmp_path / "kubeconfig-proxy", monkeypatch)
    try:
        async with watching(through_proxy) as (deliveries, _):
            await deliveries.reach("10.0.0.1:8000")
            proxy.cut()
            kmock.objects[PODS, NAMESPACE, "a"].patch({"status": {"podIP": "10.0.0.9"}})
            await asyncio.sleep(0.5)  # reconnecting fails a few times meanwhile
            assert deliveries.addresses() == ["10.0.0.1:8000"]  # last known, not wiped
            proxy.up = True
            await deliveries.reach("10.0.0.9:8000")
            await cluster.create_pod("b", "10.0.0.2")
            await deliveries.reach("10.0.0.2:8000", "10.0.0.9:8000")
    finally:
        proxy.cut()
        server.close()
        await server.wait_closed()
        through_proxy.close()  # type: ignore[no-untyped-call]


@pytest.mark.asyncio
async def test_stop_is_prompt_and_final(
    kmock: KubernetesEmulator, api: ApiClient, cluster: Cluster
) -> None:
    serve(kmock, POOL_V1, POOL_V1ALPHA2)
    await cluster.create_pool(POOL_V1, v1_spec())
    async with watching(api) as (deliveries, source):
        await deliveries.reach()
        await asyncio.sleep(0.1)  # every watch is connected and idle
        began = time.monotonic()
        await asyncio.to_thread(source.stop)
        assert time.monotonic() - began < 0.5
        await cluster.create_pod("a", "10.0.0.1")
        assert await deliveries.none_within(QUIET)


def ready(**status: Any) -> dict[str, Any]:
    body = pod_body("p", "10.0.0.1", annotations={SIDECAR_PORT_ANNOTATION: "8080"})
    body["status"].update(status)
    return body


@pytest.mark.parametrize(
    ("body", "is_ready"),
    [
        (ready(), True),
        (ready(phase="Succeeded"), False),
        (ready(podIP=""), False),
        (ready(conditions=[]), False),
        (ready(conditions=[{"type": "ContainersReady", "status": "True"}]), False),
        (
            {**ready(), "metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}},
            False,
        ),
        ({"metadata": {"name": "p"}}, False),
    ],
    ids=["ready", "finished", "no ip", "no conditions", "other condition", "deleting", "bare"],
)
def test_what_counts_as_a_ready_pod(body: dict[str, Any], is_ready: bool) -> None:
    assert (ready_pod(body) is not None) == is_ready


@pytest.mark.parametrize(("annotation", "port"), [("8080", 8080), ("http", None), ("0", None)])
def test_the_sidecar_port_annotation(annotation: str, port: int | None) -> None:
    body = pod_body("p", "fd00::7", annotations={SIDECAR_PORT_ANNOTATION: annotation})
    pod = ready_pod(body)
    assert pod is not None
    assert pod.sidecar_port == port


def test_static_endpoints_are_delivered_on_start_in_canonical_form() -> None:
    delivered: list[list[Endpoint]] = []
    source = StaticEndpoints(
        ["10.0.0.1:8000", " 10.0.0.2:8000", "[fd00::0:7]:8000"], delivered.append
    )
    assert delivered == []
    source.start()
    source.stop()
    assert [[e.address for e in endpoints] for endpoints in delivered] == [
        ["10.0.0.1:8000", "10.0.0.2:8000", "[fd00::7]:8000"]
    ]
    assert delivered[0][2].host == "[fd00::7]"


@pytest.mark.parametrize(
    "address", ["vllm-0:8000", "10.0.0.1", "10.0.0.1:http", "10.0.0.1:0", "10.0.0.1:65536", ""]
)
def test_static_endpoints_refuse_what_is_not_ip_port(address: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        StaticEndpoints([address], lambda endpoints: None)


def test_endpoint_list_reads_addresses_and_sidecar_ports() -> None:
    endpoints, errors = parse_endpoint_list(
        "127.0.0.1:8001 sidecar=9001,\n127.0.0.2:8000\n  [::1]:8003   sidecar=9003 ,"
    )
    assert errors == []
    assert endpoints == [
        Endpoint("127.0.0.1:8001", sidecar_url="http://127.0.0.1:9001"),
        Endpoint("127.0.0.2:8000"),
        Endpoint("[::1]:8003", sidecar_url="http://[::1]:9003"),
    ]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("pod-a:8000", "not an ip:port endpoint"),
        ("127.0.0.1:8001 sidecar=x", "the only option is sidecar=PORT"),
        ("127.0.0.1:8001 sidecar=70000", "the only option is sidecar=PORT"),
        ("127.0.0.1:8001 port=9001", "the only option is sidecar=PORT"),
    ],
)
def test_endpoint_list_names_each_bad_entry_and_keeps_the_good(entry: str, problem: str) -> None:
    endpoints, errors = parse_endpoint_list(f"127.0.0.9:8000, {entry}")
    assert endpoints == [Endpoint("127.0.0.9:8000")]
    assert len(errors) == 1
    assert problem in errors[0]
