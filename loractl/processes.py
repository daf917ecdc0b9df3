"""Child processes that always go away: each in its own process group, stopped with
SIGTERM then SIGKILL, with output kept in a log file for whoever has to explain a failure.

Used by `loractl demo` and by the tests, which both start many servers at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

_LIVE: set[ChildProcess] = set()


class ChildProcessError(RuntimeError):
    """A child died or never became ready; the message carries the tail of its log."""


class ChildProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def again(self) -> ChildProcess:
        """A new, unstarted process like this one (same command, environment and log file),
        as a container restart would bring back."""
        return ChildProcess(self.name, self.argv, self.log_path, env=self._env, cwd=self._cwd)

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._popen = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,  # own process group: its children die with it
            )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was never started"
        return self._popen.pid

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll `ready` until it holds; fail fast with the log if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ChildProcessError(
                    f"{self.name} exited with code {self.returncode()} before it was {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise ChildProcessError(
            f"{self.name} was not {what} after {timeout:.0f}s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def wait_http_ok(self, url: str, timeout: float = 30.0) -> None:
        def answers() -> bool:
            try:
                return httpx.get(url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(answers, timeout, what=f"answering 200 on {url}")

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; its exit code."""
        assert self._popen is not None, f"{self.name} was never started"
        return self._popen.wait(timeout)

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the whole group, SIGKILL what is left after `timeout`."""
        if self._popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self._popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # grandchildren that outlived their parent
        _LIVE.discard(self)
        return self._popen.returncode

    def kill(self) -> None:
        """Die like a crashed container: no chance to clean up."""
        self.signal(signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait(5)


_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and never one this process was given before: the
    system may offer a port it just freed again, so `free_port(), free_port()` (a listener
    and an admin port, say) would otherwise collide now and then."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


@atexit.register
def _stop_all_children() -> None:
    for child in list(_LIVE):
        child.stop(timeout=2.0)
