"""`loractl canary` and `loractl adapters`: start, follow and steer AdapterRollouts; show
which adapter every pod holds.

The pure parts come first: the rollout a `start` builds from its flags and a snapshot of
the cluster (every problem found, none written), the status view, the spec patch of each
command, the pods x adapters matrix. The I/O comes last and stays thin.

Reads are one-shot lists and gets, not the controller backend's caches: `KubeBackend.start`
opens a watch per resource and retries forever on an unreachable server or a 403, without
telling its caller which; a command line must say which server, verb and resource failed,
at once. The snapshot is interpreted by the backend's own pure functions
(`traffic_split`, `pool_spec`), so the CLI and the controller read the cluster alike.
Writes go through `KubeBackend` (`create_rollout`, `patch_rollout_spec`).

Library log lines are silenced: every problem reaches the user as a sentence of ours.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from loractl.flags import header_problem

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from controller.backend.kube import KubeBackend
    from controller.endpoints import PoolSpec
    from controller.local_cluster import LocalCluster
    from controller.rollout.spec import GateEvaluation, RolloutStatus
    from sidecar.config import DesiredState

EXIT_OK = 0
EXIT_ENDED_BADLY = 1
EXIT_INVALID = 2
EXIT_API = 3
EXIT_INTERRUPTED = 130
EXIT_CODES = """\
exit codes:
  0    done (with --watch: the rollout was Promoted)
  1    with --watch: the rollout ended Aborted or Failed
  2    invalid input, or nothing to act on (unknown model, pool or ConfigMap, no rollout
       for the model, a rollout that already ended); nothing was written
  3    the Kubernetes API could not be used: no credentials, unreachable, refused
       (401/403), or the AdapterRollout CRD not installed
  130  interrupted (Ctrl-C)
"""

ROLLOUT_GROUP = "loractl.io"
ROLLOUT_VERSION = "v1alpha1"
MODEL_GROUP = "inference.networking.x-k8s.io"
MODEL_VERSION = "v1alpha2"
ANNOTATION = "loractl.io/adapters"  # written by the sidecar's --annotate-pod
DEFAULT_KEY = "configmap.yaml"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
CRD_MANIFEST = "manifests/crds/adapterrollouts.loractl.io.yaml"
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_NAME = 253
HISTORY_SHOWN = 5
WATCH_INTERVAL = 2.0  # seconds
CLEAR_SCREEN = "\x1b[H\x1b[2J"
NOT_REPORTED = "-"
NO_ANNOTATION = "?"


class CliError(Exception):
    """Ends a command: every problem is printed, each naming its fix."""

    def __init__(self, problems: str | Sequence[str], code: int = EXIT_INVALID) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))
        self.code = code


# ==== the objects, as read ====


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: what an RBAC rule names, and where it is served."""

    group: str  # "" for the core API
    version: str
    plural: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


ROLLOUTS = Resource(ROLLOUT_GROUP, ROLLOUT_VERSION, "adapterrollouts", "AdapterRollout")
INFERENCE_MODELS = Resource(MODEL_GROUP, MODEL_VERSION, "inferencemodels", "InferenceModel")
MODEL_REWRITES = Resource(
    MODEL_GROUP, MODEL_VERSION, "inferencemodelrewrites", "InferenceModelRewrite"
)
POOLS = (
    Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool"),
    Resource(MODEL_GROUP, MODEL_VERSION, "inferencepools", "InferencePool"),
)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
PODS = Resource("", "v1", "pods", "Pod")


@dataclass(frozen=True)
class RolloutRecord:
    namespace: str
    name: str
    created: str  # RFC 3339, so it sorts as text; "" when the server gave none
    resource_version: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> RolloutRecord:
        metadata = obj.get("metadata") or {}
        return cls(
            namespace=str(metadata.get("namespace") or ""),
            name=str(metadata.get("name") or ""),
            created=str(metadata.get("creationTimestamp") or ""),
            resource_version=str(metadata.get("resourceVersion") or ""),
            spec=obj.get("spec") or {},
            status=obj.get("status") or {},
        )

    @property
    def model(self) -> str:
        return str(self.spec.get("model") or "")

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    @property
    def terminal(self) -> bool:
        from controller.rollout.spec import TERMINAL_PHASES

        return self.phase in TERMINAL_PHASES

    def ref(self) -> str:
        return f"AdapterRollout {self.namespace}/{self.name}"

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "created": self.created or None,
            "resourceVersion": self.resource_version,
            "spec": dict(self.spec),
            "status": dict(self.status),
        }


def select_rollout(records: Iterable[RolloutRecord], model: str) -> RolloutRecord | None:
    """The model's newest rollout still under way, else its newest."""
    mine = [record for record in records if record.model == model]
    candidates = [record for record in mine if not record.terminal] or mine
    return max(candidates, key=lambda r: (r.created, r.name), default=None)


def no_rollout_problem(records: Sequence[RolloutRecord], model: str, namespace: str) -> str:
    models = sorted({record.model for record in records})
    here = (
        f"the rollouts there are for {', '.join(models)}"
        if models
        else "there are none at all (another --namespace?)"
    )
    return (
        f"no AdapterRollout in namespace {namespace} is for model {model!r}: {here}; start "
        f"one with `loractl canary start {model} --to ID --source SOURCE`"
    )


# ==== canary start: the rollout from flags and a snapshot of the cluster ====


@dataclass(frozen=True)
class StartFlags:
    model: str
    to: str
    source: str
    from_id: str | None = None
    pool: str | None = None
    configmap: str | None = None
    key: str = DEFAULT_KEY
    steps: str = "10,50,100"
    pause: str = "5m"
    max_error_rate: float = 0.01
    max_p95_ratio: float = 1.5
    min_requests: int = 20
    sticky_header: str | None = None
    keep_on_abort: bool = False
    drain: str = "10s"
    name: str | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    """What `start` reads, once, before deciding anything."""

    namespace: str
    rollouts: tuple[RolloutRecord, ...] = ()
    models: tuple[Mapping[str, Any], ...] = ()
    """InferenceModels, then InferenceModelRewrites, each with its kind set."""
    pools: frozenset[str] = frozenset()
    configmaps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    manifest: dict[str, Any] | None  # None when there are problems
    notes: list[str]  # what was filled in from the cluster, for the user to see
    problems: list[str]


@dataclass
class _Draft:
    """A start being checked: what is known so far, and what is wrong."""

    flags: StartFlags
    cluster: ClusterSnapshot
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def plan_rollout(flags: StartFlags, cluster: ClusterSnapshot) -> Plan:
    """The AdapterRollout to create, or every problem with its fix; pure."""
    draft = _Draft(flags, cluster)
    name = _rollout_name(draft)
    _check_model_is_free(draft)
    steps = _steps(draft)
    gates = _gates(draft)
    _check_sticky_header(draft)
    _check_drain(draft)
    _check_to(draft)
    split = _split(draft)
    from_id = _from_id(draft, split)
    if from_id == flags.to:
        draft.problems.append(
            f"--to and --from are both {flags.to!r}: a rollout moves traffic between two "
            "different adapters; give the new weights a new --to id"
        )
    pool = _pool(draft, split)
    config_name = _configmap_name(draft)
    document = _adapter_document(draft, config_name)
    from_source = None
    if document is not None:
        _check_to_id_is_free(draft, document)
        from_source = _from_source(draft, document, from_id)
    if name is None or draft.problems:  # a part not found is a problem
        return Plan(None, draft.notes, draft.problems)
    spec: dict[str, Any] = {
        "pool": pool,
        "model": flags.model,
        "configMap": {"name": config_name, "key": flags.key},
        "from": {"id": from_id, "source": from_source},
        "to": {"id": flags.to, "source": flags.source},
        "steps": steps,
        "gates": gates,
        "keepOnAbort": flags.keep_on_abort,
        "drain": flags.drain,
    }
    if flags.sticky_header is not None:
        spec["stickiness"] = {"header": flags.sticky_header}
    return _checked_manifest(draft, name, spec)


def _checked_manifest(draft: _Draft, name: str, spec: dict[str, Any]) -> Plan:
    """The last word is the models' own: the controller will parse exactly this."""
    from controller.rollout.spec import SpecError, parse_spec, validate_spec

    try:
        parsed = parse_spec(spec)
    except SpecError as error:
        return Plan(None, draft.notes, error.problems)
    problems = validate_spec(parsed)
    if problems:
        return Plan(None, draft.notes, problems)
    metadata = {"name": name, "namespace": draft.cluster.namespace}
    manifest = {
        "apiVersion": f"{ROLLOUT_GROUP}/{ROLLOUT_VERSION}",
        "kind": ROLLOUTS.kind,
        "metadata": metadata,
        "spec": parsed.to_api(),
    }
    return Plan(manifest, draft.notes, [])


def dns_name(text: str) -> str:
    """`text` made a valid object name: lowercase, '-' for anything else, at most 253."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name)
    name = re.sub(r"[-.]*\.[-.]*", ".", name)  # no empty labels, none led or ended by '-'
    name = name[:MAX_NAME]
    return name.strip("-.") or "rollout"


def _rollout_name(draft: _Draft) -> str | None:
    flags, cluster = draft.flags, draft.cluster
    name = flags.name or dns_name(f"{flags.model}-{flags.to}")
    if flags.name is not None and not (len(name) <= MAX_NAME and DNS_NAME.match(name)):
        draft.problems.append(
            f"--name {name!r} is not a valid object name: use at most {MAX_NAME} lowercase "
            f"letters, digits, '-' and '.', starting and ending with a letter or digit "
            f"(e.g. {dns_name(name)})"
        )
        return None
    for record in cluster.rollouts:
        if record.name == name:
            draft.problems.append(
                f"{record.ref()} already exists (model {record.model}, phase {record.phase}): "
                f"pick another --name, or delete it with "
                f"`kubectl delete adapterrollout {name} -n {cluster.namespace}`"
            )
    return name


def _check_model_is_free(draft: _Draft) -> None:
    model = draft.flags.model
    for record in draft.cluster.rollouts:
        if record.model == model and not record.terminal:
            draft.problems.append(
                f"model {model!r} already has a rollout under way, {record.name} "
                f"(phase {record.phase}): two would fight over its weights; wait for it to "
                f"end, or stop it with `loractl canary abort {model}`"
            )


def parse_steps(text: str, pause: str) -> tuple[list[dict[str, Any]], list[str]]:
    """`--steps 10,50,100` (each `WEIGHT` or `WEIGHT:PAUSE`) with `--pause` for the steps
    that name none → the spec's steps, and the problems."""
    from controller.rollout.spec import MAX_STEPS, DurationError, parse_duration

    problems: list[str] = []
    try:
        parse_duration(pause)
    except DurationError as error:
        problems.append(f"--pause: {error}")
    steps: list[dict[str, Any]] = []
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    for number, part in enumerate(parts, start=1):
        weight_text, _, step_pause = part.partition(":")
        weight = _step_weight(number, weight_text.strip(), problems)
        if step_pause:
            try:
                parse_duration(step_pause.strip())
            except DurationError as error:
                problems.append(f"--steps, step {number}: {error}")
        if weight is not None:
            steps.append({"weight": weight, "pause": step_pause.strip() or pause})
    if not parts:
        problems.append("--steps is empty: give percents for `to`, e.g. --steps 10,50,100")
    elif len(parts) > MAX_STEPS:
        problems.append(f"--steps has {len(parts)} steps, at most {MAX_STEPS} are allowed")
    for before, after in itertools.pairwise(steps):
        if after["weight"] < before["weight"]:
            problems.append(
                f"--steps: {after['weight']} comes after {before['weight']}: weights never go "
                "down during a rollout; list them in rising order, e.g. 10,50,100"
            )
    return steps, problems


def _step_weight(number: int, text: str, problems: list[str]) -> int | None:
    if not text.isdigit():
        problems.append(
            f"--steps, step {number}: {text!r} is not a whole percent: write percents 0-100 "
            "separated by commas, each optionally with its own pause, e.g. 10,50:10m,100"
        )
        return None
    if int(text) > 100:
        problems.append(f"--steps, step {number}: {text} is above 100: a weight is a percent")
        return None
    return int(text)


def _steps(draft: _Draft) -> list[dict[str, Any]] | None:
    steps, problems = parse_steps(draft.flags.steps, draft.flags.pause)
    draft.problems.extend(problems)
    return None if problems else steps


# The gate flags, by the field each sets (as the API spells it).
GATE_FLAGS = {
    "maxErrorRate": "--max-error-rate",
    "maxP95LatencyRatio": "--max-p95-ratio",
    "minRequests": "--min-requests",
}


def _gates(draft: _Draft) -> dict[str, Any] | None:
    """The gates the flags set, checked by the spec's own model; the others default."""
    from pydantic import ValidationError

    from controller.rollout.spec import Gates

    flags = draft.flags
    gates = {
        "maxErrorRate": flags.max_error_rate,
        "maxP95LatencyRatio": flags.max_p95_ratio,
        "minRequests": flags.min_requests,
    }
    try:
        Gates.model_validate(gates)
    except ValidationError as error:
        for problem in error.errors(include_url=False):
            api_name = str(problem["loc"][0])
            draft.problems.append(
                f"{GATE_FLAGS[api_name]} {gates[api_name]}: {problem['msg'].lower()}"
            )
        return None
    return gates


def _check_sticky_header(draft: _Draft) -> None:
    header = draft.flags.sticky_header
    problem = None if header is None else header_problem(header)
    if problem is not None:
        draft.problems.append(f"--sticky-header {problem}")


def _check_drain(draft: _Draft) -> None:
    from controller.rollout.spec import DurationError, parse_duration

    try:
        parse_duration(draft.flags.drain)
    except DurationError as error:
        draft.problems.append(f"--drain: {error}")


def _check_to(draft: _Draft) -> None:
    from sidecar.config import id_problem
    from sidecar.sources import SourceError, parse_source

    problem = id_problem(draft.flags.to)
    if problem is not None:
        draft.problems.append(f"--to: {problem}")
    try:
        parse_source(draft.flags.source)
    except SourceError as error:
        draft.problems.append(f"--source: {error}")


@dataclass(frozen=True)
class _Split:
    """The object routing the model: its kind/name, targets (name → weight) and pool."""

    what: str
    weights: dict[str, int]
    pool: str | None


def _split(draft: _Draft) -> _Split | None:
    """The model's split as the controller finds it: InferenceModels first, then Rewrites,
    each by object name; with --pool only those of that pool."""
    from controller.backend.base import traffic_split

    flags = draft.flags
    ordered = sorted(
        draft.cluster.models,
        key=lambda o: (o.get("kind") != INFERENCE_MODELS.kind, _object_name(o)),
    )
    found = [split for obj in ordered if (split := traffic_split(obj, flags.model)) is not None]
    for split in found:
        if flags.pool is None or split.pool == flags.pool:
            what = f"{split.ref.kind} {split.ref.name}"
            return _Split(what, split.weights(), split.pool)
    if found:
        other = found[0]
        draft.problems.append(
            f"model {flags.model!r} is routed by {other.ref.kind} {other.ref.name} of pool "
            f"{other.pool}, not of --pool {flags.pool}: fix --pool, or leave it out"
        )
        return None
    known = sorted({name for obj in draft.cluster.models for name in _model_names(obj)})
    listing = f"models there: {', '.join(known)}" if known else "there are none"
    draft.problems.append(
        f"no InferenceModel or InferenceModelRewrite in namespace {draft.cluster.namespace} "
        f"routes model {flags.model!r} ({listing}): check the model name and --namespace, "
        "or create the InferenceModel first"
    )
    return None


def _model_names(obj: Mapping[str, Any]) -> list[str]:
    spec = obj.get("spec") or {}
    if obj.get("kind") == INFERENCE_MODELS.kind:
        return [str(spec.get("modelName"))] if spec.get("modelName") else []
    return [
        str(match["model"]["value"])
        for rule in spec.get("rules") or []
        for match in rule.get("matches") or []
        if (match.get("model") or {}).get("value")
    ]


def _from_id(draft: _Draft, split: _Split | None) -> str | None:
    """--from, or the model's one serving target; a rollout starts with all traffic on it."""
    flags = draft.flags
    if split is None:
        return flags.from_id
    serving = {name: weight for name, weight in split.weights.items() if weight > 0}
    routes = ", ".join(f"{name} (weight {weight})" for name, weight in serving.items())
    if flags.from_id is None and len(serving) == 1:
        (only,) = serving
        draft.notes.append(f"from: {only}, the only adapter {split.what} sends traffic to")
        return only
    if flags.from_id is None:
        draft.problems.append(
            f"cannot tell which adapter the rollout starts from: {split.what} sends model "
            f"{flags.model!r} to {routes or 'nothing'}; a rollout starts with all traffic on "
            "one adapter: give it all the weight, then pass --from with its id"
        )
        return None
    if list(serving) != [flags.from_id]:
        draft.problems.append(
            f"--from {flags.from_id}, but {split.what} sends model {flags.model!r} to "
            f"{routes or 'nothing'}: a rollout starts with all traffic on --from; fix --from "
            "(or leave it out), or give that adapter all the weight first"
        )
    return flags.from_id


def _pool(draft: _Draft, split: _Split | None) -> str | None:
    cluster, pool = draft.cluster, draft.flags.pool
    if pool is None and split is not None:
        pool = split.pool
        if pool is None:
            draft.problems.append(f"{split.what} names no poolRef: pass --pool")
            return None
        draft.notes.append(f"pool: {pool}, from the poolRef of {split.what}")
    if pool is None or pool in cluster.pools:
        return pool
    listing = (
        f"pools there: {', '.join(sorted(cluster.pools))}"
        if cluster.pools
        else "there are none: is the Gateway API Inference Extension installed?"
    )
    draft.problems.append(
        f"no InferencePool {pool!r} in namespace {cluster.namespace} ({listing}): fix "
        "--pool (or the InferenceModel's poolRef), or create the pool"
    )
    return None


def _configmap_name(draft: _Draft) -> str | None:
    """--configmap, or the one ConfigMap holding an adapter config under --key."""
    flags, cluster = draft.flags, draft.cluster
    if flags.configmap is not None:
        if flags.configmap not in cluster.configmaps:
            draft.problems.append(
                f"no ConfigMap {flags.configmap!r} in namespace {cluster.namespace}: fix "
                "--configmap (the one the pool's sidecars read)"
            )
            return None
        return flags.configmap
    candidates = sorted(
        name
        for name, data in cluster.configmaps.items()
        if _adapter_config(data.get(flags.key)) is not None
    )
    if len(candidates) == 1:
        draft.notes.append(
            f"configMap: {candidates[0]}, the only ConfigMap in {cluster.namespace} holding "
            f"an adapter config under key {flags.key}"
        )
        return candidates[0]
    if candidates:
        draft.problems.append(
            f"several ConfigMaps hold an adapter config under key {flags.key} "
            f"({', '.join(candidates)}): pass --configmap with the one the pool's sidecars read"
        )
    else:
        draft.problems.append(
            f"no ConfigMap in namespace {cluster.namespace} holds an adapter config under key "
            f"{flags.key}: pass --configmap with the one the pool's sidecars read (and --key "
            "with its key)"
        )
    return None


def _adapter_config(text: str | None) -> DesiredState | None:
    from sidecar.config import ConfigError, parse_config

    if text is None:
        return None
    try:
        return parse_config(text)
    except ConfigError:
        return None


@dataclass(frozen=True)
class _Document:
    """The adapter document of the ConfigMap, as text and as its sidecars read it."""

    where: str  # "ConfigMap NAME, key KEY"
    text: str
    desired: DesiredState


def _adapter_document(draft: _Draft, config_name: str | None) -> _Document | None:
    from sidecar.config import ConfigError, parse_config

    if config_name is None:
        return None
    key = draft.flags.key
    text = draft.cluster.configmaps[config_name].get(key)
    where = f"ConfigMap {config_name}, key {key}"
    if text is None:
        draft.problems.append(f"{where}: no such key: pass --key with the key the sidecars read")
        return None
    try:
        return _Document(where, text, parse_config(text))
    except ConfigError as error:
        draft.problems.append(f"{where}: {error}; the sidecars reject it too: fix it first")
        return None


def _check_to_id_is_free(draft: _Draft, document: _Document) -> None:
    """An id listed with other weights would have its source replaced under running pods."""
    from sidecar.sources import SourceError, parse_source

    flags = draft.flags
    listed = document.desired.ensure_exist.get(flags.to)
    try:
        wanted = parse_source(flags.source).key()
    except SourceError:
        return  # reported with --source
    if listed is not None and listed.source_key != wanted:
        draft.problems.append(
            f"--to {flags.to} is already in {document.where} with source "
            f"{_listed_source(document.text, flags.to)}, not {flags.source}: one id must "
            "always mean the same weights; pick a new --to id"
        )


def _from_source(draft: _Draft, document: _Document, from_id: str | None) -> str | None:
    """The source `from` is listed with: the rollout puts it back on abort."""
    if from_id is None:
        return None
    problem = document.desired.problems.get(from_id)
    if problem is not None:
        draft.problems.append(f"{document.where} lists {from_id} wrongly: {problem}")
        return None
    source = _listed_source(document.text, from_id)
    if source is None:
        draft.problems.append(
            f"{from_id} (from) is not in ensureExist of {document.where}: the rollout needs "
            "its source to put it back on abort; check --from and --configmap"
        )
    return source


def _listed_source(text: str, adapter_id: str) -> str | None:
    """The source as written in the document: the controller compares it to decide whether
    an entry needs editing, so a normalised form would rewrite it."""
    import yaml

    from sidecar.config import ROOT_KEY

    models = ((yaml.safe_load(text)[ROOT_KEY].get("ensureExist") or {}).get("models")) or []
    sources = [str(entry["source"]) for entry in models if entry.get("id") == adapter_id]
    return sources[0] if sources else None


def _object_name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def describe_created(manifest: Mapping[str, Any]) -> str:
    spec = manifest["spec"]
    steps = ", ".join(
        f"{step['weight']}%" + (f" for {step['pause']}" if step.get("pause") else "")
        for step in spec["steps"]
    )
    return (
        f"created AdapterRollout {manifest['metadata']['namespace']}/"
        f"{manifest['metadata']['name']}: model {spec['model']} from {spec['from']['id']} to "
        f"{spec['to']['id']} in {len(spec['steps'])} steps ({steps})"
    )


# ==== canary pause | resume | promote | abort ====


def command_patch(command: str, record: RolloutRecord) -> tuple[dict[str, Any] | None, str]:
    """The spec fields the command sets, or None when they already say so; and what to
    tell the user. Refuses (CliError) a rollout that already ended."""
    if record.terminal:
        raise CliError(
            f"{record.ref()} of model {record.model} already ended ({record.phase}): there is "
            f"nothing to {command}; start a new rollout with `loractl canary start`"
        )
    spec, model = record.spec, record.model
    where = f"{record.ref()} ({_position(record)})"
    if command == "pause":
        if spec.get("paused"):
            return None, f"{where} is already paused"
        return {"paused": True}, (
            f"pausing {where}: the controller holds the weights where they are; "
            f"`loractl canary resume {model}` continues"
        )
    if command == "resume":
        step = int(record.status.get("currentStep", -1))
        approved = max(int(spec.get("approvedStep", -1)), step)
        if not spec.get("paused") and int(spec.get("approvedStep", -1)) >= step:
            return None, f"{where} is not paused"
        # Approving the current step also lets a manual step go on.
        return {"paused": False, "approvedStep": approved}, f"resuming {where}"
    if command == "promote":
        if spec.get("promote"):
            return None, f"promotion of {where} is already requested"
        return {"promote": True}, (
            f"promoting {where}: the controller sends all traffic to "
            f"{_adapter(spec, 'to')} once it is loaded, then unlists {_adapter(spec, 'from')}"
        )
    if spec.get("abort"):
        return None, f"abort of {where} is already requested"
    kept = "keeps it listed (keepOnAbort)" if spec.get("keepOnAbort") else "unlists it"
    return {"abort": True}, (
        f"aborting {where}: the controller sends all traffic back to "
        f"{_adapter(spec, 'from')} and {kept}"
    )


def _adapter(spec: Mapping[str, Any], which: str) -> str:
    return str((spec.get(which) or {}).get("id") or "?")


def _position(record: RolloutRecord) -> str:
    steps = record.spec.get("steps") or []
    step = int(record.status.get("currentStep", -1))
    if step < 0:
        return f"{record.phase}, before the first of {len(steps)} steps"
    weight = record.status.get("toWeight", 0)
    return (
        f"{record.phase}, step {step + 1}/{len(steps)}, {weight}% on {_adapter(record.spec, 'to')}"
    )


# ==== canary status: the view ====


def render_status(
    record: RolloutRecord, now: datetime, others: Sequence[RolloutRecord] = ()
) -> str:
    """The rollout as a person reads it: where it is, the numbers its gates saw, why."""
    from pydantic import ValidationError

    from controller.rollout.spec import RolloutStatus

    spec = record.spec
    lines = [
        f"{record.ref()}",
        f"  model {record.model}  pool {spec.get('pool')}  "
        f"configMap {(spec.get('configMap') or {}).get('name')}",
        f"  from  {_adapter(spec, 'from')}  {(spec.get('from') or {}).get('source', '')}",
        f"  to    {_adapter(spec, 'to')}  {(spec.get('to') or {}).get('source', '')}",
    ]
    try:
        status = RolloutStatus.model_validate(record.status)
    except ValidationError as error:
        lines.append(f"Status    unreadable ({error.error_count()} problems): {record.status}")
        return "\n".join(lines) + "\n"
    lines += _phase_lines(record, status, now)
    lines += _gate_lines(status, spec)
    if status.message:
        lines.append(f"Message   {status.message}")
    lines += _history_lines(status, now)
    if others:
        listed = ", ".join(f"{other.name} ({other.phase})" for other in others)
        lines.append(f"Also for this model: {listed}")
    return "\n".join(lines) + "\n"


def _phase_lines(record: RolloutRecord, status: RolloutStatus, now: datetime) -> list[str]:
    spec = record.spec
    steps = spec.get("steps") or []
    index = status.current_step
    lines = [f"Phase     {status.phase}" + _phase_hint(record)]
    if 0 <= index < len(steps):
        step = steps[index]
        line = (
            f"Step      {index + 1}/{len(steps)}: {step.get('weight')}% to {_adapter(spec, 'to')}"
        )
        held = _held(status, step.get("pause"), now)
        lines.append(line + (f", {held}" if held else ""))
    else:
        lines.append(f"Step      -/{len(steps)}: before the first step")
    if status.weights:
        weights = ", ".join(f"{name} {weight}%" for name, weight in status.weights.items())
    else:
        weights = f"not shifted yet: all traffic on {_adapter(spec, 'from')}"
    sticky = (spec.get("stickiness") or {}).get("header")
    lines.append(f"Weights   {weights}" + (f"; users pinned by header {sticky}" if sticky else ""))
    return lines


def _phase_hint(record: RolloutRecord) -> str:
    model = record.model
    if record.phase == "Paused":
        return f" (`loractl canary resume {model}` continues)"
    if record.spec.get("abort") and not record.terminal:
        return " (abort requested)"
    if record.spec.get("promote") and not record.terminal:
        return " (promotion requested)"
    return ""


def _held(status: RolloutStatus, pause: str | None, now: datetime) -> str:
    """How long the step has been held, against its pause."""
    from controller.rollout.spec import TERMINAL_PHASES, DurationError, parse_duration

    if status.step_started_at is None or status.phase in TERMINAL_PHASES:
        return ""
    held = f"held {_span(now - status.step_started_at)}"
    if not pause:
        return held
    try:
        over = now - status.step_started_at >= parse_duration(pause)
    except DurationError:
        return held
    return f"{held}, pause {pause}" + (" over: waiting on the gates" if over else "")


def _gate_lines(status: RolloutStatus, spec: Mapping[str, Any]) -> list[str]:
    if not status.last_gates:
        return ["Gates     not evaluated yet"]
    rows = [
        ("pass" if gate.passed else "FAIL", gate.name, _gate_figure(gate), gate.detail)
        for gate in status.last_gates
    ]
    lines = ["Gates     last evaluation:", *_table(rows, indent="  ")]
    if status.consecutive_gate_failures:
        limit = (spec.get("gates") or {}).get("maxConsecutiveFailures", 2)
        lines.append(
            f"  {status.consecutive_gate_failures} failed evaluation(s) in a row; "
            f"{limit} abort the rollout"
        )
    return lines


def _gate_figure(gate: GateEvaluation) -> str:
    """'2.24% > 1%': the value against its threshold, in the gate's unit."""
    show = _GATE_UNITS.get(gate.name, _number)
    threshold = "" if gate.threshold is None else show(gate.threshold)
    if gate.value is None:
        return f"limit {threshold}" if threshold else ""
    at_least = gate.name.startswith("min")
    sign = (">=" if gate.passed else "<") if at_least else ("<=" if gate.passed else ">")
    return f"{show(gate.value)} {sign} {threshold}".rstrip()


def _percent(value: float) -> str:
    return f"{value * 100:.2f}".rstrip("0").rstrip(".") + "%"


def _number(value: float) -> str:
    return f"{value:g}"


_GATE_UNITS: dict[str, Callable[[float], str]] = {
    "minReadyFraction": _percent,
    "minRequests": lambda value: str(int(value)),
    "maxErrorRate": _percent,
    "maxP95LatencyRatio": lambda value: f"{value:.2f}x",
}


def _history_lines(status: RolloutStatus, now: datetime) -> list[str]:
    if not status.history:
        return []
    shown = status.history[-HISTORY_SHOWN:]
    rows = [
        (
            entry.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            f"({_span(now - entry.at)} ago)",
            str(entry.phase),
            "-" if entry.step < 0 else f"step {entry.step + 1}",
            entry.reason,
            entry.message,
        )
        for entry in shown
    ]
    return [f"History   last {len(shown)} of {len(status.history)}:", *_table(rows, "  ")]


def _span(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Columns padded to their widest cell; the last column is left as long as it is."""
    if not rows:
        return []
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return [
        indent
        + "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in rows
    ]


# ==== adapters ls: the pods x adapters matrix ====


@dataclass(frozen=True)
class PodAdapters:
    name: str
    ready: bool
    adapters: dict[str, str] | None  # id → state; None: the pod has no annotation


@dataclass(frozen=True)
class Desired:
    """The adapter ConfigMap's lists, as its sidecars read them."""

    configmap: str
    key: str
    ensure_exist: tuple[str, ...]
    ensure_not_exist: tuple[str, ...]
    problems: Mapping[str, str] = field(default_factory=dict)

    def state(self, adapter_id: str) -> str:
        if adapter_id in self.ensure_exist:
            return "exist"
        return "not exist" if adapter_id in self.ensure_not_exist else ""


def parse_annotation(text: str) -> dict[str, str]:
    """`id=state,id=state` (the sidecar's summary; ids hold neither ',' nor '=')."""
    pairs = (part.partition("=") for part in text.split(",") if part.strip())
    return {adapter_id.strip(): state.strip() or "?" for adapter_id, _, state in pairs}


def pod_adapters(pods: Iterable[Mapping[str, Any]], pool: PoolSpec | None) -> list[PodAdapters]:
    """The pool's pods (all those with the annotation when there is no pool), by name."""
    from controller.endpoints import ready_pod

    rows = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        annotation = (metadata.get("annotations") or {}).get(ANNOTATION)
        selected = (
            annotation is not None if pool is None else pool.selects(metadata.get("labels") or {})
        )
        if selected:
            adapters = None if annotation is None else parse_annotation(annotation)
            rows.append(
                PodAdapters(str(metadata.get("name")), ready_pod(pod) is not None, adapters)
            )
    return sorted(rows, key=lambda row: row.name)


def desired_from(configmap: str, key: str, data: Mapping[str, str] | None) -> Desired:
    """The ConfigMap's lists; CliError when it is missing or its sidecars would reject it."""
    from sidecar.config import ConfigError, parse_config

    where = f"ConfigMap {configmap}, key {key}"
    if data is None:
        raise CliError(f"no ConfigMap {configmap!r}: fix --configmap, or leave it out")
    text = data.get(key)
    if text is None:
        raise CliError(
            f"{where}: no such key (keys: {', '.join(sorted(data)) or 'none'}): fix --key"
        )
    try:
        state = parse_config(text)
    except ConfigError as error:
        raise CliError(f"{where}: {error}") from error
    return Desired(
        configmap,
        key,
        tuple(sorted(state.ensure_exist)),
        tuple(sorted(state.ensure_not_exist)),
        dict(state.problems),
    )


def render_matrix(pods: Sequence[PodAdapters], desired: Desired | None, where: str) -> str:
    """One row per pod, one column per adapter; the ConfigMap's wish as the last row."""
    if not pods and desired is None:
        return (
            f"no pods {where} carry the {ANNOTATION} annotation: run their sidecars with "
            "--annotate-pod, or pass --pool to list the pool's pods\n"
        )
    ids = _adapter_ids(pods, desired)
    header = ("POD", "READY", *ids)
    rows = [
        (
            pod.name,
            "yes" if pod.ready else "no",
            *(
                NO_ANNOTATION if pod.adapters is None else pod.adapters.get(i, NOT_REPORTED)
                for i in ids
            ),
        )
        for pod in pods
    ]
    if desired is not None:
        rows.append((f"(desired: {desired.configmap})", "", *(desired.state(i) for i in ids)))
    lines = [*_table([header, *rows]), *_matrix_notes(pods, desired, where)]
    return "\n".join(lines) + "\n"


def _adapter_ids(pods: Sequence[PodAdapters], desired: Desired | None) -> list[str]:
    ids = {i for pod in pods for i in pod.adapters or {}}
    if desired is not None:
        ids |= {*desired.ensure_exist, *desired.ensure_not_exist}
    return sorted(ids)


def _matrix_notes(pods: Sequence[PodAdapters], desired: Desired | None, where: str) -> list[str]:
    notes = []
    if not pods:
        notes.append(f"no pods {where}")
    blind = [pod.name for pod in pods if pod.adapters is None]
    if blind:
        notes.append(
            f"{NO_ANNOTATION}: no {ANNOTATION} annotation on {', '.join(blind)}: run the "
            "sidecars with --annotate-pod (it needs RBAC patch on pods)"
        )
    if any(pod.adapters is not None for pod in pods):
        notes.append(f"{NOT_REPORTED}: the pod's sidecar does not report that adapter")
    if desired is not None:
        notes += [f"{desired.configmap}: {problem}" for problem in desired.problems.values()]
    return notes


def matrix_json(pods: Sequence[PodAdapters], desired: Desired | None) -> dict[str, Any]:
    return {
        "pods": [{"name": pod.name, "ready": pod.ready, "adapters": pod.adapters} for pod in pods],
        "desired": None
        if desired is None
        else {
            "configMap": desired.configmap,
            "key": desired.key,
            "ensureExist": list(desired.ensure_exist),
            "ensureNotExist": list(desired.ensure_not_exist),
            "problems": dict(desired.problems),
        },
    }


# ==== flags ====

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(subparsers: Subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("cluster")
    where.add_argument(
        "-n",
        "--namespace",
        help="namespace of the rollout, models, pools and ConfigMaps (default: the "
        "kubeconfig context's, in a pod its own, else 'default')",
    )
    where.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: in a pod its service account, else env KUBECONFIG, "
        "else ~/.kube/config)",
    )
    where.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="local mode: the object YAMLs in DIR (as `loractl controller --local DIR` "
        "serves them) instead of a cluster",
    )
    _register_canary(subparsers, common)
    _register_adapters(subparsers, common)


def _parser(
    subparsers: Subparsers, name: str, common: argparse.ArgumentParser, help_text: str, **kw: Any
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        parents=[common],
        help=help_text,
        description=kw.pop("description", help_text[0].upper() + help_text[1:] + "."),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )


def _register_canary(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    canary = subparsers.add_parser(
        "canary",
        help="start, follow and steer canary rollouts of LoRA adapters (AdapterRollouts)",
        description="Move a model name's traffic from one LoRA adapter to another in steps, "
        "each judged by gates; the loractl controller does the moving.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = canary.add_subparsers(dest="canary_command", metavar="COMMAND", required=True)
    _register_start(commands, common)
    status = _parser(
        commands,
        "status",
        common,
        "show the model's rollout: phase, step, weights, the gates' numbers and history",
    )
    status.add_argument("model", metavar="MODEL", help="the model name clients send")
    _watch_flags(status)
    status.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people, json for scripts (with --watch: a JSON line per change)",
    )
    status.set_defaults(run=run_status)
    for command, what in (
        ("pause", "hold the weights where they are (sets spec.paused)"),
        ("resume", "continue a paused rollout, approving the current step"),
        ("promote", "send all traffic to the new adapter now, skipping the steps left"),
        ("abort", "send all traffic back to the old adapter and stop"),
    ):
        parser = _parser(commands, command, common, what)
        parser.add_argument("model", metavar="MODEL", help="the model name clients send")
        parser.set_defaults(run=run_command, command_name=command)


def _register_start(commands: Subparsers, common: argparse.ArgumentParser) -> None:
    start = _parser(
        commands,
        "start",
        common,
        "start a canary of a new adapter for a model",
        description="Create an AdapterRollout moving MODEL's traffic from its current adapter "
        "to --to. Everything is checked first (model, pool, ConfigMap, steps, gates); on any "
        "problem each is printed with its fix and nothing is created.",
    )
    start.add_argument("model", metavar="MODEL", help="the model name clients send")
    start.add_argument("--to", required=True, metavar="ID", help="id of the new adapter")
    start.add_argument(
        "--source",
        required=True,
        metavar="SRC",
        help="where the new adapter comes from: org/repo[@rev], "
        "hf://org/repo[@rev][/subfolder] or /local/path",
    )
    start.add_argument(
        "--from",
        dest="from_id",
        metavar="ID",
        help="adapter serving the model now (default: the InferenceModel's one "
        "target with weight > 0)",
    )
    start.add_argument(
        "--pool", metavar="P", help="InferencePool (default: the InferenceModel's poolRef)"
    )
    start.add_argument(
        "--configmap",
        metavar="NAME",
        help="the adapter ConfigMap the pool's "
        "sidecars read (default: the only one holding an adapter config)",
    )
    start.add_argument("--key", default=DEFAULT_KEY, help="its key holding the adapter config")
    plan = start.add_argument_group("steps and gates")
    plan.add_argument(
        "--steps",
        default="10,50,100",
        help="percents of traffic on --to, rising; WEIGHT:PAUSE gives a step its "
        "own pause (default: 10,50,100)",
    )
    plan.add_argument(
        "--pause",
        default="5m",
        help="how long each step is held before its "
        "gates may pass it: 30s, 5m, 1h30m (default: 5m)",
    )
    plan.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fail a step above this error rate of --to (default: 0.01)",
    )
    plan.add_argument(
        "--max-p95-ratio",
        type=float,
        default=1.5,
        help="fail a step when --to's p95 latency exceeds --from's times this (default: 1.5)",
    )
    plan.add_argument(
        "--min-requests",
        type=int,
        default=20,
        help="requests --to must serve in a step before it is judged (default: 20)",
    )
    plan.add_argument(
        "--sticky-header",
        metavar="H",
        help="request header (e.g. x-user-id) that keeps a user on one adapter as the weights "
        "move; written to the InferenceModel as the loractl.io/sticky-header annotation",
    )
    plan.add_argument(
        "--keep-on-abort",
        action="store_true",
        help="leave --to loaded after an abort (to debug it)",
    )
    plan.add_argument(
        "--drain",
        metavar="D",
        default="10s",
        help="how long the adapter leaving the traffic stays loaded once the weights moved "
        "off it, so requests already routed to it finish: 30s, 5m (default: 10s)",
    )
    start.add_argument("--name", help="AdapterRollout name (default: MODEL-TO, made DNS-safe)")
    start.add_argument("--watch", action="store_true", help="then follow it like `status --watch`")
    start.set_defaults(run=run_start, output="table", interval=WATCH_INTERVAL)


def _watch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch",
        action="store_true",
        help="redraw until the rollout ends; exit 0 when Promoted, 1 when Aborted or Failed",
    )
    parser.add_argument(
        "--interval", type=float, default=WATCH_INTERVAL, help="seconds between redraws"
    )


def _register_adapters(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    adapters = subparsers.add_parser(
        "adapters",
        help="show which LoRA adapters each pod holds",
        description="Read the adapters each pod's sidecar reports (the loractl.io/adapters "
        "annotation, written with --annotate-pod).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = adapters.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)
    ls = _parser(commands, "ls", common, "a pods x adapters matrix of adapter states")
    ls.add_argument(
        "--pool",
        metavar="P",
        help="the InferencePool's pods (default: every pod carrying the annotation)",
    )
    ls.add_argument(
        "--configmap",
        metavar="NAME",
        help="also show this adapter ConfigMap's ensureExist / ensureNotExist lists",
    )
    ls.add_argument("--key", default=DEFAULT_KEY, help="its key holding the adapter config")
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table", help="format")
    ls.set_defaults(run=run_adapters)


# ==== I/O ====


class Cluster:
    """One namespace, read once per call; every failure a CliError naming the server, the
    verb and the resource."""

    def __init__(self, client: ApiClient, namespace: str) -> None:
        from kubernetes.client import CoreV1Api, CustomObjectsApi

        from loractl.kube import REQUEST_TIMEOUT

        self.client = client
        self.namespace = namespace
        self.server = str(client.configuration.host)
        self._core = CoreV1Api(client)
        self._custom = CustomObjectsApi(client)
        # The JSON as the server sent it (the typed models drop fields they do not know).
        self._raw: dict[str, Any] = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}

    def objects(self, resource: Resource, optional: bool = False) -> list[dict[str, Any]]:
        """The objects, each with its kind; an optional resource not served reads as none."""
        if resource == CONFIGMAPS:
            call: Callable[[], Any] = partial(
                self._core.list_namespaced_config_map, self.namespace, **self._raw
            )
        elif resource == PODS:
            call = partial(self._core.list_namespaced_pod, self.namespace, **self._raw)
        else:
            call = partial(
                self._custom.list_namespaced_custom_object,
                resource.group,
                resource.version,
                self.namespace,
                resource.plural,
                **self._raw,
            )
        body = self._request("list", resource, call, absent_ok=optional)
        items = [] if body is None else body.get("items") or []
        return [{**item, "kind": resource.kind} for item in items]

    def object(self, resource: Resource, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        if resource == CONFIGMAPS:
            call: Callable[[], Any] = partial(
                self._core.read_namespaced_config_map, name, self.namespace, **self._raw
            )
        else:
            call = partial(
                self._custom.get_namespaced_custom_object,
                resource.group,
                resource.version,
                self.namespace,
                resource.plural,
                name,
                **self._raw,
            )
        return self._request("get", resource, call, absent_ok=True)

    def rollouts(self) -> list[RolloutRecord]:
        return [RolloutRecord.from_object(obj) for obj in self.objects(ROLLOUTS)]

    def rollout(self, name: str) -> RolloutRecord | None:
        obj = self.object(ROLLOUTS, name)
        return None if obj is None else RolloutRecord.from_object(obj)

    @property
    def flags(self) -> str:
        """How a command line names this place."""
        return f"-n {self.namespace}"

    def backend(self) -> KubeBackend:
        from controller.backend.kube import KubeBackend

        return KubeBackend(self.client, self.namespace)

    def _request(
        self, verb: str, resource: Resource, call: Callable[[], Any], absent_ok: bool
    ) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            body: dict[str, Any] = json.loads(call().data)
        except ApiException as error:
            if error.status == 404 and absent_ok:
                return None
            raise self.failure(error, verb, resource) from error
        # Unreachable (urllib3's and the socket's errors), or not an API server (not JSON).
        except (HTTPError, OSError, ValueError) as error:
            raise self.failure(error, verb, resource) from error
        return body

    def failure(self, error: Exception, verb: str, resource: Resource) -> CliError:
        """What went wrong, for a person: the server, and the verb and resource refused."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        what = f"{verb} {resource.name} in namespace {self.namespace}"
        if not isinstance(error, ApiException | HTTPError | OSError):
            return CliError(f"could not {what} at {self.server}: {error}", EXIT_API)
        if not isinstance(error, ApiException):
            reason = re.sub(r"^\w+\(host=[^)]*\): ", "", str(getattr(error, "reason", error)))
            return CliError(
                f"cannot reach the Kubernetes API server at {self.server} ({reason}): is the "
                "cluster up, and does the kubeconfig's current context point at it? "
                "(--kubeconfig, env KUBECONFIG)",
                EXIT_API,
            )
        if error.status == 404 and resource == ROLLOUTS:
            return CliError(
                f"the API server at {self.server} does not serve {resource.name}; install the "
                f"CRD: kubectl apply -f {CRD_MANIFEST}",
                EXIT_API,
            )
        said = _server_message(error)
        if error.status == 401:
            problem = f"the API server at {self.server} did not accept the credentials to {what}"
            fix = "log in again, or fix the user in your kubeconfig"
        elif error.status == 403:
            problem = f"forbidden to {what} (HTTP 403 from {self.server})"
            fix = (
                f"ask for a Role granting '{verb}' on {resource.name} in {self.namespace}, "
                "bound to your user or service account (manifests/controller/rbac.yaml has "
                "one: loractl-canary-operator)"
            )
        else:
            problem = f"could not {what}: HTTP {error.status} {error.reason} from {self.server}"
            fix = "see the server's answer"
        return CliError(f"{problem}{f': {said}' if said else ''}; {fix}", EXIT_API)


# Where a command reads and writes: a cluster's namespace, or a local directory.
Store: TypeAlias = "Cluster | LocalCluster"


def _server_message(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""


def default_namespace(kubeconfig: str | None) -> str:
    """As kubectl picks it: the kubeconfig context's namespace; in a pod (no --kubeconfig)
    the pod's own; else 'default'. Mirrors `kube_api_client`'s choice of credentials."""
    from kubernetes import config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or "default"
        except OSError:
            return "default"
    path = kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config")
    try:
        _, active = config.list_kube_config_contexts(path)  # type: ignore[no-untyped-call]
    # Broad: a kubeconfig that does not load is reported by kube_api_client, just before.
    except Exception:
        return "default"
    return str((active.get("context") or {}).get("namespace") or "default")


def connect(args: argparse.Namespace) -> Store:
    if args.local is not None:
        from controller.local_cluster import LocalCluster

        if args.kubeconfig is not None:
            raise CliError("--local and --kubeconfig are alternatives: give one")
        return LocalCluster(args.local, args.namespace or "default")
    from loractl.kube import KubeConfigError, kube_api_client

    try:
        client = kube_api_client(args.kubeconfig)
    except KubeConfigError as error:
        raise CliError(f"{error}; pass --kubeconfig, or set KUBECONFIG", EXIT_API) from error
    return Cluster(client, args.namespace or default_namespace(args.kubeconfig))


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.getLogger("urllib3").setLevel(logging.CRITICAL)  # retry warnings: we say it once


def _command(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Runs a command: problems printed (no traceback) and turned into the exit code."""

    def run(args: argparse.Namespace) -> int:
        _quiet_logs()
        prog = "loractl " + " ".join(
            part
            for part in (
                args.command,
                getattr(args, "canary_command", None),
                getattr(args, "adapters_command", None),
            )
            if part
        )
        try:
            return function(args)
        except CliError as error:
            _print_problems(prog, error.problems, error.code)
            return error.code
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


def _print_problems(prog: str, problems: Sequence[str], code: int) -> None:
    if len(problems) == 1:
        print(f"{prog}: error: {problems[0]}", file=sys.stderr)
        return
    written = "; nothing was written" if code == EXIT_INVALID else ""
    print(f"{prog}: {len(problems)} problems{written}:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _write(cluster: Store, verb: str, coroutine: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Runs a backend write; its errors as CliErrors."""
    from controller.backend.base import AlreadyExistsError, BackendError, NotFoundError

    async def write() -> Any:
        return await coroutine(cluster.backend())

    try:
        return asyncio.run(write())
    except (AlreadyExistsError, NotFoundError) as error:
        raise CliError(f"{error}; nothing was written") from error
    except BackendError as error:
        # The backend names the object; the client's error it wraps says what went wrong.
        cause = error.__cause__
        reported = cause if isinstance(cause, Exception) else error
        raise cluster.failure(reported, verb, ROLLOUTS) from error


@_command
def run_start(args: argparse.Namespace) -> int:
    flags = StartFlags(
        model=args.model,
        to=args.to,
        source=args.source,
        from_id=args.from_id,
        pool=args.pool,
        configmap=args.configmap,
        key=args.key,
        steps=args.steps,
        pause=args.pause,
        max_error_rate=args.max_error_rate,
        max_p95_ratio=args.max_p95_ratio,
        min_requests=args.min_requests,
        sticky_header=args.sticky_header,
        keep_on_abort=args.keep_on_abort,
        drain=args.drain,
        name=args.name,
    )
    cluster = connect(args)
    plan = plan_rollout(flags, snapshot(cluster))
    for note in plan.notes:
        print(note)
    if plan.manifest is None:
        raise CliError(plan.problems)
    manifest = plan.manifest
    _write(cluster, "create", lambda backend: backend.create_rollout(manifest))
    print(describe_created(manifest))
    name = manifest["metadata"]["name"]
    if not args.watch:
        print(f"follow it with: loractl canary status {flags.model} {cluster.flags} --watch")
        return EXIT_OK
    return watch(cluster, name, args, sys.stdout)


def snapshot(cluster: Store) -> ClusterSnapshot:
    models = cluster.objects(INFERENCE_MODELS, optional=True)
    models += cluster.objects(MODEL_REWRITES, optional=True)
    pools = {_object_name(obj) for api in POOLS for obj in cluster.objects(api, optional=True)}
    return ClusterSnapshot(
        namespace=cluster.namespace,
        rollouts=tuple(cluster.rollouts()),
        models=tuple(models),
        pools=frozenset(pools),
        configmaps={
            _object_name(obj): obj.get("data") or {} for obj in cluster.objects(CONFIGMAPS)
        },
    )


def _check_interval(args: argparse.Namespace) -> None:
    if not args.interval > 0:
        raise CliError(f"--interval {args.interval}: give a number of seconds above 0, e.g. 2")


def _find(cluster: Store, model: str) -> tuple[RolloutRecord, list[RolloutRecord]]:
    """The model's rollout (see select_rollout), and its others."""
    records = cluster.rollouts()
    chosen = select_rollout(records, model)
    if chosen is None:
        raise CliError(no_rollout_problem(records, model, cluster.namespace))
    others = [r for r in records if r.model == model and r.name != chosen.name]
    return chosen, sorted(others, key=lambda r: (r.created, r.name), reverse=True)


@_command
def run_status(args: argparse.Namespace) -> int:
    _check_interval(args)
    cluster = connect(args)
    record, others = _find(cluster, args.model)
    if args.watch:
        return watch(cluster, record.name, args, sys.stdout, others)
    if args.output == "json":
        print(json.dumps(record.as_json(), indent=2))
    else:
        print(render_status(record, datetime.now(UTC), others), end="")
    return EXIT_OK


def watch(
    cluster: Store,
    name: str,
    args: argparse.Namespace,
    out: TextIO,
    others: Sequence[RolloutRecord] = (),
) -> int:
    """Redraws until the rollout ends. On a terminal the view is redrawn every interval
    (its clock moves); elsewhere a view, or a JSON line, is printed per change only."""
    redraw = out.isatty() and args.output == "table"
    shown: object = None
    failing = ""
    while True:
        try:
            record = cluster.rollout(name)
        except CliError as error:  # a dropped connection need not end a long watch
            if str(error) != failing:  # said once, not every interval
                failing = str(error)
                print(f"{failing}; retrying every {args.interval:g}s", file=sys.stderr)
            time.sleep(args.interval)
            continue
        failing = ""
        if record is None:
            raise CliError(f"AdapterRollout {cluster.namespace}/{name} was deleted")
        if redraw or (record.spec, record.status) != shown:
            shown = (record.spec, record.status)
            _show(record, args.output, redraw, out, others)
        if record.terminal:
            return EXIT_OK if record.phase == "Promoted" else EXIT_ENDED_BADLY
        time.sleep(args.interval)


def _show(
    record: RolloutRecord, output: str, redraw: bool, out: TextIO, others: Sequence[RolloutRecord]
) -> None:
    if output == "json":
        out.write(json.dumps(record.as_json()) + "\n")
    else:
        view = render_status(record, datetime.now(UTC), others)
        out.write(CLEAR_SCREEN + view if redraw else view + "\n")
    out.flush()


@_command
def run_command(args: argparse.Namespace) -> int:
    cluster = connect(args)
    record, _ = _find(cluster, args.model)
    patch, message = command_patch(args.command_name, record)
    if patch is not None:
        _write(cluster, "patch", lambda backend: backend.patch_rollout_spec(record.name, patch))
    print(message)
    return EXIT_OK


@_command
def run_adapters(args: argparse.Namespace) -> int:
    cluster = connect(args)
    pool = None if args.pool is None else _pool_spec(cluster, args.pool)
    desired = None
    if args.configmap is not None:
        obj = cluster.object(CONFIGMAPS, args.configmap)
        data = None if obj is None else obj.get("data") or {}
        desired = desired_from(args.configmap, args.key, data)
    pods = pod_adapters(cluster.objects(PODS), pool)
    if args.output == "json":
        print(json.dumps(matrix_json(pods, desired), indent=2))
        return EXIT_OK
    where = (
        f"of pool {args.pool} in namespace {cluster.namespace}"
        if args.pool
        else f"in namespace {cluster.namespace}"
    )
    print(render_matrix(pods, desired, where), end="")
    return EXIT_OK


def _pool_spec(cluster: Store, name: str) -> PoolSpec:
    from controller.endpoints import POOL_V1, POOL_V1ALPHA2, pool_spec

    for resource, api in zip(POOLS, (POOL_V1, POOL_V1ALPHA2), strict=True):
        obj = cluster.object(resource, name)
        if obj is not None:
            spec = pool_spec(api, obj)
            if not spec.selector:
                raise CliError(
                    f"InferencePool {name} ({api.name}) has no usable pod selector: fix its spec"
                )
            return spec
    names = sorted(
        {_object_name(obj) for api in POOLS for obj in cluster.objects(api, optional=True)}
    )
    listing = f"pools there: {', '.join(names)}" if names else "there are none"
    raise CliError(
        f"no InferencePool {name!r} in namespace {cluster.namespace} ({listing}): fix --pool"
    )
