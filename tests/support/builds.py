"""The project installed into a directory of its own, interpreted or compiled.

Both builds go through pip and the project's build backend, exactly as a user's install
(or the container image's) would: `compiled` sets LORACTL_COMPILE=1 (see setup.py). To run
code against a build, start Python with the directory first on the path (see `environment`):
the checkout's own packages must not shadow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

PROJECT = Path(__file__).resolve().parents[2]

Build = Literal["interpreted", "compiled"]
BUILDS: tuple[Build, ...] = ("interpreted", "compiled")


class BuildError(RuntimeError):
    pass


def install(build: Build, target: Path, setting: str | None = None) -> Path:
    """Install the project (without its dependencies: the running environment has them)
    into `target`. Takes a few seconds interpreted, 20-60 s compiled on 2 cores.

    `setting` replaces the build's LORACTL_COMPILE value (to test the setting itself)."""
    if setting is None:
        setting = "1" if build == "compiled" else "0"
    env = {**os.environ, "LORACTL_COMPILE": setting}
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--disable-pip-version-check", "--target", str(target), str(PROJECT)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"pip could not build the {build} project:\n{done.stderr[-4000:]}")
    return target


def environment(target: Path) -> dict[str, str]:
    """Environment variables for a Python process that runs the build in `target`: its
    packages first, the checkout after it (for `tests` and `bench`, which are not
    installed). Run it with `target` as the working directory, because `python -m` puts
    the working directory ahead of everything."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(PROJECT)])}
