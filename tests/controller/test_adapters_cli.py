"""`loractl adapters ls`: the matrix from Pod annotations, pure and through the real command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kmock import KubernetesEmulator, ResourceInfo

from controller.canary_cli import (
    CliError,
    Desired,
    PodAdapters,
    desired_from,
    matrix_json,
    parse_annotation,
    pod_adapters,
    render_matrix,
)
from controller.endpoints import POOL_V1, PoolSpec
from tests.controller.test_canary_cli import DOCUMENT, KEY, NS, kubeconfig_env, loractl

PODS = "v1/pods"
POOLS = "inference.networking.k8s.io/v1/inferencepools"
CONFIGMAPS = "v1/configmaps"
READY = {
    "phase": "Running",
    "podIP": "10.0.0.1",
    "conditions": [{"type": "Ready", "status": "True"}],
}


def pod(name: str, app: str, annotation: str | None, ready: bool = True) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS, "labels": {"app": app}}
    if annotation is not None:
        metadata["annotations"] = {"loractl.io/adapters": annotation}
    status = READY if ready else {"phase": "Pending"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status}


CLUSTER_PODS = [
    pod("vllm-1", "vllm", "food-review-1=loaded,food-review-2=failed"),
    pod("vllm-0", "vllm", "food-review-1=loaded,food-review-2=loading,sql-lora=loaded"),
    pod("vllm-2", "vllm", None, ready=False),
    pod("web-0", "web", "chat-1=loaded"),
    pod("web-1", "web", None),
]
POOL = PoolSpec(POOL_V1, {"app": "vllm"}, (8000,))


# ---- pure ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=loaded,b=loading", {"a": "loaded", "b": "loading"}),
        (" a = loaded , ", {"a": "loaded"}),
        ("a=", {"a": "?"}),
        ("", {}),
    ],
)
def test_the_annotation_parses(text: str, expected: dict[str, str]) -> None:
    assert parse_annotation(text) == expected


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        (None, [("vllm-0", True, 3), ("vllm-1", True, 2), ("web-0", True, 1)]),
        (POOL, [("vllm-0", True, 3), ("vllm-1", True, 2), ("vllm-2", False, None)]),
    ],
    ids=["annotated pods", "the pool's pods"],
)
def test_pods_are_those_of_the_pool_or_else_the_annotated(
    pool: PoolSpec | None, expected: list[tuple[str, bool, int | None]]
) -> None:
    rows = pod_adapters(CLUSTER_PODS, pool)
    found = [(r.name, r.ready, None if r.adapters is None else len(r.adapters)) for r in rows]
    assert found == expected


def test_the_desired_lists_come_from_the_configmap() -> None:
    document = (
        DOCUMENT + "  ensureNotExist:\n    models:\n    - id: food-review-0\n      source: x/y\n"
    )
    desired = desired_from("adapters", KEY, {KEY: document})
    assert desired == Desired("adapters", KEY, ("food-review-1", "sql-lora"), ("food-review-0",))
    assert [desired.state(i) for i in ("food-review-1", "food-review-0", "other")] == [
        "exist",
        "not exist",
        "",
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "no ConfigMap 'adapters': fix --configmap, or leave it out"),
        ({"other": "x"}, "ConfigMap adapters, key configmap.yaml: no such key (keys: other)"),
        ({KEY: "[1, 2]"}, "ConfigMap adapters, key configmap.yaml: missing the top-level"),
    ],
)
def test_an_unusable_configmap_is_refused(data: dict[str, str] | None, problem: str) -> None:
    with pytest.raises(CliError, match="^" + problem.replace("(", r"\(").replace(")", r"\)")):
        desired_from("adapters", KEY, data)


MATRIX = """\
POD                  READY  food-review-1  food-review-2  sql-lora
vllm-0               yes    loaded         loading        loaded
vllm-1               yes    loaded         failed         -
vllm-2               no     ?              ?              ?
(desired: adapters)         exist                         exist
?: no loractl.io/adapters annotation on vllm-2: run the sidecars with --annotate-pod (it needs RBAC patch on pods)
-: the pod's sidecar does not report that adapter
"""  # noqa: E501


def test_the_matrix_shows_every_pod_against_every_adapter() -> None:
    pods = pod_adapters(CLUSTER_PODS, POOL)
    desired = desired_from("adapters", KEY, {KEY: DOCUMENT})
    assert render_matrix(pods, desired, "of pool pool-a") == MATRIX


@pytest.mark.parametrize(
    ("pods", "desired", "expected"),
    [
        ([], None, "no pods in namespace serving carry the loractl.io/adapters annotation: run "
         "their sidecars with --annotate-pod, or pass --pool to list the pool's pods\n"),
        ([PodAdapters("p", True, {})], None, "POD  READY\np    yes\n"
         "-: the pod's sidecar does not report that adapter\n"),
        ([], Desired("cm", KEY, ("a",), ()),
         "POD            READY  a\n(desired: cm)         exist\nno pods in namespace serving\n"),
    ],
)  # fmt: skip
def test_matrices_of_few_pods(
    pods: list[PodAdapters], desired: Desired | None, expected: str
) -> None:
    assert render_matrix(pods, desired, f"in namespace {NS}") == expected


def test_the_matrix_as_json() -> None:
    pods = [PodAdapters("p", False, None), PodAdapters("q", True, {"a": "loaded"})]
    assert matrix_json(pods, Desired("cm", KEY, ("a",), ("b",), {"c": "bad"})) == {
        "pods": [
            {"name": "p", "ready": False, "adapters": None},
            {"name": "q", "ready": True, "adapters": {"a": "loaded"}},
        ],
        "desired": {
            "configMap": "cm",
            "key": KEY,
            "ensureExist": ["a"],
            "ensureNotExist": ["b"],
            "problems": {"c": "bad"},
        },
    }


# ---- the real command against kmock ----


@pytest.fixture
def env(kmock: KubernetesEmulator, tmp_path: Path) -> dict[str, str]:
    for resource, kind in ((PODS, "Pod"), (POOLS, "InferencePool"), (CONFIGMAPS, "ConfigMap")):
        kmock.resources[resource] = ResourceInfo(namespaced=True, kind=kind)
    for body in CLUSTER_PODS:
        kmock.objects[PODS, NS, body["metadata"]["name"]] = body
    spec = {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}]}
    kmock.objects[POOLS, NS, "pool-a"] = {"metadata": {"name": "pool-a"}, "spec": spec}
    kmock.objects[CONFIGMAPS, NS, "adapters"] = {
        "metadata": {"name": "adapters"},
        "data": {KEY: DOCUMENT},
    }
    return kubeconfig_env(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")


@pytest.mark.asyncio
async def test_ls_shows_the_annotated_pods(env: dict[str, str]) -> None:
    result = await loractl(env, "adapters", "ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == [
        "POD     READY  chat-1  food-review-1  food-review-2  sql-lora",
        "vllm-0  yes    -       loaded         loading        loaded",
        "vllm-1  yes    -       loaded         failed         -",
        "web-0   yes    loaded  -              -              -",
    ]


@pytest.mark.asyncio
async def test_ls_of_a_pool_with_its_configmap(env: dict[str, str]) -> None:
    result = await loractl(env, "adapters", "ls", "--pool", "pool-a", "--configmap", "adapters")
    assert result.returncode == 0, result.stderr
    assert result.stdout == MATRIX


@pytest.mark.asyncio
async def test_ls_as_json(env: dict[str, str]) -> None:
    result = await loractl(env, "adapters", "ls", "--pool", "pool-a", "-o", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["desired"] is None
    assert [(p["name"], p["ready"], p["adapters"]) for p in document["pods"]] == [
        ("vllm-0", True, {"food-review-1": "loaded", "food-review-2": "loading",
                          "sql-lora": "loaded"}),
        ("vllm-1", True, {"food-review-1": "loaded", "food-review-2": "failed"}),
        ("vllm-2", False, None),
    ]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--pool", "pool-z"), "no InferencePool 'pool-z' in namespace serving (pools there: "
         "pool-a): fix --pool"),
        (("--configmap", "nope"), "no ConfigMap 'nope': fix --configmap, or leave it out"),
    ],
)  # fmt: skip
async def test_ls_names_what_is_missing(
    env: dict[str, str], args: tuple[str, ...], problem: str
) -> None:
    result = await loractl(env, "adapters", "ls", *args)
    assert result.returncode == 2
    assert result.stderr == f"loractl adapters ls: error: {problem}\n"
