"""The metrics loractl exposes, read from the code's own registries, not from a list.

The sidecar's registry, and one built the way `loractl controller` builds its own (picker,
scraper and rollout metrics on one registry), with empty state: collector-based families
are still yielded then, without samples.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from controller.backend.local import LocalBackend
from controller.extproc.outcomes import Outcomes
from controller.inventory import Inventory
from controller.picker_metrics import OutcomeCollector, PickerMetrics
from controller.rollout.runner import RolloutMetrics
from controller.scrape import Scraper
from sidecar.metrics import SidecarMetrics
from tests.ops.schemas import ROOT

# The series a family of each type exposes (prometheus_client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
CODE = ("sidecar", "controller", "loractl")
OUR_PREFIXES = ("loractl_", "lora_syncer_")


def registries() -> dict[str, CollectorRegistry]:
    controller = CollectorRegistry()
    inventory = Inventory()
    PickerMetrics(controller, inventory)
    controller.register(OutcomeCollector(Outcomes(lambda context, status, elapsed: None)))
    Scraper(inventory, registry=controller)
    # Never started: it reads nothing from the directory, and holds no rollouts.
    RolloutMetrics(controller, LocalBackend(Path("unused")))
    return {"sidecar": SidecarMetrics(list).registry, "controller": controller}


def families() -> dict[str, tuple[str, str]]:
    """Family name → (type, the process exposing it)."""
    return {
        family.name: (family.type, process)
        for process, registry in registries().items()
        for family in registry.collect()
    }


def series_names() -> set[str]:
    return {name + suffix for name, (kind, _) in families().items() for suffix in SUFFIXES[kind]}


def names_in_source() -> set[str]:
    """Metric-like string literals in the code: what the registries above must cover."""
    pattern = re.compile(r"""["'](({})[a-z0-9_]+)["']""".format("|".join(OUR_PREFIXES)))
    return {
        match.group(1)
        for package in CODE
        for path in (ROOT / package).rglob("*.py")
        for match in pattern.finditer(path.read_text())
    }
