"""The optional compiled build of the picker's decision path.

Everything about the package is in pyproject.toml; this file only adds the native
modules. With LORACTL_COMPILE=1 the modules below are compiled to C extensions by mypyc
from the same Python source (the container image is built this way): one scheduling
decision then takes less than half the time. Without it, nothing is compiled and no
compiler is needed.

Left off by default because a compiled module shadows its source: after editing one of
these files in an editable install, the old compiled code would keep running until the
next build.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILE_VARIABLE = "LORACTL_COMPILE"

DECISION_PATH = [
    "controller/inventory.py",
    "controller/scheduling/columns.py",
    "controller/scheduling/filters.py",
    "controller/scheduling/pickers.py",
    "controller/scheduling/pipeline.py",
    "controller/scheduling/residency.py",
    "controller/scheduling/scorers.py",
    "controller/scheduling/types.py",
    "controller/scheduling/upstream.py",
]
"""What one decision runs through: the inventory's views, the plugins, the pipeline.
The rest of the picker (gRPC, JSON, model resolution) stays interpreted."""


def native_modules() -> list[object]:
    setting = os.environ.get(COMPILE_VARIABLE, "0")
    if setting not in ("0", "1"):
        raise SystemExit(f"{COMPILE_VARIABLE} must be 0 or 1, not {setting!r}")
    if setting == "0":
        return []
    from mypyc.build import mypycify  # a build requirement (pyproject.toml)

    return list(mypycify(DECISION_PATH, opt_level="3", group_name="loractl_decision_path"))


setup(ext_modules=native_modules())
