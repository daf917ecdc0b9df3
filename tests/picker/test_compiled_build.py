"""The compiled build (LORACTL_COMPILE=1, what the container image ships): built by pip from
this checkout, it must make exactly the decisions the source makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.builds import BUILDS, Build, BuildError, environment, install

DECISIONS_PER_RUN = 4 * 1500 + 1  # two profiles, two pool sizes, and the header line


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[Build, Path]:
    root = tmp_path_factory.mktemp("builds")
    return {build: install(build, root / build) for build in BUILDS}


def replay(target: Path) -> list[str]:
    # One hash seed for both, so that this test only ever fails on a difference between
    # the builds (independence from the seed has its own test in test_residency.py).
    env = environment(target) | {"PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "tests.support.decision_replay"]
    done = subprocess.run(
        command, cwd=target, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.splitlines()


@pytest.mark.timeout(600)
def test_the_compiled_decision_path_decides_exactly_as_the_source(
    builds: dict[Build, Path],
) -> None:
    source, compiled = replay(builds["interpreted"]), replay(builds["compiled"])
    assert source[0] == '{"compiled": false}'
    assert compiled[0] == '{"compiled": true}'
    assert len(source) == len(compiled) == DECISIONS_PER_RUN
    pairs = zip(source[1:], compiled[1:], strict=True)
    differing = [i for i, (a, b) in enumerate(pairs, start=1) if a != b]
    assert not differing, (
        f"{len(differing)} decisions differ, the first:\n"
        f"source:   {source[differing[0]]}\ncompiled: {compiled[differing[0]]}"
    )


def test_a_compile_setting_other_than_0_or_1_stops_the_build(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="LORACTL_COMPILE must be 0 or 1, not 'yes'"):
        install("compiled", tmp_path / "build", setting="yes")
    assert not (tmp_path / "build" / "controller").exists()
