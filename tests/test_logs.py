"""`--log-level`: the same on every command, and a bad level is refused with the good ones."""

from __future__ import annotations

import subprocess

import pytest

from loractl.cli import build_parser
from tests.support.simulators import loractl_argv

COMMANDS = ("controller", "sidecar", "sim")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_log_level_is_refused_with_the_levels_to_give(command: str) -> None:
    done = subprocess.run(
        loractl_argv(command, "--log-level", "verbose"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "argument --log-level: invalid choice: 'verbose' "
        "(choose from 'debug', 'info', 'warning', 'error', 'critical')"
    ) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_log_levels_are_read_in_any_case(command: str) -> None:
    parser = build_parser()
    assert parser.parse_args([command, "--log-level", "WARNING"]).log_level == "warning"
    assert parser.parse_args([command]).log_level == "info"
