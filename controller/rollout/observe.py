"""What the rollout machine is shown: the cluster's objects, the inventory and live traffic.

Pure functions over snapshots, so the mapping from "what the picker and the sidecars
see" to gate figures is tested without sockets.
"""

from __future__ import annotations

import time
from datetime import datetime

from controller.backend.base import TrafficSplit
from controller.inventory import EndpointView
from controller.rollout.gates import Inventory, Traffic
from controller.rollout.machine import ModelView
from controller.rollout.spec import RolloutSpec, RolloutStatus
from controller.stats import TrafficStats
from sidecar.config import ConfigError, DesiredState, parse_config
from sidecar.status import AdapterState

LOADED = AdapterState.LOADED.value
FAILED = AdapterState.FAILED.value


def adapter_inventory(views: list[EndpointView], adapter: str) -> Inventory:
    """Ready pods, and those where `adapter` is loaded: the sidecar says so, or vLLM lists it."""
    ready = [view for view in views if view.endpoint.ready]
    loaded = unobserved = 0
    problems = []
    for view in ready:
        state = (view.sidecar_states or {}).get(adapter)
        if state == LOADED or (view.registered is not None and adapter in view.registered):
            loaded += 1
        elif state == FAILED:
            problems.append(f"{view.endpoint.pod or view.address}: the sidecar failed to load it")
        elif view.registered is None and view.sidecar_states is None:
            unobserved += 1
    return Inventory(len(ready), loaded, tuple(problems), unobserved)


def model_view(split: TrafficSplit | None) -> ModelView | None:
    if split is None:
        return None
    return ModelView(
        pool=split.pool or "", targets=split.targets, sticky_header=split.sticky_header
    )


def adapter_config(data: dict[str, str] | None, key: str) -> tuple[DesiredState | None, str | None]:
    """The parsed adapter document, or why there is none."""
    if data is None:
        return None, None
    text = data.get(key)
    if text is None:
        return None, f"the ConfigMap has no key {key!r}"
    try:
        return parse_config(text), None
    except ConfigError as exc:
        return None, f"the ConfigMap's {key!r} is rejected: {exc}"


def step_traffic(
    stats: TrafficStats, spec: RolloutSpec, status: RolloutStatus, now: datetime
) -> Traffic | None:
    """Both targets' answers since the current step began (stats keep monotonic time)."""
    since = status.step_started_at
    if since is None or spec.from_ is None:
        return None
    since_monotonic = time.monotonic() - max(0.0, (now - since).total_seconds())
    return Traffic(
        since=since,
        baseline=stats.summary(spec.model, spec.from_.id, since_monotonic),
        canary=stats.summary(spec.model, spec.to.id, since_monotonic),
    )
