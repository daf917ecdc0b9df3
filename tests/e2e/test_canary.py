"""Canary rollouts end to end: the controller, the picker, three vLLM simulators each with
its sidecar, and a real Envoy, around the kmock Kubernetes API emulator.

Nothing is faked above the API: the sidecars watch the adapter ConfigMap through the API
and load what it lists, the picker routes by the InferenceModel weights the controller
writes, and the gates judge the answers the picker sees.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoordinationV1Api, CoreV1Api, CustomObjectsApi

from controller.extproc.envoy_config import PICKER_CLUSTER
from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter
from tests.support.configmap_dir import write_configmap_dir
from tests.support.gateway import Envoy, start_envoy
from tests.support.kube import call, write_kubeconfig
from tests.support.sidecars import CONFIG_KEY, adapter_config
from tests.support.simulators import loractl_argv, simulator_process

NS = "serving"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
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


@dataclass
class Traffic:
    """A steady client of the gateway, recording which target answered each request."""

    url: str
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = {"model": "food-review", "prompt": "How was the soup?", "max_tokens": 3}
                try:
                    answer = client.post(f"{self.url}/v1/completions", json=body)
                    model = answer.json().get("model", "") if answer.status_code == 200 else ""
                    self.answers.append((time.monotonic(), answer.status_code, model))
                except httpx.HTTPError:
                    self.answers.append((time.monotonic(), 0, ""))
                time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status, _ in self.answers)


@dataclass
class Cluster:
    api: ApiClient
    work: Path
    children: list[ChildProcess]
    sims: list[str]
    adapters: dict[str, str]
    controller: ChildProcess
    controller_argv: list[str]
    envoy: Envoy

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

    async def weights(self) -> dict[str, int]:
        model = await call(
            CustomObjectsApi(self.api).get_namespaced_custom_object, *MODELS, "food-review"
        )
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

        return [await asyncio.to_thread(read, url) for url in self.sims]

    async def event_reasons(self) -> list[str]:
        events = await call(CoreV1Api(self.api).list_namespaced_event, NS)
        return [e.reason for e in events.items]

    def restart_controller(self) -> None:
        self.controller = self.controller.again()
        self.children.append(self.controller.start())

    async def start_rollout(self, name: str, **gates: Any) -> None:
        body = {
            "apiVersion": "loractl.io/v1alpha1",
            "kind": "AdapterRollout",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {
                "pool": "pool",
                "model": "food-review",
                "configMap": {"name": "adapters"},
                "from": {"id": "food-review-1", "source": self.adapters["food-review-1"]},
                "to": {"id": "food-review-2", "source": self.adapters["food-review-2"]},
                "steps": [{"weight": 20, "pause": "3s"}, {"weight": 60, "pause": "3s"}],
                "gates": {
                    "minRequests": 5,
                    "maxErrorRate": 0.05,
                    "maxP95LatencyRatio": None,
                    "minRequestsTimeout": "30s",
                    **gates,
                },
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


def _started(children: list[ChildProcess], process: ChildProcess, url: str) -> ChildProcess:
    children.append(process.start())
    process.wait_http_ok(url, timeout=30)
    return process


@pytest_asyncio.fixture
async def cluster(kmock: KubernetesEmulator, tmp_path: Path) -> AsyncIterator[Cluster]:
    for resource, kind in RESOURCES.items():
        status = ["status"] if kind == "AdapterRollout" else []
        kmock.resources[resource] = ResourceInfo(namespaced=True, kind=kind, subresources=status)
    kubeconfig = write_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")
    env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}
    api = ApiClient()
    api.configuration.host = str(kmock.url).rstrip("/")
    adapters = {
        name: str(write_adapter(tmp_path / "adapters" / name, seed=seed))
        for seed, name in enumerate(("food-review-1", "food-review-2"))
    }
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
            "metadata": {"name": "food-review"},
            "spec": {
                "modelName": "food-review",
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
        cluster = await asyncio.to_thread(
            _start_processes, api, tmp_path, env, first_config, adapters, children
        )
        # The pods exist now: tell the API, with the ports the processes got.
        for index, host in enumerate(HOSTS):
            await _create(api, "Pod", _pod(index, host, cluster))
        await _patch_pool_port(api, cluster)
        await asyncio.to_thread(_wait_routable, cluster)
        yield cluster
    finally:
        for child in reversed(children):
            await asyncio.to_thread(child.stop)
        api.close()  # type: ignore[no-untyped-call]


SIM_PORT: dict[Path, int] = {}
SIDECAR_PORT: dict[Path, int] = {}


def _start_processes(
    api: ApiClient,
    work: Path,
    env: dict[str, str],
    first_config: str,
    adapters: dict[str, str],
    children: list[ChildProcess],
) -> Cluster:
    sim_port, sidecar_port = free_port(HOSTS[0]), free_port(HOSTS[0])
    SIM_PORT[work], SIDECAR_PORT[work] = sim_port, sidecar_port
    sims = []
    for host in HOSTS:
        process, _ = simulator_process(
            work / "logs",
            "--time-scale",
            "0",
            "--allow-runtime-lora-updating",
            "--max-loras",
            "2",
            host=host,
        )
        process.argv[process.argv.index("--port") + 1] = str(sim_port)
        url = f"http://{host}:{sim_port}"
        _started(children, process, f"{url}/health")
        sims.append(url)
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
        _started(children, sidecar, f"http://{host}:{sidecar_port}/healthz")
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
    _started(children, controller, f"http://127.0.0.1:{metrics_port}/healthz")
    envoy = start_envoy(children, work, grpc_port)
    return Cluster(api, work, children, sims, adapters, controller, argv, envoy)


def _pod(index: int, host: str, cluster: Cluster) -> dict[str, Any]:
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


async def _patch_pool_port(api: ApiClient, cluster: Cluster) -> None:
    port = SIM_PORT[cluster.work]
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
    body = {"model": "food-review", "prompt": "hi", "max_tokens": 2}
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


@pytest.mark.asyncio
async def test_a_healthy_canary_walks_every_step_and_promotes(cluster: Cluster) -> None:
    with steady_traffic(cluster) as traffic:
        await cluster.start_rollout("healthy")
        done = await cluster.wait_phase("healthy", {"Promoted", "Aborted", "Failed"})
        promoted_at = time.monotonic()
        await asyncio.sleep(1.0)
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
    before = Counter(m for t, _, m in traffic.answers if t < promoted_at)
    assert before["food-review-2"] > 0, "the canary served before promotion"
    assert before["food-review-1"] > before["food-review-2"], "but less than the baseline"
    after = {m for t, _, m in traffic.answers if t > promoted_at + 0.5}
    assert after == {"food-review-2"}
    reasons = await cluster.event_reasons()
    assert {"LoadingAdapter", "StepStarted", "Promoted"} <= set(reasons)

    async def unloaded() -> bool:
        return all("food-review-1" not in adapters for adapters in await cluster.registered())

    deadline = time.monotonic() + 20
    while not await unloaded():
        assert time.monotonic() < deadline, await cluster.registered()
        await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_a_failing_canary_is_aborted_and_traffic_returns(cluster: Cluster) -> None:
    for url in cluster.sims:
        await asyncio.to_thread(
            httpx.post,
            f"{url}/sim/error-rate",
            json={"model": "food-review-2", "rate": 0.6, "status": 500},
        )
    with steady_traffic(cluster) as traffic:
        await cluster.start_rollout("failing")
        done = await cluster.wait_phase("failing", {"Promoted", "Aborted", "Failed"})
        aborted_at = time.monotonic()
        await asyncio.sleep(1.0)
    status = done["status"]
    assert status["phase"] == "Aborted", status
    failed = [g for g in status["lastGates"] if not g["passed"]]
    assert failed, status["lastGates"]
    assert await cluster.weights() == {"food-review-1": 100}
    listed, removed = await cluster.adapter_lists()
    assert "food-review-1" in listed
    assert "food-review-2" in removed
    after = {m for t, s, m in traffic.answers if t > aborted_at + 0.5}
    assert after == {"food-review-1"}, "traffic is back on from"
    assert "GatesFailed" in await cluster.event_reasons()


@pytest.mark.asyncio
async def test_a_controller_killed_mid_rollout_resumes_at_the_right_step(
    cluster: Cluster,
) -> None:
    with steady_traffic(cluster) as traffic:
        await cluster.start_rollout("resumed")
        while True:
            status = (await cluster.rollout("resumed")).get("status") or {}
            if status.get("phase") == "Progressing" and status.get("currentStep") == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(cluster.controller.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.restart_controller)
        done = await cluster.wait_phase("resumed", {"Promoted", "Aborted", "Failed"})
    status = done["status"]
    assert status["phase"] == "Promoted", status
    steps = [h["step"] for h in status["history"] if h["reason"] == "StepStarted"]
    assert steps == [0, 1], f"no step repeated or skipped: {status['history']}"
    assert traffic.statuses()[200] > 0


def _second_picker(address: str) -> Callable[[dict[str, Any]], None]:
    """Both controllers' pickers behind the gateway, as two replicas behind one Service."""

    def tweak(config: dict[str, Any]) -> None:
        host, port = address.rsplit(":", 1)
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == PICKER_CLUSTER:
                cluster["load_assignment"]["endpoints"].append(
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": host, "port_value": int(port)}
                                    }
                                }
                            }
                        ]
                    }
                )

    return tweak


@pytest.mark.asyncio
async def test_two_controllers_only_the_lease_holder_writes(cluster: Cluster) -> None:
    argv = list(cluster.controller_argv)
    ports = {flag: free_port() for flag in ("--grpc-port", "--grpc-health-port", "--metrics-port")}
    for flag, port in ports.items():
        argv[argv.index(flag) + 1] = str(port)
    env = {"KUBECONFIG": str(cluster.work / "kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    second = ChildProcess("controller-2", argv, cluster.work / "logs" / "controller-2.log", env=env)
    await asyncio.to_thread(
        _started, cluster.children, second, f"http://127.0.0.1:{ports['--metrics-port']}/healthz"
    )
    first_port = int(cluster.controller_argv[cluster.controller_argv.index("--grpc-port") + 1])
    gateway = await asyncio.to_thread(
        start_envoy,
        cluster.children,
        cluster.work,
        first_port,
        _second_picker(f"127.0.0.1:{ports['--grpc-port']}"),
    )
    cluster.envoy = gateway
    with steady_traffic(cluster):
        await cluster.start_rollout("contended")
        done = await cluster.wait_phase("contended", {"Promoted", "Aborted", "Failed"})
    assert done["status"]["phase"] == "Promoted", done["status"]
    logs = [cluster.controller.log_path.read_text(), second.log_path.read_text()]
    leaders = [i for i, text in enumerate(logs) if '"event": "leadership_acquired"' in text]
    writers = [i for i, text in enumerate(logs) if '"event": "rollout_event"' in text]
    assert len(leaders) == 1, "exactly one controller leads"
    assert writers == leaders, "and only the leader wrote"
    lease = await call(
        CoordinationV1Api(cluster.api).read_namespaced_lease, "loractl-controller", NS
    )
    assert lease.spec.holder_identity
