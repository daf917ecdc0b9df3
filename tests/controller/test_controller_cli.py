"""`loractl controller` refuses bad flags and unusable TLS files with what to give, never a
traceback (the flags all commands share: tests/test_command_line.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.commands import run_command


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--metrics-interval", "0", "must be more than 0 and at most 300 seconds; got 0"),
        ("--models-interval", "-1", "must be more than 0 and at most 300 seconds; got -1"),
        ("--sidecar-interval", "often", "expected seconds, such as 0.05; got 'often'"),
        ("--metrics-interval", "nan", "must be more than 0"),
        ("--max-body-bytes", "0", "must be at least 1; got 0"),
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
        (
            "--sticky-header",
            "",
            "'' is not an HTTP header name: use letters, digits and '-', e.g. x-user-id",
        ),
        ("--sticky-header", "x user", "'x user' is not an HTTP header name"),
        ("--sticky-header", "x-user:", "'x-user:' is not an HTTP header name"),
    ],
)
def test_bad_flags_are_refused_with_what_to_give(
    flag: str, value: str, says: str, tmp_path: Path
) -> None:
    done = run_command("controller", tmp_path, flag, value)
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: {says}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flag", "path", "says"),
    [
        ("--models", "missing.yaml", "no such file"),
        ("--profile", ".", "is a directory; give the file's path"),
        ("--models", "/dev/null", "not a regular file; give the path of a file"),
        ("--tls-cert", "missing.pem", "no such file"),
    ],
)
def test_a_file_flag_that_names_no_file_is_refused_with_its_flag(
    flag: str, path: str, says: str, tmp_path: Path
) -> None:
    pair = ["--tls-key", "missing-key.pem"] if flag == "--tls-cert" else []
    done = run_command("controller", tmp_path, flag, path, *pair)
    assert done.returncode == 1, done.stderr
    assert f"loractl controller: error: {flag} {path}: {says}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_tls_pair_that_is_not_pem_is_refused_before_listening(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    done = run_command("controller", tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert done.returncode == 1, done.stderr
    assert (
        f"loractl controller: error: --tls-cert {cert} --tls-key {key}: not a PEM "
        "certificate and its private key ("
    ) in done.stderr
    assert "give the PEM files of one certificate and its key" in done.stderr
    assert "Traceback" not in done.stderr
