"""Starting real sidecar processes next to simulators, with kubelet-style config dirs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from loractl.processes import ChildProcess, free_port
from tests.support.configmap_dir import write_configmap_dir
from tests.support.simulators import loractl_argv

CONFIG_KEY = "configmap.yaml"


def adapter_config(
    ensure_exist: dict[str, str], ensure_not_exist: tuple[str, ...] = (), **extra: Any
) -> str:
    """An upstream-format config document; adapters given as {id: source}."""
    body: dict[str, Any] = {
        "name": "test-adapters",
        "ensureExist": {"models": [{"id": i, "source": s} for i, s in ensure_exist.items()]},
        "ensureNotExist": {"models": [{"id": i, "source": "org/unused"} for i in ensure_not_exist]},
        **extra,
    }
    return yaml.safe_dump({"vLLMLoRAConfig": body})


@dataclass
class RunningSidecar:
    url: str
    process: ChildProcess
    config_dir: Path
    adapter_dir: Path

    @property
    def config_path(self) -> Path:
        return self.config_dir / CONFIG_KEY

    def publish(self, text: str) -> None:
        """Change the config the way the kubelet does: a `..data` symlink swap."""
        write_configmap_dir(self.config_dir, {CONFIG_KEY: text})

    def status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/status", timeout=5.0)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def adapter(self, adapter_id: str) -> dict[str, Any]:
        adapters: dict[str, Any] = self.status()["adapters"]
        return dict(adapters.get(adapter_id) or {})

    def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = 15.0, what: str = ""
    ) -> dict[str, Any]:
        """Poll /status until `condition(status)` holds; fail with the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if condition(status):
                return status
            if time.monotonic() > deadline or not self.process.alive():
                raise AssertionError(
                    f"sidecar never reached: {what}\nlast status: {status}\n"
                    f"log:\n{self.process.log_tail(40)}"
                )
            time.sleep(0.05)

    def wait_states(self, timeout: float = 15.0, **states: str) -> dict[str, Any]:
        def reached(status: dict[str, Any]) -> bool:
            adapters = status["adapters"]
            return all(adapters.get(i, {}).get("state") == s for i, s in states.items())

        return self.wait_for(reached, timeout, what=f"states {states}")


def sidecar_process(
    work_dir: Path,
    vllm_url: str,
    config_text: str | None,
    *args: str,
    env: dict[str, str] | None = None,
) -> RunningSidecar:
    config_dir = work_dir / "config"
    adapter_dir = work_dir / "adapters"
    if config_text is not None:
        write_configmap_dir(config_dir, {CONFIG_KEY: config_text})
    port = free_port()
    argv = loractl_argv(
        "sidecar", "--host", "127.0.0.1", "--port", str(port),
        "--config", str(config_dir / CONFIG_KEY), "--vllm-url", vllm_url,
        "--adapter-dir", str(adapter_dir), "--backoff-initial", "0.2", "--backoff-max", "2",
        *args,
    )  # fmt: skip
    name = f"sidecar-{port}"
    process = ChildProcess(name, argv, work_dir / "logs" / f"{name}.log", env=env)
    return RunningSidecar(f"http://127.0.0.1:{port}", process, config_dir, adapter_dir)
