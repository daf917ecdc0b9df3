"""Canary rollouts end to end: the controller, the picker, three vLLM simulators each with
its sidecar, and a real Envoy, around the kmock Kubernetes API emulator.

Nothing is faked above the API: the sidecars watch the adapter ConfigMap through the API
and load what it lists, the picker routes by the InferenceModel weights the controller
writes, and the gates judge the answers the picker sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from kmock import KubernetesEmulator
from kubernetes.client import CoordinationV1Api

from controller.extproc.envoy_config import PICKER_CLUSTER
from controller.models import STICKY_HEADER_ANNOTATION
from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter
from tests.support.canary_cluster import (
    NS,
    Cluster,
    healthy_canary_promotes,
    open_cluster,
    started,
    steady_traffic,
)
from tests.support.gateway import start_envoy
from tests.support.kube import call
from tests.support.simulators import simulator_process

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _start_simulators(work: Path, children: list[ChildProcess]) -> list[str]:
    port = free_port(HOSTS[0])
    urls = []
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
        # Same port on every "pod", as behind one InferencePool target port.
        process.argv[process.argv.index("--port") + 1] = str(port)
        url = f"http://{host}:{port}"
        started(children, process, f"{url}/health")
        urls.append(url)
    return urls


@pytest_asyncio.fixture
async def cluster(kmock: KubernetesEmulator, tmp_path: Path) -> AsyncIterator[Cluster]:
    adapters = {
        name: str(write_adapter(tmp_path / "adapters" / name, seed=seed))
        for seed, name in enumerate(("food-review-1", "food-review-2"))
    }
    async with open_cluster(kmock, tmp_path, adapters, _start_simulators) as opened:
        yield opened


@pytest.mark.asyncio
async def test_a_healthy_canary_walks_every_step_and_promotes(cluster: Cluster) -> None:
    await healthy_canary_promotes(cluster)


@pytest.mark.asyncio
async def test_a_sticky_rollout_keeps_each_user_on_one_adapter(cluster: Cluster) -> None:
    # The controller runs without --sticky-header: the rollout's stickiness alone pins users.
    half = [{"weight": 50, "pause": "5m"}]
    await cluster.start_rollout("sticky", {"steps": half, "stickiness": {"header": "X-User-Id"}})
    async with asyncio.timeout(60):
        while len(await cluster.weights()) < 2:  # noqa: ASYNC110 (polls the API)
            await asyncio.sleep(0.1)
    model = await cluster.inference_model()
    assert model["metadata"]["annotations"] == {STICKY_HEADER_ANNOTATION: "x-user-id"}

    def targets(user: str) -> list[str]:
        body = {"model": "food-review", "prompt": "soup?", "max_tokens": 2}
        headers = {"x-user-id": user}
        with httpx.Client(timeout=10) as client:
            return [
                client.post(f"{cluster.envoy.url}/v1/completions", json=body, headers=headers)
                .json()
                .get("model", "")
                for _ in range(5)
            ]

    await asyncio.sleep(0.5)  # the picker's watch of the InferenceModel, a moment behind
    by_user = {user: await asyncio.to_thread(targets, user) for user in map(str, range(30))}
    assert all(len(set(seen)) == 1 for seen in by_user.values()), by_user
    assert {seen[0] for seen in by_user.values()} == {"food-review-1", "food-review-2"}


@pytest.mark.asyncio
async def test_a_failing_canary_is_aborted_and_traffic_returns(cluster: Cluster) -> None:
    for url in cluster.servers:
        await asyncio.to_thread(
            httpx.post,
            f"{url}/sim/error-rate",
            json={"model": "food-review-2", "rate": 0.6, "status": 500},
        )
    with steady_traffic(cluster) as traffic:
        await cluster.start_rollout("failing")
        done = await cluster.wait_phase("failing", {"Promoted", "Aborted", "Failed"})
        aborted_at = time.monotonic()
        if done["status"]["phase"] == "Aborted":
            await cluster.wait_unlisted("food-review-2")  # once drained
        await asyncio.sleep(1.0)
    status = done["status"]
    assert status["phase"] == "Aborted", status
    failed = [g for g in status["lastGates"] if not g["passed"]]
    assert failed, status["lastGates"]
    assert await cluster.weights() == {"food-review-1": 100}
    listed, removed = await cluster.adapter_lists()
    assert "food-review-1" in listed
    assert "food-review-2" in removed
    after = {a.model for a in traffic.answers if a.at > aborted_at + 0.5}
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
        started, cluster.children, second, f"http://127.0.0.1:{ports['--metrics-port']}/healthz"
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
