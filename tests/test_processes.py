"""Child processes never outlive their owner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loractl.processes import ChildProcess, ChildProcessError, free_port
from tests.support.simulators import loractl_argv


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: it only waits to be reaped by its parent.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_stop_takes_grandchildren_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    child = ChildProcess("shell", ["sh", "-c", script], tmp_path / "shell.log").start()
    child.wait_until(pid_file.exists, timeout=5, what="writing its pid")
    time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert pid_alive(grandchild)
    child.stop(timeout=2)
    assert not child.alive()
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    ignore_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    child = ChildProcess(
        "stubborn", [sys.executable, "-c", ignore_term], tmp_path / "s.log"
    ).start()
    child.wait_until(lambda: "up" in child.log_tail(), timeout=10, what="up")
    assert child.stop(timeout=0.5) == -9


def test_early_death_is_reported_with_its_log(tmp_path: Path) -> None:
    child = ChildProcess(
        "sim", loractl_argv("sim", "--max-lora-rank", "3"), tmp_path / "sim.log"
    ).start()
    with pytest.raises(ChildProcessError, match=r"exited with code 2[\s\S]*--max-lora-rank 3"):
        child.wait_http_ok("http://127.0.0.1:9/health", timeout=30)
    child.stop()


def test_cli_lists_its_subcommands() -> None:
    result = subprocess.run(loractl_argv("--help"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "sim" in result.stdout
    version = subprocess.run(loractl_argv("--version"), capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("loractl ")


class SocketOfferingPorts:
    """Stands in for the system's socket: offers the scripted ports in turn, as a kernel may
    offer a port it has just freed again (which cannot be forced for real)."""

    def __init__(self, offers: list[int]) -> None:
        self._offers = iter(offers)
        self._port = 0

    def __call__(self, *_args: object) -> SocketOfferingPorts:
        return self

    def __enter__(self) -> SocketOfferingPorts:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Nothing to close."""

    def bind(self, _address: tuple[str, int]) -> None:
        self._port = next(self._offers)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.9", self._port)


def test_free_port_never_gives_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    offers = SocketOfferingPorts([41000, 41000, 41001])
    monkeypatch.setattr("loractl.processes.socket.socket", offers)
    assert [free_port("127.0.0.9"), free_port("127.0.0.9")] == [41000, 41001]
