"""The real-vLLM stage: one vLLM install, one tiny model and two servers per session.

Run it alone with `.venv/bin/pytest -m real_vllm tests/real_vllm` (the default run leaves
it out). The servers take about a minute to start and 3 GB each, so every module shares
them; each test gets a server with no adapter registered.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from loractl.processes import ChildProcess, free_port
from tests.support.real_vllm import (
    BASE,
    AdapterSpec,
    TinyModel,
    Unavailable,
    VllmServer,
    build_model,
    ensure_installed,
    memory_problem,
    vllm_process,
)
from tests.support.vllm_api import unload_all

HOSTS = ("127.0.0.11", "127.0.0.12")
# Three r=8 adapters that each change the completions their own way, and one of rank 16
# for `--max-lora-rank 8` to refuse.
ADAPTERS = {
    "food-review-1": AdapterSpec(seed=1),
    "food-review-2": AdapterSpec(seed=2),
    "food-review-3": AdapterSpec(seed=3),
    "big": AdapterSpec(seed=4, rank=16),
}
_SKIPPED: list[Unavailable] = []


def unavailable(problem: Unavailable) -> NoReturn:
    """Skip the stage, loudly: the reason on every skipped test, and once more with its
    evidence in a banner at the end of the run."""
    if all(problem.reason != seen.reason for seen in _SKIPPED):
        _SKIPPED.append(problem)
    pytest.skip(f"real vLLM cannot run on this machine: {problem.reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for problem in _SKIPPED:
        terminalreporter.section("REAL VLLM STAGE SKIPPED", sep="!", red=True, bold=True)
        terminalreporter.write_line(f"vLLM cannot run on this machine: {problem.reason}", red=True)
        if problem.details:
            terminalreporter.write_line(problem.details)
        terminalreporter.write_line("No test of this stage proved anything against real vLLM.")


@pytest.fixture(scope="session")
def vllm_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.monotonic()
    try:
        python = ensure_installed(tmp_path_factory.mktemp("vllm-install") / "install.log")
    except Unavailable as exc:
        unavailable(exc)
    problem = memory_problem(len(HOSTS))
    if problem:
        unavailable(Unavailable(problem))
    print(f"vLLM environment ready in {time.monotonic() - started:.0f}s: {python}")
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    out = build_model(vllm_python, tmp_path_factory.mktemp("tiny-model"), ADAPTERS)
    return TinyModel(out / "model", {name: str(out / "adapters" / name) for name in ADAPTERS})


def _same_free_port(hosts: tuple[str, ...]) -> int:
    """A port free on every host: pods behind one InferencePool target port share it."""
    while True:
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port


@pytest.fixture(scope="session")
def vllm_servers(
    vllm_python: Path, tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[VllmServer]]:
    logs = tmp_path_factory.mktemp("vllm-logs")
    port = _same_free_port(HOSTS)
    children: list[ChildProcess] = []
    servers = []
    try:
        # Both at once: start-up is mostly imports and compilation, a minute each.
        for host in HOSTS:
            process, url = vllm_process(
                vllm_python, tiny_model.model_dir, host, port, logs, served_name=BASE
            )
            children.append(process.start())
            servers.append(VllmServer(host, port, url, process, children))
        started = time.monotonic()
        for server in servers:
            try:
                server.wait_ready()
            except Unavailable as exc:
                unavailable(exc)
        print(f"two vLLM servers ready in {time.monotonic() - started:.0f}s")
        yield servers
    finally:
        for child in children:
            child.stop(timeout=15)


@pytest.fixture
def vllm(vllm_servers: list[VllmServer]) -> Iterator[VllmServer]:
    """The first server, with no adapter registered before and after the test."""
    server = vllm_servers[0]
    if not server.process.alive():  # a test killed it and failed before bringing it back
        server.restart_and_wait()
    unload_all(server.url)
    yield server
    if server.process.alive():
        unload_all(server.url)
