"""What every long-running command shares on its command line: `--log-level`, port flags
and a port it cannot listen on, each refused with what to give, never a traceback. Real
processes, as an operator would start them."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loractl.cli import build_parser
from tests.support.commands import HOST, LISTEN_FLAGS, run_command

COMMANDS = ("controller", "sidecar", "sim")


def assert_refused(done: subprocess.CompletedProcess[str], status: int, says: str) -> None:
    assert done.returncode == status, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_log_level_is_refused_with_the_levels_to_give(
    command: str, tmp_path: Path
) -> None:
    done = run_command(command, tmp_path, "--log-level", "verbose")
    assert_refused(
        done,
        2,
        "argument --log-level: invalid choice: 'verbose' "
        "(choose from 'debug', 'info', 'warning', 'error', 'critical')",
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_log_levels_are_read_in_any_case(command: str) -> None:
    parser = build_parser()
    assert parser.parse_args([command, "--log-level", "WARNING"]).log_level == "warning"
    assert parser.parse_args([command]).log_level == "info"


@pytest.mark.parametrize(
    ("command", "flag", "value", "says"),
    [
        ("controller", "--grpc-port", "70000", "must be a port from 1 to 65535; got 70000"),
        ("controller", "--grpc-health-port", "-5", "must be a port from 1 to 65535; got -5"),
        ("controller", "--metrics-port", "http", "expected a port number; got 'http'"),
        ("controller", "--sidecar-port", "0", "must be a port from 1 to 65535; got 0"),
        ("sidecar", "--port", "0", "must be a port from 1 to 65535; got 0"),
        ("sim", "--port", "65536", "must be a port from 0 to 65535; got 65536"),
    ],
)
def test_a_port_out_of_range_is_refused(
    command: str, flag: str, value: str, says: str, tmp_path: Path
) -> None:
    done = run_command(command, tmp_path, flag, value)
    assert_refused(done, 2, f": {says}")
    assert f"argument {flag}" in done.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "flag"),
    [(command, flag) for command, flags in LISTEN_FLAGS.items() for flag in flags],
)
def test_a_taken_port_is_named_with_its_flag(
    command: str, flag: str, taken_port: int, tmp_path: Path
) -> None:
    done = run_command(command, tmp_path, flag, str(taken_port))
    assert_refused(
        done, 1, f"loractl {command}: error: {flag}: cannot listen on {HOST}:{taken_port} ("
    )
    assert f"stop what holds the port or choose another with {flag}" in done.stderr
