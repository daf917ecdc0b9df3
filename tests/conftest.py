"""Shared fixtures: real processes on free ports, always cleaned up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.scheduling import compiled
from loractl.processes import ChildProcess
from simulator.adapter_files import write_adapter
from tests.support.sidecars import RunningSidecar, sidecar_process
from tests.support.simulators import RunningSimulator, simulator_process

FAST = ("--time-scale", "0")
RUNTIME_LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}


def pytest_sessionstart(session: pytest.Session) -> None:
    """With LORACTL_EXPECT_BUILD set (CI's compiled stage), refuse to run the tests on
    another build of the decision path than the one asked for."""
    expected = os.environ.get("LORACTL_EXPECT_BUILD")
    if expected is None:
        return
    imported = "compiled" if compiled() else "interpreted"
    if imported != expected:
        raise pytest.UsageError(
            f"LORACTL_EXPECT_BUILD={expected}, but the {imported} decision path is imported: "
            "put the build's directory first on PYTHONPATH and run pytest from inside it"
        )


@pytest.fixture
def children() -> Iterator[list[ChildProcess]]:
    """Every process a test starts goes in here and is stopped after the test, pass or fail."""
    started: list[ChildProcess] = []
    yield started
    for child in started:
        child.stop()
    assert not any(child.alive() for child in started)


SimulatorFactory = Callable[..., RunningSimulator]


@pytest.fixture
def start_simulator(children: list[ChildProcess], tmp_path: Path) -> SimulatorFactory:
    def start(
        *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None
    ) -> RunningSimulator:
        process, url = simulator_process(
            tmp_path / "logs", *args, host=host, env=RUNTIME_LORA_ENV if env is None else env
        )
        children.append(process.start())
        process.wait_http_ok(f"{url}/health")
        return RunningSimulator(url, process)

    return start


@pytest.fixture
def adapters(tmp_path: Path) -> Callable[..., str]:
    """Make a PEFT adapter directory; returns its path as a string (what vLLM gets)."""
    counter = iter(range(1_000_000))

    def make(name: str | None = None, **kwargs: object) -> str:
        seed = next(counter)
        directory = tmp_path / "adapters" / (name or f"adapter-{seed}")
        return str(write_adapter(directory, seed=seed, **kwargs))  # type: ignore[arg-type]

    return make


SidecarFactory = Callable[..., RunningSidecar]


@pytest.fixture
def start_sidecar(children: list[ChildProcess], tmp_path: Path) -> SidecarFactory:
    """Start `loractl sidecar` against a vLLM URL with a kubelet-style config directory."""
    counter = iter(range(1000))

    def start(
        vllm_url: str, config_text: str | None, *args: str, env: dict[str, str] | None = None
    ) -> RunningSidecar:
        work_dir = tmp_path / f"sidecar-{next(counter)}"
        sidecar = sidecar_process(work_dir, vllm_url, config_text, *args, env=env)
        children.append(sidecar.process.start())
        sidecar.process.wait_http_ok(f"{sidecar.url}/healthz")
        return sidecar

    return start
