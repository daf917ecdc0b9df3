"""A whole gateway for tests: `loractl controller` (picker) processes and Envoy in front."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from controller.extproc.envoy_config import envoy_bootstrap, envoy_process, wait_envoy_ready
from controller.models import STICKY_HEADER_ANNOTATION
from loractl.processes import ChildProcess, free_port
from tests.support.simulators import loractl_argv


def inference_model(
    name: str, targets: dict[str, int] | None = None, criticality: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": name, "poolRef": {"name": "pool"}}
    if targets:
        spec["targetModels"] = [{"name": t, "weight": w} for t, w in targets.items()]
    if criticality:
        spec["criticality"] = criticality
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def sticky_by_annotation(model: dict[str, Any], header: str) -> dict[str, Any]:
    model["metadata"]["annotations"] = {STICKY_HEADER_ANNOTATION: header}
    return model


def write_models(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(models))
    return path


@dataclass
class Controller:
    process: ChildProcess
    argv: list[str]
    grpc_port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def inventory(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.metrics_url}/inventory", timeout=5).json()
        return data

    def wait_scraped(self, registered: dict[str, set[str]], timeout: float = 15.0) -> None:
        """Until every endpoint shows metrics and at least the given registered adapters."""

        def ready() -> bool:
            views = {v["address"]: v for v in self.inventory()["endpoints"]}
            return all(
                views.get(address, {}).get("metrics") is not None
                and wanted <= set(views[address].get("registered") or ())
                for address, wanted in registered.items()
            )

        self.process.wait_until(ready, timeout, what=f"scraped {registered}")

    def restart(self, children: list[ChildProcess]) -> None:
        """A new process on the same ports, as after a crash and a container restart."""
        self.process = self.process.again()
        children.append(self.process.start())
        self.process.wait_http_ok(f"{self.metrics_url}/healthz")


def start_controller(
    children: list[ChildProcess],
    work_dir: Path,
    endpoints: list[str],
    models: Path,
    *args: str,
) -> Controller:
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    argv = loractl_argv(
        "controller",
        "--host",
        "127.0.0.1",
        "--endpoints",
        ",".join(endpoints),
        "--models",
        str(models),
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        *args,
    )
    name = f"controller-{grpc_port}"
    process = ChildProcess(name, argv, work_dir / "logs" / f"{name}.log")
    children.append(process.start())
    process.wait_http_ok(f"http://127.0.0.1:{metrics_port}/healthz")
    return Controller(process, argv, grpc_port, metrics_port)


@dataclass
class Envoy:
    url: str
    process: ChildProcess
    tweaks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)


def start_envoy(
    children: list[ChildProcess],
    work_dir: Path,
    picker_port: int,
    tweak: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Envoy:
    listen_port, admin_port = free_port(), free_port()
    config = envoy_bootstrap(
        listen_port,
        f"127.0.0.1:{picker_port}",
        admin_port=admin_port,
        listen_host="127.0.0.1",
        **options,
    )
    if tweak is not None:
        tweak(config)
    process = envoy_process(config, work_dir / "envoy", f"envoy-{listen_port}")
    children.append(process.start())
    wait_envoy_ready(process, admin_port)
    return Envoy(f"http://127.0.0.1:{listen_port}", process)
