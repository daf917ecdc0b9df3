"""`loractl canary`: the pure parts table-driven, then the real command against kmock.

The end-to-end tests run `python -m loractl` as a subprocess with KUBECONFIG naming kmock,
whose server runs on the test's event loop: the subprocess is waited for in a thread.
kmock ignores label and field selectors and keeps no resourceVersions; neither matters
here (the CLI filters itself and writes without preconditions).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kmock import KubernetesEmulator, ResourceInfo

from controller.canary_cli import (
    CliError,
    ClusterSnapshot,
    RolloutRecord,
    StartFlags,
    command_patch,
    dns_name,
    parse_steps,
    plan_rollout,
    render_status,
    select_rollout,
)
from controller.rollout.spec import Stickiness, parse_spec, validate_spec
from tests.support.kube import write_kubeconfig

NS = "serving"
ROLLOUTS = "loractl.io/v1alpha1/adapterrollouts"
MODELS = "inference.networking.x-k8s.io/v1alpha2/inferencemodels"
POOLS = "inference.networking.k8s.io/v1/inferencepools"
CONFIGMAPS = "v1/configmaps"
KINDS = {
    ROLLOUTS: "AdapterRollout",
    MODELS: "InferenceModel",
    POOLS: "InferencePool",
    CONFIGMAPS: "ConfigMap",
}
KEY = "configmap.yaml"
FROM_SOURCE = "Kawon/llama3.1-food-finetune_v14_r8"
TO_SOURCE = "hf://Kawon/llama3.1-food-finetune_v15_r8"
DOCUMENT = f"""\
vLLMLoRAConfig:
  name: vllm-adapters
  ensureExist:
    models:
    - id: food-review-1
      source: {FROM_SOURCE}
    - id: sql-lora
      source: /adapters/sql
"""
NOW = datetime(2025, 6, 1, 12, 13, 12, tzinfo=UTC)
RUN_TIMEOUT = 60.0


# ---- objects ----


def obj(resource: str, name: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": resource.rsplit("/", 1)[0],
        "kind": KINDS[resource],
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
        **fields,
    }


def inference_model(
    model: str = "food-review", pool: str = "pool-a", **weights: int
) -> dict[str, Any]:
    targets = [{"name": n.replace("_", "-"), "weight": w} for n, w in weights.items()]
    spec = {"modelName": model, "poolRef": {"name": pool}, "targetModels": targets}
    return obj(MODELS, "food", spec=spec)


def rollout_spec(**changes: Any) -> dict[str, Any]:
    spec = {
        "pool": "pool-a",
        "model": "food-review",
        "configMap": {"name": "adapters", "key": KEY},
        "from": {"id": "food-review-1", "source": FROM_SOURCE},
        "to": {"id": "food-review-2", "source": TO_SOURCE},
        "steps": [
            {"weight": 10, "pause": "5m"},
            {"weight": 50, "pause": "10m"},
            {"weight": 100, "pause": "5m"},
        ],
        "gates": {"maxErrorRate": 0.01, "maxP95LatencyRatio": 1.5, "minRequests": 50},
    }
    return {**spec, **changes}


def history(at: str, phase: str, step: int, reason: str, message: str) -> dict[str, Any]:
    return {"at": at, "phase": phase, "step": step, "reason": reason, "message": message}


PROGRESSING = {
    "phase": "Progressing",
    "currentStep": 1,
    "stepStartedAt": "2025-06-01T12:10:00Z",
    "weights": {"food-review-1": 50, "food-review-2": 50},
    "toWeight": 50,
    "lastGates": [
        {"name": "minReadyFraction", "passed": True, "value": 1.0, "threshold": 1.0,
         "detail": "3 of 3 ready pods have food-review-2 loaded"},
        {"name": "minRequests", "passed": True, "value": 134, "threshold": 50,
         "detail": "134 requests to food-review-2 in this step"},
        {"name": "maxErrorRate", "passed": False, "value": 0.0224, "threshold": 0.01,
         "detail": "3 errors in 134 requests to food-review-2; food-review-1: 0 in 120"},
        {"name": "maxP95LatencyRatio", "passed": True, "value": 1.12, "threshold": 1.5,
         "detail": "p95 0.812s against 0.725s for food-review-1"},
    ],
    "consecutiveGateFailures": 1,
    "message": "step 2/3 (50%) failed its gates (1 of 2): maxErrorRate: 3 errors in 134 "
    "requests to food-review-2; watching the step again from now",
    "history": [
        history("2025-06-01T12:00:00Z", "Loading", -1, "LoadingAdapter", "listing food-review-2"),
        history("2025-06-01T12:02:00Z", "Progressing", 0, "StepStarted", "10% to food-review-2"),
        history("2025-06-01T12:07:00Z", "Progressing", 1, "StepStarted", "50% to food-review-2"),
        history("2025-06-01T12:10:00Z", "Progressing", 1, "GateFailed", "maxErrorRate failed"),
    ],
}  # fmt: skip


def record(
    name: str = "food-review-food-review-2",
    created: str = "2025-06-01T12:00:00Z",
    spec: Mapping[str, Any] | None = None,
    status: Mapping[str, Any] | None = None,
) -> RolloutRecord:
    return RolloutRecord(NS, name, created, "1", spec or rollout_spec(), status or {})


# ---- start: the plan (pure) ----


def snapshot(**changes: Any) -> ClusterSnapshot:
    base = ClusterSnapshot(
        namespace=NS,
        models=(inference_model(food_review_1=100),),
        pools=frozenset({"pool-a"}),
        configmaps={"adapters": {KEY: DOCUMENT}, "kube-root-ca.crt": {"ca.crt": "..."}},
    )
    return replace(base, **changes)


FLAGS = StartFlags(model="food-review", to="food-review-2", source=TO_SOURCE)


def test_a_plan_fills_from_pool_and_configmap_in_from_the_cluster() -> None:
    plan = plan_rollout(FLAGS, snapshot())
    assert plan.problems == []
    assert plan.notes == [
        "from: food-review-1, the only adapter InferenceModel food sends traffic to",
        "pool: pool-a, from the poolRef of InferenceModel food",
        f"configMap: adapters, the only ConfigMap in {NS} holding an adapter config under "
        f"key {KEY}",
    ]
    assert plan.manifest is not None
    assert plan.manifest["metadata"] == {"name": "food-review-food-review-2", "namespace": NS}
    spec = parse_spec(plan.manifest["spec"])
    assert validate_spec(spec) == []
    assert (spec.pool, spec.model, spec.config_map.name, spec.config_map.key) == (
        "pool-a",
        "food-review",
        "adapters",
        KEY,
    )
    assert (spec.from_.id, spec.from_.source) == ("food-review-1", FROM_SOURCE)
    assert (spec.to.id, spec.to.source) == ("food-review-2", TO_SOURCE)
    assert [(s.weight, s.pause) for s in spec.steps] == [(10, "5m"), (50, "5m"), (100, "5m")]
    gates = spec.gates
    assert (gates.max_error_rate, gates.max_p95_latency_ratio, gates.min_requests) == (
        0.01,
        1.5,
        20,
    )
    assert (spec.stickiness, spec.keep_on_abort, spec.paused, spec.approved_step) == (
        None,
        False,
        False,
        -1,
    )
    assert spec.drain == "10s"


def test_a_plan_takes_every_flag() -> None:
    flags = replace(
        FLAGS,
        from_id="food-review-1",
        pool="pool-a",
        configmap="adapters",
        steps="5:1m, 25,100:30s",
        pause="2m",
        max_error_rate=0.05,
        max_p95_ratio=2.0,
        min_requests=100,
        sticky_header="x-user-id",
        keep_on_abort=True,
        drain="2m",
        name="canary.v2",
    )
    plan = plan_rollout(
        flags, snapshot(configmaps={"adapters": {KEY: DOCUMENT}, "b": {KEY: DOCUMENT}})
    )
    assert (plan.problems, plan.notes) == ([], [])
    assert plan.manifest is not None
    spec = parse_spec(plan.manifest["spec"])
    assert plan.manifest["metadata"]["name"] == "canary.v2"
    assert [(s.weight, s.pause) for s in spec.steps] == [(5, "1m"), (25, "2m"), (100, "30s")]
    assert (spec.gates.max_error_rate, spec.gates.max_p95_latency_ratio) == (0.05, 2.0)
    assert spec.gates.min_requests == 100
    assert spec.stickiness == Stickiness(header="x-user-id")
    assert spec.keep_on_abort
    assert spec.drain == "2m"


LIVE = record("older", status={"phase": "Progressing"})


@pytest.mark.parametrize(
    ("flags", "cluster", "expected"),
    [
        pytest.param(replace(FLAGS, model="chat"), snapshot(),
                     ["no InferenceModel or InferenceModelRewrite in namespace serving routes "
                      "model 'chat' (models there: food-review)"], id="unknown model"),
        pytest.param(FLAGS, snapshot(pools=frozenset()),
                     ["no InferencePool 'pool-a' in namespace serving (there are none"],
                     id="pool missing"),
        pytest.param(replace(FLAGS, pool="pool-b"), snapshot(pools=frozenset({"pool-a", "pool-b"})),
                     ["is routed by InferenceModel food of pool pool-a, not of --pool pool-b"],
                     id="model of another pool"),
        pytest.param(replace(FLAGS, configmap="nope"), snapshot(),
                     ["no ConfigMap 'nope' in namespace serving"], id="configmap missing"),
        pytest.param(FLAGS, snapshot(configmaps={"a": {KEY: DOCUMENT}, "b": {KEY: DOCUMENT}}),
                     ["several ConfigMaps hold an adapter config under key configmap.yaml (a, b): "
                      "pass --configmap"], id="configmap ambiguous"),
        pytest.param(FLAGS, snapshot(configmaps={}),
                     ["no ConfigMap in namespace serving holds an adapter config under key"],
                     id="no configmap at all"),
        pytest.param(replace(FLAGS, configmap="adapters", key="other.yaml"), snapshot(),
                     ["ConfigMap adapters, key other.yaml: no such key"], id="key missing"),
        pytest.param(replace(FLAGS, configmap="bad"),
                     snapshot(configmaps={"bad": {KEY: "ensureExist: []"}}),
                     ["ConfigMap bad, key configmap.yaml: missing the top-level 'vLLMLoRAConfig'"],
                     id="configmap does not parse"),
        pytest.param(replace(FLAGS, to="food-review-1", source=FROM_SOURCE), snapshot(),
                     ["--to and --from are both 'food-review-1'"], id="to == from"),
        pytest.param(replace(FLAGS, to="sql-lora"), snapshot(),
                     ["--to sql-lora is already in ConfigMap adapters, key configmap.yaml with "
                      "source /adapters/sql"], id="to id taken by other weights"),
        pytest.param(FLAGS, snapshot(models=(inference_model(food_review_1=70, chat_v1=30),)),
                     ["cannot tell which adapter the rollout starts from: InferenceModel food "
                      "sends model 'food-review' to food-review-1 (weight 70), chat-v1 "
                      "(weight 30)"], id="split among two"),
        pytest.param(replace(FLAGS, from_id="sql-lora"), snapshot(),
                     ["--from sql-lora, but InferenceModel food sends model 'food-review' to "
                      "food-review-1 (weight 100)"], id="from not serving"),
        pytest.param(FLAGS, snapshot(models=(inference_model(other_adapter=100),)),
                     ["other-adapter (from) is not in ensureExist of ConfigMap adapters"],
                     id="from not listed"),
        pytest.param(replace(FLAGS, steps="50,10,150"), snapshot(),
                     ["--steps, step 3: 150 is above 100", "--steps: 10 comes after 50"],
                     id="bad weights"),
        pytest.param(replace(FLAGS, pause="5 minutes"), snapshot(),
                     ["--pause: '5 minutes' is not a duration"], id="bad pause"),
        pytest.param(replace(FLAGS, drain="ten seconds"), snapshot(),
                     ["--drain: 'ten seconds' is not a duration"], id="bad drain"),
        pytest.param(replace(FLAGS, max_error_rate=2.0, min_requests=-1), snapshot(),
                     ["--max-error-rate 2.0: input should be less than or equal to 1",
                      "--min-requests -1: input should be greater than or equal to 0"],
                     id="bad gates"),
        pytest.param(replace(FLAGS, sticky_header="x user"), snapshot(),
                     ["--sticky-header 'x user' is not an HTTP header name"], id="bad header"),
        pytest.param(replace(FLAGS, to="../x", source="ftp://x"), snapshot(),
                     ["--to: id '../x' is not a safe adapter name", "--source: source 'ftp://x'"],
                     id="bad id and source"),
        pytest.param(replace(FLAGS, name="Bad_Name"), snapshot(),
                     ["--name 'Bad_Name' is not a valid object name: use at most 253 lowercase "
                      "letters, digits, '-' and '.', starting and ending with a letter or digit "
                      "(e.g. bad-name)"],
                     id="bad name"),
        pytest.param(FLAGS, snapshot(rollouts=(record(status={"phase": "Promoted"}),)),
                     ["AdapterRollout serving/food-review-food-review-2 already exists (model "
                      "food-review, phase Promoted)"], id="name taken"),
        pytest.param(FLAGS, snapshot(rollouts=(LIVE,)),
                     ["model 'food-review' already has a rollout under way, older (phase "
                      "Progressing)"], id="rollout under way"),
    ],
)  # fmt: skip
def test_a_plan_names_every_problem_and_builds_nothing(
    flags: StartFlags, cluster: ClusterSnapshot, expected: list[str]
) -> None:
    plan = plan_rollout(flags, cluster)
    assert plan.manifest is None
    for part in expected:
        assert any(part in problem for problem in plan.problems), (part, plan.problems)
    assert len(plan.problems) == len(expected), plan.problems


def test_a_plan_reports_all_problems_at_once() -> None:
    flags = replace(FLAGS, model="chat", steps="x", pause="1y", configmap="nope")
    plan = plan_rollout(flags, snapshot())
    assert len(plan.problems) == 4, plan.problems


@pytest.mark.parametrize(
    ("steps", "pause", "expected", "problems"),
    [
        ("10,50,100", "5m", [(10, "5m"), (50, "5m"), (100, "5m")], []),
        ("0:30s, 100", "1h30m", [(0, "30s"), (100, "1h30m")], []),
        ("50,50", "5m", [(50, "5m"), (50, "5m")], []),
        ("ten", "5m", [], ["'ten' is not a whole percent"]),
        ("-5", "5m", [], ["'-5' is not a whole percent"]),
        ("101", "5m", [], ["101 is above 100"]),
        ("", "5m", [], ["--steps is empty"]),
        ("10:5x", "5m", [(10, "5x")], ["--steps, step 1: '5x' is not a duration"]),
        ("10", "soon", [(10, "soon")], ["--pause: 'soon' is not a duration"]),
        (",".join(["1"] * 21), "5m", [(1, "5m")] * 21, ["21 steps, at most 20"]),
        ("90,10", "5m", [(90, "5m"), (10, "5m")], ["10 comes after 90"]),
    ],
)
def test_steps_from_flags(
    steps: str, pause: str, expected: list[tuple[int, str]], problems: list[str]
) -> None:
    parsed, found = parse_steps(steps, pause)
    assert [(step["weight"], step["pause"]) for step in parsed] == expected
    assert len(found) == len(problems), found
    for part, problem in zip(problems, found, strict=True):
        assert part in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("food-review-food-review-2", "food-review-food-review-2"),
        ("meta-llama/Llama-3.1-8B-Instruct-sql_v2", "meta-llama-llama-3.1-8b-instruct-sql-v2"),
        ("--odd..name--", "odd.name"),
        ("a-.-b.-c", "a.b.c"),
        ("x" * 300, "x" * 253),
        ("///", "rollout"),
    ],
)
def test_dns_names(text: str, expected: str) -> None:
    assert dns_name(text) == expected


# ---- status and commands (pure) ----


def test_the_newest_live_rollout_is_chosen_else_the_newest() -> None:
    old_live = record("a", "2025-01-01T00:00:00Z", status={"phase": "Paused"})
    new_done = record("b", "2025-02-01T00:00:00Z", status={"phase": "Aborted"})
    newest_done = record("c", "2025-03-01T00:00:00Z", status={"phase": "Promoted"})
    other_model = record("d", "2025-04-01T00:00:00Z", spec=rollout_spec(model="chat"))
    records = [old_live, new_done, newest_done, other_model]
    assert select_rollout(records, "food-review") == old_live
    assert select_rollout(records[1:], "food-review") == newest_done
    assert select_rollout(records, "chat") == other_model
    assert select_rollout(records, "absent") is None


@pytest.mark.parametrize(
    ("command", "spec", "status", "patch", "says"),
    [
        ("pause", {}, {"phase": "Progressing", "currentStep": 1}, {"paused": True}, "pausing"),
        ("pause", {"paused": True}, {"phase": "Paused"}, None, "already paused"),
        ("resume", {"paused": True}, {"phase": "Paused", "currentStep": 1},
         {"paused": False, "approvedStep": 1}, "resuming"),
        ("resume", {"approvedStep": 0}, {"phase": "Paused", "currentStep": 2},
         {"paused": False, "approvedStep": 2}, "resuming"),  # a manual step waiting
        ("resume", {"approvedStep": 3}, {"phase": "Progressing", "currentStep": 1},
         None, "is not paused"),
        ("promote", {}, {"phase": "Loading"}, {"promote": True}, "once it is loaded"),
        ("promote", {"promote": True}, {"phase": "Loading"}, None, "already requested"),
        ("abort", {}, {"phase": "Progressing", "currentStep": 0}, {"abort": True},
         "back to food-review-1 and unlists it"),
        ("abort", {"keepOnAbort": True}, {"phase": "Pending"}, {"abort": True},
         "keeps it listed"),
        ("abort", {"abort": True}, {"phase": "Progressing"}, None, "already requested"),
    ],
)  # fmt: skip
def test_commands_patch_the_spec_fields(
    command: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    patch: dict[str, Any] | None,
    says: str,
) -> None:
    written, message = command_patch(command, record(spec=rollout_spec(**spec), status=status))
    assert written == patch
    assert says in message


@pytest.mark.parametrize("phase", ["Promoted", "Aborted", "Failed"])
@pytest.mark.parametrize("command", ["pause", "resume", "promote", "abort"])
def test_commands_refuse_a_rollout_that_ended(command: str, phase: str) -> None:
    with pytest.raises(CliError, match=f"already ended \\({phase}\\): there is nothing to"):
        command_patch(command, record(status={"phase": phase}))


STATUS_VIEW = """\
AdapterRollout serving/food-review-food-review-2
  model food-review  pool pool-a  configMap adapters
  from  food-review-1  Kawon/llama3.1-food-finetune_v14_r8
  to    food-review-2  hf://Kawon/llama3.1-food-finetune_v15_r8
Phase     Progressing
Step      2/3: 50% to food-review-2, held 3m12s, pause 10m
Weights   food-review-1 50%, food-review-2 50%
Gates     last evaluation:
  pass  minReadyFraction    100% >= 100%    3 of 3 ready pods have food-review-2 loaded
  pass  minRequests         134 >= 50       134 requests to food-review-2 in this step
  FAIL  maxErrorRate        2.24% > 1%      3 errors in 134 requests to food-review-2; food-review-1: 0 in 120
  pass  maxP95LatencyRatio  1.12x <= 1.50x  p95 0.812s against 0.725s for food-review-1
  1 failed evaluation(s) in a row; 2 abort the rollout
Message   step 2/3 (50%) failed its gates (1 of 2): maxErrorRate: 3 errors in 134 requests to food-review-2; watching the step again from now
History   last 4 of 4:
  2025-06-01 12:00:00Z  (13m12s ago)  Loading      -       LoadingAdapter  listing food-review-2
  2025-06-01 12:02:00Z  (11m12s ago)  Progressing  step 1  StepStarted     10% to food-review-2
  2025-06-01 12:07:00Z  (6m12s ago)   Progressing  step 2  StepStarted     50% to food-review-2
  2025-06-01 12:10:00Z  (3m12s ago)   Progressing  step 2  GateFailed      maxErrorRate failed
Also for this model: food-review-food-review-0 (Aborted)
"""  # noqa: E501


def test_the_status_view_shows_the_gates_numbers() -> None:
    other = record("food-review-food-review-0", status={"phase": "Aborted"})
    assert render_status(record(status=PROGRESSING), NOW, [other]) == STATUS_VIEW


@pytest.mark.parametrize(
    ("status", "lines"),
    [
        ({}, ["Phase     Pending", "Step      -/3: before the first step",
              "Weights   not shifted yet: all traffic on food-review-1",
              "Gates     not evaluated yet"]),
        ({"phase": "Paused", "currentStep": 0, "stepStartedAt": "2025-06-01T12:00:00Z"},
         ["Phase     Paused (`loractl canary resume food-review` continues)",
          "Step      1/3: 10% to food-review-2, held 13m12s, pause 5m over: waiting on the gates"]),
        ({"phase": "Promoted", "currentStep": 2, "stepStartedAt": "2025-06-01T12:00:00Z",
          "weights": {"food-review-2": 100}},
         ["Phase     Promoted", "Step      3/3: 100% to food-review-2\n",
          "Weights   food-review-2 100%"]),
        ({"phase": "Progressing", "currentStep": 0, "lastGates": [
            {"name": "maxP95LatencyRatio", "passed": True, "threshold": 1.5,
             "detail": "not judged: food-review-1 served 3 requests"}]},
         ["pass  maxP95LatencyRatio  limit 1.50x  not judged: food-review-1 served 3 requests"]),
        ({"phase": "Aborted", "history": [
            history("2025-05-01T00:00:00Z", "Aborted", 0, "GatesFailed", "too many errors"),
            history("2025-06-01T10:00:00Z", "Aborted", 0, "Edited", "by hand")]},
         ["History   last 2 of 2:", "(31d12h ago)  Aborted  step 1  GatesFailed  too many errors",
          "(2h13m ago)   Aborted  step 1  Edited       by hand"]),
        ({"phase": "Sideways"}, ["Status    unreadable (1 problems)"]),
    ],
)  # fmt: skip
def test_status_views_of_other_phases(status: dict[str, Any], lines: list[str]) -> None:
    view = render_status(record(status=status), NOW)
    for line in lines:
        assert line in view, view


def test_the_status_view_names_the_header_that_pins_users() -> None:
    sticky = rollout_spec(stickiness={"header": "x-user-id"})
    view = render_status(record(spec=sticky, status=PROGRESSING), NOW)
    assert (
        "Weights   food-review-1 50%, food-review-2 50%; users pinned by header x-user-id\n" in view
    )
    assert "pinned" not in render_status(record(status=PROGRESSING), NOW)


def test_the_status_view_flags_requested_commands() -> None:
    requested = record(spec=rollout_spec(abort=True), status={"phase": "Progressing"})
    assert "Phase     Progressing (abort requested)" in render_status(requested, NOW)


# ---- the real command against kmock ----


def serve(kmock: KubernetesEmulator, *resources: str) -> None:
    for resource in resources:
        subresources = ["status"] if resource == ROLLOUTS else []
        kmock.resources[resource] = ResourceInfo(
            namespaced=True, kind=KINDS[resource], subresources=subresources
        )


def put(kmock: KubernetesEmulator, resource: str, body: dict[str, Any]) -> None:
    kmock.objects[resource, NS, body["metadata"]["name"]] = body


def seed(kmock: KubernetesEmulator) -> None:
    """A model served by food-review-1 on pool-a, its adapter ConfigMap and another one.
    InferenceModelRewrites and v1alpha2 pools are not served at all, as on many clusters."""
    serve(kmock, ROLLOUTS, MODELS, POOLS, CONFIGMAPS)
    put(kmock, MODELS, inference_model(food_review_1=100))
    put(kmock, POOLS, obj(POOLS, "pool-a", spec={"selector": {"matchLabels": {"app": "vllm"}}}))
    put(kmock, CONFIGMAPS, obj(CONFIGMAPS, "adapters", data={KEY: DOCUMENT}))
    put(kmock, CONFIGMAPS, obj(CONFIGMAPS, "kube-root-ca.crt", data={"ca.crt": "..."}))


def kubeconfig_env(server: str, path: Path, namespace: str | None = NS) -> dict[str, str]:
    """The environment of a `loractl` run outside a cluster, its kubeconfig naming server."""
    write_kubeconfig(server, path)
    if namespace is not None:
        config = yaml.safe_load(path.read_text())
        config["contexts"][0]["context"]["namespace"] = namespace
        path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    return {**env, "KUBECONFIG": str(path)}


@pytest.fixture
def env(kmock: KubernetesEmulator, tmp_path: Path) -> dict[str, str]:
    return kubeconfig_env(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")


async def loractl(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Runs the real command; in a thread, since kmock serves on this loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "loractl", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=RUN_TIMEOUT,
        check=False,
    )


def rollout_names(kmock: KubernetesEmulator) -> list[str]:
    return [name for resource, _, name in kmock.objects if resource.plural == "adapterrollouts"]


def stored(kmock: KubernetesEmulator, resource: str, name: str) -> dict[str, Any]:
    return dict(kmock.objects[resource, NS, name])


@pytest.mark.asyncio
async def test_start_creates_a_valid_rollout(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    result = await loractl(env, "canary", "start", "food-review", "--to", "food-review-2",
                           "--source", TO_SOURCE, "--steps", "10,50:10m,100")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "from: food-review-1, the only adapter InferenceModel food sends traffic to",
        "pool: pool-a, from the poolRef of InferenceModel food",
        f"configMap: adapters, the only ConfigMap in {NS} holding an adapter config under "
        f"key {KEY}",
        f"created AdapterRollout {NS}/food-review-food-review-2: model food-review from "
        "food-review-1 to food-review-2 in 3 steps (10% for 5m, 50% for 10m, 100% for 5m)",
        f"follow it with: loractl canary status food-review -n {NS} --watch",
    ]
    assert rollout_names(kmock) == ["food-review-food-review-2"]
    created = stored(kmock, ROLLOUTS, "food-review-food-review-2")
    assert (created["apiVersion"], created["kind"]) == ("loractl.io/v1alpha1", "AdapterRollout")
    spec = parse_spec(created["spec"])
    assert validate_spec(spec) == []
    assert (spec.from_.id, spec.to.id, spec.pool, spec.config_map.name) == (
        "food-review-1",
        "food-review-2",
        "pool-a",
        "adapters",
    )
    assert [step.weight for step in spec.steps] == [10, 50, 100]


@pytest.mark.asyncio
async def test_start_watch_follows_the_new_rollout(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    args = ("--to", "food-review-2", "--source", TO_SOURCE, "--name", "canary", "--watch")
    starting = asyncio.create_task(loractl(env, "canary", "start", "food-review", *args))
    async with asyncio.timeout(RUN_TIMEOUT):
        while len(kmock["fetch adapterrollouts"]) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    kmock.objects[ROLLOUTS, NS, "canary"].patch({"status": {"phase": "Promoted"}})
    result = await starting
    assert result.returncode == 0, result.stderr
    assert f"created AdapterRollout {NS}/canary" in result.stdout
    phases = [line for line in result.stdout.splitlines() if line.startswith("Phase")]
    assert phases == ["Phase     Pending", "Phase     Promoted"]


INVALID_STARTS = [
    pytest.param(("chat", "--to", "x-2", "--source", "org/x"), None,
                 "no InferenceModel or InferenceModelRewrite in namespace serving routes model "
                 "'chat'", id="model missing"),
    pytest.param(("food-review", "--to", "food-review-2", "--source", TO_SOURCE), "pool-a",
                 "no InferencePool 'pool-a' in namespace serving", id="pool missing"),
    pytest.param(("food-review", "--to", "food-review-2", "--source", TO_SOURCE,
                  "--configmap", "vllm-adapters"), None,
                 "no ConfigMap 'vllm-adapters' in namespace serving: fix --configmap",
                 id="configmap missing"),
    pytest.param(("food-review", "--to", "food-review-1", "--source", FROM_SOURCE), None,
                 "--to and --from are both 'food-review-1'", id="to == from"),
    pytest.param(("food-review", "--to", "food-review-2", "--source", TO_SOURCE,
                  "--steps", "10,5"), None, "--steps: 5 comes after 10", id="bad weights"),
    pytest.param(("food-review", "--to", "food-review-2", "--source", TO_SOURCE,
                  "--pause", "5min"), None, "--pause: '5min' is not a duration",
                 id="bad pause"),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("args", "without_pool", "problem"), INVALID_STARTS)
async def test_an_invalid_start_writes_nothing(
    kmock: KubernetesEmulator,
    env: dict[str, str],
    args: tuple[str, ...],
    without_pool: str | None,
    problem: str,
) -> None:
    seed(kmock)
    if without_pool is not None:
        del kmock.objects[POOLS, NS, without_pool]
    before = (stored(kmock, CONFIGMAPS, "adapters"), stored(kmock, MODELS, "food"))
    result = await loractl(env, "canary", "start", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("loractl canary start: error: ")
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert rollout_names(kmock) == []
    assert (stored(kmock, CONFIGMAPS, "adapters"), stored(kmock, MODELS, "food")) == before
    assert not any(len(kmock[method]) for method in ("post", "put", "patch", "delete"))


@pytest.mark.asyncio
async def test_an_invalid_start_lists_every_problem(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    args = ("--to", "food-review-1", "--source", FROM_SOURCE, "--steps", "10,500", "--pause", "1d")
    result = await loractl(env, "canary", "start", "food-review", *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "loractl canary start: 3 problems; nothing was written:"
    assert [line[:12] for line in lines[1:]] == ["  - --pause:", "  - --steps,", "  - --to and"]
    assert rollout_names(kmock) == []


@pytest.mark.asyncio
async def test_status_shows_the_numbers_written_in_the_status(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    put(kmock, ROLLOUTS, obj(ROLLOUTS, "food-review-food-review-2", spec=rollout_spec(),
                             status=PROGRESSING))  # fmt: skip
    result = await loractl(env, "canary", "status", "food-review")
    assert result.returncode == 0, result.stderr
    for line in (
        "Phase     Progressing",
        "Step      2/3: 50% to food-review-2, held ",
        "Weights   food-review-1 50%, food-review-2 50%",
        "  pass  minReadyFraction    100% >= 100%    3 of 3 ready pods have food-review-2 loaded",
        "  pass  minRequests         134 >= 50       134 requests to food-review-2 in this step",
        "  FAIL  maxErrorRate        2.24% > 1%      3 errors in 134 requests to food-review-2; "
        "food-review-1: 0 in 120",
        "  pass  maxP95LatencyRatio  1.12x <= 1.50x  p95 0.812s against 0.725s for food-review-1",
        "  2025-06-01 12:10:00Z  (",
    ):
        assert line in result.stdout, result.stdout

    as_json = await loractl(env, "canary", "status", "food-review", "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    document = yaml.safe_load(as_json.stdout)
    assert (document["name"], document["status"]) == ("food-review-food-review-2", PROGRESSING)


@pytest.mark.asyncio
@pytest.mark.parametrize(("end", "code"), [("Promoted", 0), ("Aborted", 1), ("Failed", 1)])
async def test_status_watch_follows_the_rollout_to_its_end(
    kmock: KubernetesEmulator, env: dict[str, str], end: str, code: int
) -> None:
    seed(kmock)
    name = "food-review-food-review-2"
    put(kmock, ROLLOUTS, obj(ROLLOUTS, name, spec=rollout_spec(), status={"phase": "Loading"}))
    watching = asyncio.create_task(
        loractl(env, "canary", "status", "food-review", "--watch", "--interval", "0.05")
    )
    async with asyncio.timeout(RUN_TIMEOUT):
        # A second read of the rollout comes after the first view is out.
        while len(kmock["fetch adapterrollouts"]) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert not watching.done()
    kmock.objects[ROLLOUTS, NS, name].patch({"status": {"phase": end}})
    result = await watching
    assert result.returncode == code, result.stderr
    phases = [line for line in result.stdout.splitlines() if line.startswith("Phase")]
    assert phases == ["Phase     Loading", f"Phase     {end}"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("command", "spec", "phase", "expected"),
    [
        ("pause", {}, "Progressing", {"paused": True}),
        ("resume", {"paused": True}, "Paused", {"paused": False, "approvedStep": 1}),
        ("promote", {}, "Progressing", {"promote": True}),
        ("abort", {}, "Paused", {"abort": True}),
    ],
)
async def test_commands_patch_the_rollout_spec(
    kmock: KubernetesEmulator,
    env: dict[str, str],
    command: str,
    spec: dict[str, Any],
    phase: str,
    expected: dict[str, Any],
) -> None:
    seed(kmock)
    name = "food-review-food-review-2"
    status = {"phase": phase, "currentStep": 1}
    put(kmock, ROLLOUTS, obj(ROLLOUTS, name, spec=rollout_spec(**spec), status=status))
    result = await loractl(env, "canary", command, "food-review")
    assert result.returncode == 0, result.stderr
    assert f"AdapterRollout {NS}/{name} ({phase}, step 2/3" in result.stdout
    written = stored(kmock, ROLLOUTS, name)["spec"]
    assert {key: written[key] for key in expected} == expected
    assert written == {**rollout_spec(**spec), **expected}
    assert len(kmock["patch"]) == 1


@pytest.mark.asyncio
async def test_a_command_refuses_a_rollout_that_ended(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    put(kmock, ROLLOUTS, obj(ROLLOUTS, "done", spec=rollout_spec(), status={"phase": "Promoted"}))
    result = await loractl(env, "canary", "abort", "food-review")
    assert result.returncode == 2
    assert result.stderr == (
        f"loractl canary abort: error: AdapterRollout {NS}/done of model food-review already "
        "ended (Promoted): there is nothing to abort; start a new rollout with "
        "`loractl canary start`\n"
    )
    assert len(kmock["patch"]) == 0


@pytest.mark.asyncio
async def test_a_model_without_rollouts_is_named(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    put(kmock, ROLLOUTS, obj(ROLLOUTS, "r", spec=rollout_spec(), status={"phase": "Promoted"}))
    result = await loractl(env, "canary", "status", "chat")
    assert result.returncode == 2
    assert (
        f"no AdapterRollout in namespace {NS} is for model 'chat': the rollouts there are for "
        "food-review; start one with `loractl canary start chat --to ID --source SOURCE`"
    ) in result.stderr


@pytest.mark.asyncio
async def test_flags_name_the_kubeconfig_and_namespace(
    kmock: KubernetesEmulator, tmp_path: Path
) -> None:
    seed(kmock)
    put(kmock, ROLLOUTS, obj(ROLLOUTS, "r", spec=rollout_spec(), status={"phase": "Paused"}))
    path = tmp_path / "explicit"
    env = kubeconfig_env(str(kmock.url).rstrip("/"), path, namespace=None)
    env["KUBECONFIG"] = str(tmp_path / "absent")  # the flag wins over the environment
    result = await loractl(env, "canary", "status", "food-review", "--kubeconfig", str(path))
    assert result.returncode == 2
    assert "no AdapterRollout in namespace default" in result.stderr  # the context names none
    result = await loractl(env, "canary", "status", "food-review", "--kubeconfig", str(path),
                           "-n", NS)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Phase     Paused" in result.stdout


@pytest.mark.asyncio
async def test_an_unreachable_api_server_is_named(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    server = f"http://127.0.0.1:{port}"
    env = kubeconfig_env(server, tmp_path / "kubeconfig")
    result = await loractl(env, "canary", "status", "food-review")
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"loractl canary status: error: cannot reach the Kubernetes API server at {server} ("
    )
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.asyncio
async def test_missing_credentials_are_explained(tmp_path: Path) -> None:
    env = kubeconfig_env("http://127.0.0.1:1", tmp_path / "kubeconfig")
    env["KUBECONFIG"] = str(tmp_path / "absent")
    result = await loractl(env, "canary", "pause", "food-review")
    assert result.returncode == 3
    assert f"no Kubernetes API credentials: tried kubeconfig {tmp_path / 'absent'}" in result.stderr


@pytest.mark.asyncio
async def test_rbac_refusals_name_the_verb_and_resource(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    said = 'adapterrollouts.loractl.io is forbidden: User "dev" cannot list resource'
    kmock["list adapterrollouts"] << 403 << {"kind": "Status", "code": 403, "message": said}
    result = await loractl(env, "canary", "status", "food-review")
    assert result.returncode == 3
    assert result.stderr == (
        f"loractl canary status: error: forbidden to list adapterrollouts.loractl.io in "
        f"namespace {NS} (HTTP 403 from {str(kmock.url).rstrip('/')}): {said}; ask for a Role "
        f"granting 'list' on adapterrollouts.loractl.io in {NS}, bound to your user or "
        "service account (manifests/controller/rbac.yaml has one: loractl-canary-operator)\n"
    )


@pytest.mark.asyncio
async def test_a_refused_write_names_the_verb(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    seed(kmock)
    put(kmock, ROLLOUTS, obj(ROLLOUTS, "r", spec=rollout_spec(), status={"phase": "Progressing"}))
    kmock["patch adapterrollouts"] << 403
    result = await loractl(env, "canary", "pause", "food-review")
    assert result.returncode == 3
    assert f"forbidden to patch adapterrollouts.loractl.io in namespace {NS}" in result.stderr


@pytest.mark.asyncio
async def test_a_missing_crd_says_how_to_install_it(
    kmock: KubernetesEmulator, env: dict[str, str]
) -> None:
    serve(kmock, MODELS, POOLS, CONFIGMAPS)
    result = await loractl(env, "canary", "status", "food-review")
    assert result.returncode == 3
    assert (
        "does not serve adapterrollouts.loractl.io; install the CRD: kubectl apply -f "
        "manifests/crds/adapterrollouts.loractl.io.yaml"
    ) in result.stderr


def test_exit_codes_are_in_the_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loractl", "canary", "status", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=RUN_TIMEOUT,
    )
    assert "exit codes:" in result.stdout
    assert "  3    the Kubernetes API could not be used" in result.stdout
