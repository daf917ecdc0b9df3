"""Starting real simulator processes for tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from loractl.processes import ChildProcess, free_port


@dataclass
class RunningSimulator:
    url: str
    process: ChildProcess

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0, **kwargs)  # type: ignore[arg-type]


def loractl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "loractl", *args]


def simulator_process(
    log_dir: Path, *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> tuple[ChildProcess, str]:
    port = free_port(host)
    argv = loractl_argv("sim", "--host", host, "--port", str(port), *args)
    name = f"sim-{host}-{port}"
    return ChildProcess(name, argv, log_dir / f"{name}.log", env=env), f"http://{host}:{port}"
