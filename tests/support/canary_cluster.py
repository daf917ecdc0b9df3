"""A whole serving stack around the kmock Kubernetes emulator, for canary rollouts end to
end: vLLM-compatible servers ("pods", all on one port at their own 127.0.0.x address),
a sidecar beside each watching the adapter ConfigMap through the API, the controller
(rollouts and picker) and a real Envoy in front.

The pods are given: simulators (`tests/e2e/test_canary.py`) or real vLLM servers
(`tests/real_vllm/test_canary.py`). Nothing is faked above the API.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoordinationV1Api, CoreV1Api, CustomObjectsApi

from loractl.processes import ChildProcess, free_port
from tests.support.configmap_dir import write_configmap_dir
from tests.support.gateway import Envoy, start_envoy
from tests.support.kube import call, write_kubeconfig
from tests.support.sidecars import CONFIG_KEY, adapter_config
from tests.support.simulators import loractl_argv
from tests.support.vllm_api import PROMPT

NS = "serving"
MODEL = "food-review"
RESOURCES = {
    "v1/configmaps": "ConfigMap",
    "v1/pods": "Pod",
    "v1/events": "Event",
    "coordination.k8s.io/v1/leases": "Lease",
    "inference.networking.k8s.io/v1/inferencepools": "InferencePool",
    "inference.networking.x-k8s.io/v1alpha2/inferencemodels": "InferenceModel",
    "loractl.io/v1alpha1/adapterrollouts": "AdapterRollout",
}
ROLLOUTS = ("loractl.io", "v1alpha1", NS, "adapterrollouts")
MODELS = ("inference.networking.x-k8s.io", "v1alpha2", NS, "inferencemodels")
TRAFFIC_MAX_TOKENS = 3
DRAIN_SECONDS = 2  # the adapter leaving stays listed this long after the weights moved


@dataclass(frozen=True)
class Answer:
    at: float  # monotonic
    wall: float  # time.time(), to compare with the rollout's history
    status: int
    model: str  # the target that answered, from the response's `model`
    text: str  # the completion, which tells the weights that produced it


@dataclass
class Traffic:
    """A steady client of the gateway, recording which target answered each request."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TRAFFIC_MAX_TOKENS,
                "temperature": 0}  # fmt: skip
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(f"{self.url}/v1/completions", json=body)
                    data = answer.json() if answer.status_code == 200 else {}
                    model = str(data.get("model", ""))
                    text = str(data["choices"][0]["text"]) if data else ""
                    self.answers.append(
                        Answer(time.monotonic(), time.time(), answer.status_code, model, text)
                    )
                except httpx.HTTPError:
                    self.answers.append(Answer(time.monotonic(), time.time(), 0, "", ""))
                time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()

    def statuses(self) -> Counter[int]:
        return Counter(answer.status for answer in self.answers)


@dataclass
class Cluster:
    api: ApiClient
    work: Path
    children: list[ChildProcess]
    servers: list[str]  # the pods' vLLM URLs
    adapters: dict[str, str]
    controller: ChildProcess
    controller_argv: list[str]
    envoy: Envoy
    pool_port: int

    async def rollout(self, name: str) -> dict[str, Any]:
        custom = CustomObjectsApi(self.api)
        obj: dict[str, Any] = await call(custom.get_namespaced_custom_object, *ROLLOUTS, name)
        return obj

    async def wait_phase(self, name: str, phases: set[str], within: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            obj = await self.rollout(name)
            status = obj.get("status") or {}
            if status.get("phase") in phases:
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rollout {name} never reached {phases}: {status}\ncontroller log:\n"
                    f"{self.controller.log_tail(30)}"
                )
            await asyncio.sleep(0.2)

    async def wait_unlisted(self, adapter: str, within: float = 30.0) -> None:
        """Until `adapter` is in ensureNotExist: the rollout unlists it once drained."""
        deadline = time.monotonic() + within
        while adapter not in (await self.adapter_lists())[1]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{adapter} was never unlisted: {await self.adapter_lists()}")
            await asyncio.sleep(0.2)

    async def inference_model(self) -> dict[str, Any]:
        custom = CustomObjectsApi(self.api)
        model: dict[str, Any] = await call(custom.get_namespaced_custom_object, *MODELS, MODEL)
        return model

    async def weights(self) -> dict[str, int]:
        model = await self.inference_model()
        return {t["name"]: t.get("weight", 1) for t in model["spec"]["targetModels"]}

    async def adapter_lists(self) -> tuple[set[str], set[str]]:
        configmap = await call(CoreV1Api(self.api).read_namespaced_config_map, "adapters", NS)
        document = yaml.safe_load(configmap.data[CONFIG_KEY])["vLLMLoRAConfig"]

        def ids(section: str) -> set[str]:
            return {m["id"] for m in (document.get(section) or {}).get("models") or []}

        return ids("ensureExist"), ids("ensureNotExist")

    async def registered(self) -> list[set[str]]:
        def read(url: str) -> set[str]:
            cards = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            return {c["id"] for c in cards if c["parent"]}

        return [await asyncio.to_thread(read, url) for url in self.servers]

    async def wait_unloaded(self, adapter: str, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while any(adapter in names for names in await self.registered()):
            assert time.monotonic() < deadline, await self.registered()
            await asyncio.sleep(0.2)

    async def event_reasons(self) -> list[str]:
        events = await call(CoreV1Api(self.api).list_namespaced_event, NS)
        return [e.reason for e in events.items]

    def restart_controller(self) -> None:
        self.controller = self.controller.again()
        self.children.append(self.controller.start())

    async def start_rollout(
        self, name: str, spec: dict[str, Any] | None = None, **gates: Any
    ) -> None:
        """A rollout of food-review-1 → food-review-2 in two short steps; `spec` overrides."""
        body = {
            "apiVersion": "loractl.io/v1alpha1",
            "kind": "AdapterRollout",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {
                "pool": "pool",
                "model": MODEL,
                "configMap": {"name": "adapters"},
                "from": {"id": "food-review-1", "source": self.adapters["food-review-1"]},
                "to": {"id": "food-review-2", "source": self.adapters["food-review-2"]},
                "steps": [{"weight": 20, "pause": "3s"}, {"weight": 60, "pause": "3s"}],
                "drain": f"{DRAIN_SECONDS}s",
                "gates": {
                    "minRequests": 5,
                    "maxErrorRate": 0.05,
                    "maxP95LatencyRatio": None,
                    "minRequestsTimeout": "30s",
                    **gates,
                },
                **(spec or {}),
            },
        }
        await call(CustomObjectsApi(self.api).create_namespaced_custom_object, *ROLLOUTS, body)


async def _create(api: ApiClient, kind: str, body: dict[str, Any]) -> None:
    core, custom = CoreV1Api(api), CustomObjectsApi(api)
    body["metadata"] = {"namespace": NS, "resourceVersion": "1", **body["metadata"]}
    if kind == "ConfigMap":
        await call(core.create_namespaced_config_map, NS, body)
    elif kind == "Pod":
        await call(core.create_namespaced_pod, NS, body)
    elif kind == "InferencePool":
        await call(
            custom.create_namespaced_custom_object,
            "inference.networking.k8s.io",
            "v1",
            NS,
            "inferencepools",
            body,
        )
    else:
        await call(custom.create_namespaced_custom_object, *MODELS, body)


def started(children: list[ChildProcess], process: ChildProcess, url: str) -> ChildProcess:
    children.append(process.start())
    process.wait_http_ok(url, timeout=30)
    return process


# Starts the pods' servers (or hands over running ones): their URLs, all on one port.
PodStarter = Callable[[Path, list[ChildProcess]], list[str]]


@asynccontextmanager
async def open_cluster(
    kmock: KubernetesEmulator, work: Path, adapters: dict[str, str], pods: PodStarter
) -> AsyncIterator[Cluster]:
    """The stack serving `food-review` from food-review-1, ready to route."""
    for resource, kind in RESOURCES.items():
        status = ["status"] if kind == "AdapterRollout" else []
        kmock.resources[resource] = ResourceInfo(namespaced=True, kind=kind, subresources=status)
    kubeconfig = write_kubeconfig(str(kmock.url).rstrip("/"), work / "kubeconfig")
    env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}
    api = ApiClient()
    api.configuration.host = str(kmock.url).rstrip("/")
    first_config = adapter_config({"food-review-1": adapters["food-review-1"]})
    await _create(
        api, "ConfigMap", {"metadata": {"name": "adapters"}, "data": {CONFIG_KEY: first_config}}
    )
    await _create(
        api,
        "InferencePool",
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "pool"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 0}]},
        },
    )
    await _create(
        api,
        "InferenceModel",
        {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceModel",
            "metadata": {"name": MODEL},
            "spec": {
                "modelName": MODEL,
                "poolRef": {"name": "pool"},
                "targetModels": [{"name": "food-review-1", "weight": 100}],
            },
        },
    )
    # kmock keeps no resourceVersions of its own, and the elector rightly refuses to write a
    # Lease without one: the Lease exists up front, as the API server would number it.
    lease = {
        "metadata": {"name": "loractl-controller", "namespace": NS, "resourceVersion": "1"},
        "spec": {},
    }
    await call(CoordinationV1Api(api).create_namespaced_lease, NS, lease)
    children: list[ChildProcess] = []
    try:
        servers = await asyncio.to_thread(pods, work, children)
        cluster = await asyncio.to_thread(
            _start_processes, api, work, env, first_config, adapters, children, servers
        )
        # The pods exist now: tell the API, with the port the servers got.
        for index, url in enumerate(servers):
            await _create(api, "Pod", _pod(index, _host(url)))
        await _patch_pool_port(api, cluster.pool_port)
        await asyncio.to_thread(_wait_routable, cluster)
        yield cluster
    finally:
        for child in reversed(children):
            await asyncio.to_thread(child.stop)
        api.close()  # type: ignore[no-untyped-call]


def _host(url: str) -> str:
    return str(urlsplit(url).hostname)


def _start_processes(
    api: ApiClient,
    work: Path,
    env: dict[str, str],
    first_config: str,
    adapters: dict[str, str],
    children: list[ChildProcess],
    servers: list[str],
) -> Cluster:
    ports = {urlsplit(url).port for url in servers}
    assert len(ports) == 1, f"pods behind one InferencePool share a port: {servers}"
    sidecar_port = free_port(_host(servers[0]))
    for url in servers:
        host = _host(url)
        config_dir = work / f"config-{host}"
        write_configmap_dir(config_dir, {CONFIG_KEY: first_config})
        sidecar = ChildProcess(
            f"sidecar-{host}",
            loractl_argv(
                "sidecar",
                "--host",
                host,
                "--port",
                str(sidecar_port),
                "--config",
                str(config_dir / CONFIG_KEY),
                "--vllm-url",
                url,
                "--adapter-dir",
                str(work / f"cache-{host}"),
                "--watch-configmap",
                f"{NS}/adapters",
                "--backoff-max",
                "2",
            ),
            work / "logs" / f"sidecar-{host}.log",
            env=env,
        )
        started(children, sidecar, f"http://{host}:{sidecar_port}/healthz")
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    argv = loractl_argv(
        "controller",
        "--pool",
        "pool",
        "--namespace",
        NS,
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        "--sidecar-port",
        str(sidecar_port),
    )
    controller = ChildProcess("controller", argv, work / "logs" / "controller.log", env=env)
    started(children, controller, f"http://127.0.0.1:{metrics_port}/healthz")
    envoy = start_envoy(children, work, grpc_port)
    port = ports.pop()
    assert port is not None
    return Cluster(api, work, children, servers, adapters, controller, argv, envoy, port)


def _pod(index: int, host: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"vllm-{index}", "labels": {"app": "vllm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        "status": {
            "phase": "Running",
            "podIP": host,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def _patch_pool_port(api: ApiClient, port: int) -> None:
    await call(
        CustomObjectsApi(api).patch_namespaced_custom_object,
        "inference.networking.k8s.io",
        "v1",
        NS,
        "inferencepools",
        "pool",
        {"spec": {"targetPorts": [{"number": port}]}},
        _content_type="application/merge-patch+json",
    )


def _wait_routable(cluster: Cluster) -> None:
    """Until the gateway serves the model: endpoints found, adapters loaded, models read."""
    deadline = time.monotonic() + 60
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    while True:
        try:
            if (
                httpx.post(f"{cluster.envoy.url}/v1/completions", json=body, timeout=5).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"never routable:\n{cluster.controller.log_tail(30)}"
        time.sleep(0.2)


@contextmanager
def steady_traffic(cluster: Cluster) -> Iterator[Traffic]:
    traffic = Traffic(cluster.envoy.url)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        yield traffic
    finally:
        traffic.stop()
        thread.join(15)


async def healthy_canary_promotes(cluster: Cluster) -> Traffic:
    """A rollout from food-review-1 to food-review-2 under steady traffic walks every step
    and promotes; the traffic it ran under, for checks of the caller's own."""
    with steady_traffic(cluster) as traffic:
        await cluster.start_rollout("healthy")
        done = await cluster.wait_phase("healthy", {"Promoted", "Aborted", "Failed"})
        promoted_at = time.monotonic()
        if done["status"]["phase"] == "Promoted":
            await cluster.wait_unlisted("food-review-1")
            await asyncio.sleep(1.0)  # the sidecars unload it under traffic: no 404
    status = done["status"]
    assert status["phase"] == "Promoted", status
    assert await cluster.weights() == {"food-review-2": 100}
    listed, removed = await cluster.adapter_lists()
    assert "food-review-2" in listed
    assert "food-review-1" in removed
    steps = [h for h in status["history"] if h["reason"] == "StepStarted"]
    assert [h["step"] for h in steps] == [0, 1], "every step, once"
    assert all(g["passed"] for g in status["lastGates"]), status["lastGates"]
    assert traffic.statuses().keys() == {200}, f"errors during the rollout: {traffic.statuses()}"
    # Judged within the first step (20 %): over the whole rollout the shares depend on how
    # long each step waited for its gates.
    first, second = (datetime.fromisoformat(h["at"]).timestamp() for h in steps)
    at_20 = Counter(a.model for a in traffic.answers if first <= a.wall < second)
    assert at_20["food-review-2"] > 0, f"the canary served in its first step: {at_20}"
    assert at_20["food-review-1"] > at_20["food-review-2"], f"less than the baseline: {at_20}"
    after = {a.model for a in traffic.answers if a.at > promoted_at + 0.5}
    assert after == {"food-review-2"}
    reasons = await cluster.event_reasons()
    assert {"LoadingAdapter", "StepStarted", "Promoted"} <= set(reasons)
    await cluster.wait_unloaded("food-review-1")
    return traffic
