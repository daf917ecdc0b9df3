"""The sidecar process with its optional Kubernetes features, against the kmock API emulator.

kmock serves on this test's event loop, so every blocking wait runs in a thread.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoreV1Api

from tests.conftest import SidecarFactory, SimulatorFactory
from tests.support.kube import call, write_kubeconfig
from tests.support.sidecars import CONFIG_KEY, adapter_config
from tests.support.simulators import loractl_argv

NAMESPACE = "serving"
CONFIGMAP = "food-review-adapters"
POD = "vllm-0"


@pytest.mark.asyncio
async def test_configmap_api_watch_and_pod_annotation(
    kmock: KubernetesEmulator,
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
    tmp_path: Path,
) -> None:
    kmock.resources["v1/configmaps"] = ResourceInfo(namespaced=True, kind="ConfigMap")
    kmock.resources["v1/pods"] = ResourceInfo(namespaced=True, kind="Pod")
    kubeconfig = write_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")
    api = ApiClient()
    api.configuration.host = str(kmock.url).rstrip("/")
    core = CoreV1Api(api)
    a, b = adapters("a"), adapters("b")
    first = adapter_config({"a": a})
    await call(
        core.create_namespaced_config_map,
        NAMESPACE,
        {"metadata": {"name": CONFIGMAP, "namespace": NAMESPACE}, "data": {CONFIG_KEY: first}},
    )
    await call(
        core.create_namespaced_pod,
        NAMESPACE,
        {"metadata": {"name": POD, "namespace": NAMESPACE}, "spec": {"containers": []}},
    )

    sim = await asyncio.to_thread(start_simulator, "--time-scale", "0")
    env = {
        "KUBECONFIG": str(kubeconfig),
        "POD_NAME": POD,
        "POD_NAMESPACE": NAMESPACE,
        "KUBERNETES_SERVICE_HOST": "",
    }
    sidecar = await asyncio.to_thread(
        start_sidecar,
        sim.url,
        first,
        "--watch-configmap",
        f"{NAMESPACE}/{CONFIGMAP}",
        "--annotate-pod",
        env=env,
    )
    await asyncio.to_thread(sidecar.wait_states, a="loaded")

    # Only the API changes: the kubelet's copy on disk still says "a only".
    await call(
        core.patch_namespaced_config_map,
        CONFIGMAP,
        NAMESPACE,
        {"data": {CONFIG_KEY: adapter_config({"a": a, "b": b})}},
        _content_type="application/merge-patch+json",
    )
    status = await asyncio.to_thread(sidecar.wait_states, 5.0, b="loaded")
    assert status["config"]["origin"] == "api"
    assert "b" not in sidecar.config_path.read_text()
    models = (await asyncio.to_thread(httpx.get, f"{sim.url}/v1/models")).json()["data"]
    assert {m["id"] for m in models if m["parent"]} == {"a", "b"}

    async def annotation() -> str | None:
        pod = await call(core.read_namespaced_pod, POD, NAMESPACE)
        return (pod.metadata.annotations or {}).get("loractl.io/adapters")

    async with asyncio.timeout(10):
        while await annotation() != "a=loaded,b=loaded":  # noqa: ASYNC110 - polling the API
            await asyncio.sleep(0.1)
    api.close()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--annotate-pod"], "--annotate-pod needs env POD_NAME and POD_NAMESPACE"),
        (["--watch-configmap", "just-a-name"], "expected NAMESPACE/NAME"),
        (["--ready-when", "most"], "invalid choice: 'most'"),
    ],
)
def test_bad_flags_are_refused_with_the_fix(tmp_path: Path, flags: list[str], message: str) -> None:
    result = subprocess.run(
        loractl_argv("sidecar", "--config", str(tmp_path / "c.yaml"), *flags),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert message in result.stderr
