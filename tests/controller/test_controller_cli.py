"""`loractl controller` refuses bad flags and unusable ports with what to give, never a
traceback: a real process each time, as an operator would start it."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loractl.processes import free_port
from tests.support.gateway import inference_model, write_models
from tests.support.simulators import loractl_argv

HOST = "127.0.0.1"


def run_controller(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Static endpoints and models, every port free unless `flags` say otherwise."""
    models = write_models(tmp_path / "models.yaml", [inference_model("base")])
    argv = loractl_argv("controller", "--endpoints", "127.0.0.1:1", "--models", str(models))
    argv += ["--host", HOST, "--log-level", "error"]
    for flag in ("--grpc-port", "--grpc-health-port", "--metrics-port"):
        if flag not in flags:
            argv += [flag, str(free_port(HOST))]
    # A controller that does start serves until stopped: the timeout fails the test then.
    return subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--metrics-interval", "0", "must be more than 0 and at most 300 seconds; got 0"),
        ("--models-interval", "-1", "must be more than 0 and at most 300 seconds; got -1"),
        ("--sidecar-interval", "often", "expected seconds, such as 0.05; got 'often'"),
        ("--metrics-interval", "nan", "must be more than 0"),
        ("--max-body-bytes", "0", "must be at least 1; got 0"),
        ("--grpc-port", "70000", "must be a port from 1 to 65535; got 70000"),
        ("--grpc-health-port", "-5", "must be a port from 1 to 65535; got -5"),
        ("--metrics-port", "http", "expected a port number; got 'http'"),
        ("--sidecar-port", "0", "must be a port from 1 to 65535; got 0"),
        (
            "--endpoints",
            "10.0.0.1",
            "not an ip:port endpoint: '10.0.0.1'; give ip:port,ip:port,...",
        ),
        (
            "--endpoints",
            "10.0.0.1:8000,vllm-0:8000",
            "not an ip:port endpoint: 'vllm-0:8000'; give ip:port,ip:port,...",
        ),
        ("--endpoints", "10.0.0.1:80000", "port out of range in endpoint '10.0.0.1:80000'"),
        ("--endpoints", ",", "give at least one ip:port"),
    ],
)
def test_bad_flags_are_refused_with_what_to_give(
    flag: str, value: str, says: str, tmp_path: Path
) -> None:
    done = run_controller(tmp_path, flag, value)
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: {says}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("flag", ["--grpc-port", "--grpc-health-port", "--metrics-port"])
def test_a_taken_port_is_named_with_its_flag(flag: str, taken_port: int, tmp_path: Path) -> None:
    done = run_controller(tmp_path, flag, str(taken_port))
    assert done.returncode == 1, done.stderr
    assert (
        f"loractl controller: error: {flag}: cannot listen on {HOST}:{taken_port} ("
    ) in done.stderr
    assert f"stop what holds the port or choose another with {flag}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_tls_pair_that_is_not_pem_is_refused_before_listening(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    done = run_controller(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert done.returncode == 1, done.stderr
    assert (
        f"loractl controller: error: --tls-cert {cert} --tls-key {key}: not a PEM "
        "certificate and its private key ("
    ) in done.stderr
    assert "give the PEM files of one certificate and its key" in done.stderr
    assert "Traceback" not in done.stderr
