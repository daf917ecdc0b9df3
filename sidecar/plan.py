"""Reconcile planning: desired config + what vLLM has registered + history → actions.

A pure function, so every rule is tested without a socket. Running the actions
(downloads, vLLM calls, bookkeeping) is the reconciler's job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from sidecar.config import AdapterSpec, DesiredState
from sidecar.sources import HuggingFaceSource, LocalSource
from sidecar.status import AdapterRecord


@dataclass(frozen=True)
class Load:
    spec: AdapterSpec
    inplace: bool
    reason: str

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class Adopt:
    """Already registered from the source we want (e.g. after a sidecar restart): just record it."""

    spec: AdapterSpec
    root: str

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class Unload:
    id: str
    reason: str


Action = Load | Adopt | Unload


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    backing_off: dict[str, float] = field(default_factory=dict)
    """Ids with work to do that wait for their backoff to expire: id → monotonic retry time."""


def plan(
    desired: DesiredState,
    registered: Mapping[str, str],
    records: Mapping[str, AdapterRecord],
    busy: Set[str],
    now: float,
    *,
    prune: bool,
    adapter_dir: str,
) -> Plan:
    result = Plan()
    for spec in desired.ensure_exist.values():
        if spec.id in busy:
            continue
        action = _converge(spec, registered.get(spec.id), records.get(spec.id), adapter_dir)
        _schedule(result, action, records.get(spec.id), now)
    doomed = set(desired.ensure_not_exist)
    if prune:
        doomed |= registered.keys() - desired.ensure_exist.keys() - desired.problems.keys()
    for adapter_id in sorted(doomed & registered.keys() - busy):
        reason = "listed in ensureNotExist" if adapter_id in desired.ensure_not_exist else "pruned"
        _schedule(result, Unload(adapter_id, reason), records.get(adapter_id), now)
    return result


def _converge(
    spec: AdapterSpec, root: str | None, record: AdapterRecord | None, adapter_dir: str
) -> Action | None:
    if root is None:
        loaded_before = record is not None and record.loaded_source is not None
        return Load(
            spec,
            inplace=False,
            reason="re-register: vLLM lost it" if loaded_before else "not registered",
        )
    if record is None or record.loaded_source is None:
        if _root_matches(spec, root, adapter_dir):
            return Adopt(spec, root)
        return Load(spec, inplace=True, reason=f"registered from another path ({root})")
    if record.loaded_source != spec.source_key:
        return Load(spec, inplace=True, reason=f"source changed from {record.loaded_source}")
    if record.loaded_path is not None and os.path.normpath(root) != os.path.normpath(
        record.loaded_path
    ):
        return Load(spec, inplace=True, reason=f"registered path changed to {root}")
    return None


def _root_matches(spec: AdapterSpec, root: str, adapter_dir: str) -> bool:
    if isinstance(spec.source, LocalSource):
        return os.path.normpath(root) == os.path.normpath(spec.source.path)
    assert isinstance(spec.source, HuggingFaceSource)
    ours = os.path.join(os.path.normpath(adapter_dir), spec.id) + os.sep
    if not os.path.normpath(root).startswith(ours):
        return False
    revision = spec.source.revision
    pinned_commit = revision is not None and len(revision) == 40
    return not pinned_commit or f"{os.sep}{revision}" in root


def _schedule(
    result: Plan, action: Action | None, record: AdapterRecord | None, now: float
) -> None:
    if action is None:
        return
    if record is not None and now < record.retry_at and not isinstance(action, Adopt):
        result.backing_off[action.id] = record.retry_at
        return
    result.actions.append(action)
