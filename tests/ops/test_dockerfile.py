"""The Dockerfile, read since it cannot be built here (no Docker engine): pinned slim base,
a final stage without build steps, non-root, `loractl` as entrypoint, OCI labels, and every
path it copies present in the build context."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass

from tests.ops.schemas import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OCI_LABELS = ("title", "description", "version", "licenses", "source")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def _instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [Instruction(*[*line.split(None, 1), ""][:2]) for line in logical]


INSTRUCTIONS = _instructions((ROOT / "Dockerfile").read_text())


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in INSTRUCTIONS:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


STAGES = _stages()
BUILD, FINAL = STAGES[0], STAGES[-1]


def _args(keyword: str, stage: list[Instruction]) -> list[str]:
    return [i.arguments for i in stage if i.keyword == keyword]


def _global_arg(name: str) -> str:
    [value] = [
        i.arguments.split("=", 1)[1]
        for i in INSTRUCTIONS[: INSTRUCTIONS.index(STAGES[0][0])]
        if i.keyword == "ARG" and i.arguments.startswith(f"{name}=")
    ]
    return value


def test_both_stages_use_one_pinned_slim_python() -> None:
    assert len(STAGES) == 2
    assert [stage[0].arguments.split()[0] for stage in STAGES] == ["${PYTHON_IMAGE}"] * 2
    image = _global_arg("PYTHON_IMAGE")
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+", image)
    assert match, f"{image}: pin a full Python version of a slim image"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum
    assert tuple(map(int, match.groups()[:2])) >= tuple(map(int, minimum.groups()))


def test_the_final_stage_only_copies_the_built_environment_and_runs_as_non_root() -> None:
    assert _args("RUN", FINAL) == [], "build steps belong in the build stage"
    [copy] = _args("COPY", FINAL)
    source, destination = copy.removeprefix("--from=build ").split()
    assert source == destination
    assert f"python -m venv {source}" in " ".join(_args("RUN", BUILD))
    [user] = _args("USER", FINAL)
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric, so Kubernetes can check runAsNonRoot"
    assert int(uid) > 0
    assert int(gid or uid) > 0
    [entrypoint] = _args("ENTRYPOINT", FINAL)
    command = json.loads(entrypoint)  # exec form: signals reach loractl itself
    [script] = PYPROJECT["project"]["scripts"]
    assert command == [f"{source}/bin/{script}"]


def test_the_final_stage_carries_the_oci_labels() -> None:
    labels = dict(
        re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', " ".join(_args("LABEL", FINAL)))
    )
    assert set(OCI_LABELS) <= set(labels)
    [version_arg] = [a for a in _args("ARG", FINAL) if a.startswith("VERSION=")]
    assert version_arg == f"VERSION={PYPROJECT['project']['version']}"
    assert labels["version"] == "${VERSION}"
    assert labels["licenses"] == PYPROJECT["project"]["license"]
    assert labels["title"] == PYPROJECT["project"]["name"]


def test_everything_the_build_copies_is_in_the_build_context() -> None:
    ignore = _dockerignore()
    sources = [
        source
        for copy in _args("COPY", BUILD)
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    ]
    packages = [
        name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    build_files = {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]}
    assert {*build_files, *packages} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else list(path.rglob("*.py"))
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _ignored(relative, ignore), f"{relative} is excluded by .dockerignore"


def test_the_image_compiles_the_decision_path() -> None:
    environment = " ".join(_args("ENV", BUILD))
    assert "LORACTL_COMPILE=1" in environment.split()
    installs = [run for run in _args("RUN", BUILD) if "pip install ." in run]
    assert installs, "the build stage installs the project"
    assert "gcc" in " ".join(_args("RUN", BUILD)), "mypyc's output needs a C compiler"


def test_the_dockerignore_keeps_local_state_out() -> None:
    ignore = _dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "loractl/__pycache__/x.pyc"):
        assert _ignored(path, ignore), path


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a directory above it,
    decides; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _regex(pattern.removeprefix("!").strip("/"))
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def _regex(pattern: str) -> re.Pattern[str]:
    translated = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            translated, index = translated + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            translated, index = translated + ".*", index + 2
        elif pattern[index] == "*":
            translated, index = translated + "[^/]*", index + 1
        elif pattern[index] == "?":
            translated, index = translated + "[^/]", index + 1
        else:
            translated, index = translated + re.escape(pattern[index]), index + 1
    return re.compile(translated)
