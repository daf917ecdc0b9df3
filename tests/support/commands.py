"""Start a loractl command the way an operator would, to see how it refuses bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loractl.processes import free_port
from tests.support.gateway import inference_model, write_models
from tests.support.simulators import loractl_argv

HOST = "127.0.0.1"
LISTEN_FLAGS = {
    "controller": ("--grpc-port", "--grpc-health-port", "--metrics-port"),
    "sidecar": ("--port",),
    "sim": ("--port",),
}


def run_command(command: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`command` with what it needs to start, every port free unless `flags` give it."""
    argv = loractl_argv(command, "--host", HOST, "--log-level", "error")
    if command == "controller":
        models = write_models(tmp_path / "models.yaml", [inference_model("base")])
        argv += ["--endpoints", "127.0.0.1:1", "--models", str(models)]
    if command == "sidecar":
        argv += ["--config", str(tmp_path / "config.yaml"), "--adapter-dir", str(tmp_path)]
    for flag in LISTEN_FLAGS[command]:
        if flag not in flags:
            argv += [flag, str(free_port(HOST))]
    # A command that does start serves until stopped: the timeout fails the test then.
    return subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=60, check=False)
