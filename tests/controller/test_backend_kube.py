"""KubeBackend through the official client against kmock's Kubernetes emulator.

kmock keeps no resourceVersions: objects are created here with one ("1"), which it keeps,
since the backend refuses to write an object that has none. It applies merge patches as
RFC 7386 says, ignores field selectors, and starts every watch by replaying the current
objects. Objects changed through the client publish watch events; changing `kmock.objects`
directly is a change no watch sees, which proves a relist. Conflicts are not here: kmock
cannot produce an honest one (test_backend_conflicts.py has them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from structlog.testing import capture_logs

from controller.backend import (
    ROLLOUT_API_VERSION,
    ROLLOUT_KIND,
    AlreadyExistsError,
    Backend,
    BackendError,
    NotFoundError,
    ObjectRef,
    StaleError,
)
from controller.backend.kube import KubeBackend, raw_json
from controller.models import STICKY_HEADER_ANNOTATION, WeightedTarget
from loractl.kube import MERGE_PATCH
from tests.support.kube import CuttableProxy, call, use_kubeconfig

NAMESPACE = "serving"
WAIT = 5.0
QUIET = 0.3
ROLLOUTS = "loractl.io/v1alpha1/adapterrollouts"
MODELS = "inference.networking.x-k8s.io/v1alpha2/inferencemodels"
REWRITES = "inference.networking.x-k8s.io/v1alpha2/inferencemodelrewrites"
POOLS_V1 = "inference.networking.k8s.io/v1/inferencepools"
POOLS_V1ALPHA2 = "inference.networking.x-k8s.io/v1alpha2/inferencepools"
CONFIGMAPS = "v1/configmaps"
EVENTS = "v1/events"
KINDS = {
    ROLLOUTS: "AdapterRollout",
    MODELS: "InferenceModel",
    REWRITES: "InferenceModelRewrite",
    POOLS_V1: "InferencePool",
    POOLS_V1ALPHA2: "InferencePool",
    CONFIGMAPS: "ConfigMap",
    EVENTS: "Event",
}
EVERYTHING = tuple(KINDS)
KEY = "configmap.yaml"
DOCUMENT = """\
owner: platform-team
vLLMLoRAConfig:
  name: vllm-llama3-8b-instruct-adapters
  port: 8000
  defaultBaseModel: meta-llama/Llama-3.1-8B-Instruct
  team: search
  ensureExist:
    models:
    - id: food-review-1
      source: Kawon/llama3.1-food-finetune_v14_r8
    - id: food-review-2
      source: hf://Kawon/llama3.1-food-finetune_v14_r8@v2
      base-model: meta-llama/Llama-3.1-8B
      pinned: true
    - id: sql-lora
      source: /adapters/sql
  ensureNotExist:
    models:
    - id: food-review-0
      source: Kawon/llama3.1-food-finetune_v14_r8
"""
EXPIRED = {
    "apiVersion": "v1",
    "kind": "Status",
    "status": "Failure",
    "reason": "Expired",
    "message": "too old resource version: 1 (42)",
    "code": 410,
}


def serve(kmock: KubernetesEmulator, *resources: str) -> None:
    for resource in resources:
        subresources = ["status"] if resource == ROLLOUTS else []
        kmock.resources[resource] = ResourceInfo(
            namespaced=True, kind=KINDS[resource], subresources=subresources
        )


def body(resource: str, name: str, **fields: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": NAMESPACE, "resourceVersion": "1"}
    group_version = resource.rsplit("/", 1)[0]
    return {"apiVersion": group_version, "kind": KINDS[resource], "metadata": metadata, **fields}


class Cluster:
    """The test's side of the API: the official client, from threads."""

    def __init__(self, api: ApiClient) -> None:
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)

    async def create(self, resource: str, name: str, **fields: Any) -> None:
        obj = body(resource, name, **fields)
        if resource == CONFIGMAPS:
            await call(self.core.create_namespaced_config_map, NAMESPACE, obj)
        else:
            await call(self.custom.create_namespaced_custom_object, *_path(resource), obj)

    async def patch(self, resource: str, name: str, patch: dict[str, Any]) -> None:
        if resource == CONFIGMAPS:
            await call(self.core.patch_namespaced_config_map, name, NAMESPACE, patch,
                       _content_type=MERGE_PATCH)  # fmt: skip
        else:
            await call(self.custom.patch_namespaced_custom_object, *_path(resource), name, patch,
                       _content_type=MERGE_PATCH)  # fmt: skip

    async def delete(self, resource: str, name: str) -> None:
        await call(self.custom.delete_namespaced_custom_object, *_path(resource), name)

    async def events(self) -> list[dict[str, Any]]:
        response = await call(self.core.list_namespaced_event, NAMESPACE, _preload_content=False)
        return sorted(raw_json(response)["items"], key=lambda e: e["reason"])


def _path(resource: str) -> tuple[str, str, str, str]:
    group, version, plural = resource.split("/")
    return group, version, NAMESPACE, plural


def stored(kmock: KubernetesEmulator, resource: str, name: str) -> dict[str, Any]:
    return dict(kmock.objects[resource, NAMESPACE, name])


async def until(condition: Callable[[], bool]) -> None:
    """Polls: the caches follow the watches a moment later."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
def api(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiClient]:
    client = use_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def cluster(api: ApiClient) -> Cluster:
    return Cluster(api)


@pytest_asyncio.fixture
async def backend(api: ApiClient) -> AsyncIterator[KubeBackend]:
    """Not started: each test seeds the cluster first."""
    made = KubeBackend(api, NAMESPACE)
    yield made
    await made.stop()


async def start(backend: KubeBackend) -> None:
    async with asyncio.timeout(WAIT):
        await backend.start()


def weights(backend: KubeBackend, model: str) -> dict[str, int] | None:
    split = backend.inference_model(model)
    return None if split is None else split.weights()


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def inference_model(name: str, model: str, *targets: tuple[str, int]) -> dict[str, Any]:
    spec = {
        "modelName": model,
        "criticality": "Critical",
        "poolRef": {"name": "pool-a"},
        "targetModels": [{"name": target, "weight": weight} for target, weight in targets],
    }
    return {"spec": spec}


def rewrite_rule(model: str, *targets: tuple[str, int]) -> dict[str, Any]:
    return {
        "matches": [{"model": {"type": "Exact", "value": model}}],
        "targets": [{"modelRewrite": target, "weight": weight} for target, weight in targets],
    }


async def seed(cluster: Cluster) -> None:
    await cluster.create(ROLLOUTS, "b-rollout", spec={"model": "chat"}, status={"phase": "Done"})
    await cluster.create(ROLLOUTS, "a-rollout", spec={"model": "food-review"})
    await cluster.create(MODELS, "food", **inference_model("food", "food-review", ("fr-1", 100)))
    rules = [rewrite_rule("chat", ("chat-v1", 70), ("chat-v2", 30))]
    await cluster.create(REWRITES, "rewrites", spec={"poolRef": {"name": "pool-a"}, "rules": rules})
    await cluster.create(POOLS_V1, "pool-a", spec={})
    await cluster.create(POOLS_V1ALPHA2, "pool-b", spec={})
    await cluster.create(CONFIGMAPS, "adapters", data={KEY: DOCUMENT, "other.txt": "keep me"})


# ---- reads: the caches ----


def test_the_kube_backend_is_a_backend(api: ApiClient) -> None:
    backend: Backend = KubeBackend(api, NAMESPACE)  # mypy checks the interface, structurally
    assert (backend.rollouts(), backend.pool("p"), backend.configmap("c")) == ([], False, None)


@pytest.mark.asyncio
async def test_the_caches_fill_before_start_returns(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    await start(backend)
    assert [r.ref.name for r in backend.rollouts()] == ["a-rollout", "b-rollout"]
    rollout = backend.rollout("b-rollout")
    assert rollout is not None
    assert rollout.ref == ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE, "b-rollout")
    assert (rollout.spec, rollout.status, rollout.resource_version) == (
        {"model": "chat"},
        {"phase": "Done"},
        "1",
    )
    assert backend.rollout("absent") is None
    food = backend.inference_model("food-review")
    assert food is not None
    assert (food.ref.kind, food.ref.name, food.pool) == ("InferenceModel", "food", "pool-a")
    assert food.targets == (WeightedTarget("fr-1", 100),)
    assert backend.inference_model("food-review", pool="pool-a") == food
    assert backend.inference_model("food-review", pool="pool-b") is None
    chat = backend.inference_model("chat")
    assert chat is not None
    assert (chat.ref.kind, chat.weights()) == (
        "InferenceModelRewrite",
        {"chat-v1": 70, "chat-v2": 30},
    )
    assert backend.inference_model("absent") is None
    assert (backend.pool("pool-a"), backend.pool("pool-b"), backend.pool("pool-c")) == (
        True,
        True,
        False,
    )
    assert backend.configmap("adapters") == {KEY: DOCUMENT, "other.txt": "keep me"}
    assert backend.configmap("absent") is None


@pytest.mark.asyncio
async def test_reads_are_copies_the_caller_cannot_corrupt(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    await start(backend)
    rollout = backend.rollout("b-rollout")
    assert rollout is not None
    rollout.status["phase"] = "Scribbled"
    configmap = backend.configmap("adapters")
    assert configmap is not None
    configmap.clear()
    assert backend.rollouts()[1].status == {"phase": "Done"}
    assert backend.configmap("adapters") == {KEY: DOCUMENT, "other.txt": "keep me"}


@pytest.mark.asyncio
async def test_changes_are_followed_and_notified(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    changes = Changes()
    backend.on_change(changes)
    await start(backend)
    await until(lambda: changes.count >= 1)  # once synced
    notified = changes.count

    await cluster.patch(ROLLOUTS, "a-rollout", {"spec": {"paused": True}})
    await until(lambda: backend.rollouts()[0].spec.get("paused") is True)
    await cluster.patch(MODELS, "food", {"spec": {"targetModels": [{"name": "fr-2", "weight": 1}]}})
    await until(lambda: weights(backend, "food-review") == {"fr-2": 1})
    await cluster.delete(POOLS_V1, "pool-a")
    await until(lambda: not backend.pool("pool-a"))
    await cluster.create(CONFIGMAPS, "more", data={KEY: "x"})
    await until(lambda: backend.configmap("more") == {KEY: "x"})
    assert changes.count >= notified + 4


@pytest.mark.asyncio
async def test_absent_inference_crds_read_as_empty(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, ROLLOUTS, CONFIGMAPS, POOLS_V1)  # no InferenceModel, Rewrite or v1alpha2
    await cluster.create(POOLS_V1, "pool-a", spec={})
    with capture_logs() as logs:
        await start(backend)
    assert backend.inference_model("food-review") is None
    assert backend.pool("pool-a")
    unavailable = sorted(e["resource"] for e in logs if e["event"] == "kube_resource_unavailable")
    assert unavailable == [
        f"inferencemodelrewrites {NAMESPACE}",
        f"inferencemodels {NAMESPACE}",
        f"inferencepools.inference.networking.x-k8s.io/v1alpha2 {NAMESPACE}",
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("as_event", [True, False], ids=["as a watch event", "as an HTTP status"])
async def test_an_expired_watch_relists_and_sees_what_changed_meanwhile(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend, as_event: bool
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)

    def done_meanwhile() -> dict[str, Any]:
        # Unseen by any watch: only a fresh list can find it.
        kmock.objects[ROLLOUTS, NAMESPACE, "a-rollout"].patch({"status": {"phase": "Done"}})
        return {"type": "ERROR", "object": EXPIRED} if as_event else EXPIRED

    if as_event:
        kmock["watch adapterrollouts"][:1] << (done_meanwhile,)
    else:
        kmock["watch adapterrollouts"][:1] << 410 << done_meanwhile
    with capture_logs() as logs:
        await start(backend)
        await until(lambda: backend.rollouts()[0].status == {"phase": "Done"})
        # Once the relist's watch is open: the emulator does not replay what happened
        # between a list and its watch (an API server does, from the resourceVersion).
        await until(lambda: len(kmock["watch adapterrollouts"]) >= 2)
        await cluster.patch(ROLLOUTS, "a-rollout", {"status": {"phase": "Paused"}})
        await until(lambda: backend.rollouts()[0].status == {"phase": "Paused"})  # it holds
    assert len(kmock["list adapterrollouts"]) == 2
    assert "kube_watch_expired" in [e["event"] for e in logs]


@pytest_asyncio.fixture
async def proxy(kmock: KubernetesEmulator) -> AsyncIterator[tuple[CuttableProxy, str]]:
    cuttable = CuttableProxy(kmock.servers[0].port)
    server = await cuttable.serve()
    port = server.sockets[0].getsockname()[1]
    yield cuttable, f"http://127.0.0.1:{port}"
    cuttable.cut()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_a_dropped_connection_is_survived(
    kmock: KubernetesEmulator,
    cluster: Cluster,
    proxy: tuple[CuttableProxy, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    cuttable, url = proxy
    through_proxy = use_kubeconfig(url, tmp_path / "kubeconfig-proxy", monkeypatch)
    backend = KubeBackend(through_proxy, NAMESPACE)
    try:
        await start(backend)
        cuttable.cut()
        kmock.objects[CONFIGMAPS, NAMESPACE, "adapters"].patch({"data": {"other.txt": "v2"}})
        await asyncio.sleep(0.5)  # reconnecting fails a few times meanwhile
        cuttable.up = True
        await until(lambda: (backend.configmap("adapters") or {}).get("other.txt") == "v2")
        await cluster.patch(CONFIGMAPS, "adapters", {"data": {"other.txt": "v3"}})
        await until(lambda: (backend.configmap("adapters") or {}).get("other.txt") == "v3")
    finally:
        await backend.stop()
        through_proxy.close()  # type: ignore[no-untyped-call]


@pytest.mark.asyncio
async def test_nothing_is_notified_after_stop(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    changes = Changes()
    backend.on_change(changes)
    await start(backend)
    await until(lambda: changes.count >= 1)
    await backend.stop()
    notified = changes.count
    await cluster.patch(ROLLOUTS, "a-rollout", {"spec": {"paused": True}})
    await asyncio.sleep(QUIET)
    assert changes.count == notified


# ---- writes ----


@pytest.mark.asyncio
async def test_ensure_adapters_edits_only_what_it_names_and_then_writes_nothing(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    listed = {"food-review-1": "Kawon/llama3.1-food-finetune_v14_r8", "food-review-3": "org/new"}
    assert await backend.ensure_adapters("adapters", KEY, listed, {"food-review-2"})

    data = stored(kmock, CONFIGMAPS, "adapters")["data"]
    assert data["other.txt"] == "keep me"
    expected = yaml.safe_load(DOCUMENT)
    config = expected["vLLMLoRAConfig"]
    food_review_2 = config["ensureExist"]["models"].pop(1)  # with base-model and pinned
    config["ensureExist"]["models"].append({"id": "food-review-3", "source": "org/new"})
    config["ensureNotExist"]["models"].append(food_review_2)
    assert yaml.safe_load(data[KEY]) == expected
    assert list(yaml.safe_load(data[KEY])) == ["owner", "vLLMLoRAConfig"]  # key order kept

    assert not await backend.ensure_adapters("adapters", KEY, listed, {"food-review-2"})
    assert not await backend.ensure_adapters("adapters", KEY, {}, {"never-listed"})
    assert len(kmock["patch"]) == 1


@pytest.mark.asyncio
async def test_ensure_adapters_refuses_what_it_cannot_edit_safely(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await cluster.create(CONFIGMAPS, "broken", data={KEY: "vLLMLoRAConfig: [not, a, map]"})
    with pytest.raises(BackendError, match=f"ConfigMap {NAMESPACE}/broken, key {KEY}: schema"):
        await backend.ensure_adapters("broken", KEY, {"a": "org/a"}, ())
    with pytest.raises(BackendError, match=r"has no key 'absent\.yaml'"):
        await backend.ensure_adapters("broken", "absent.yaml", {"a": "org/a"}, ())
    with pytest.raises(NotFoundError, match=f"ConfigMap {NAMESPACE}/absent not found"):
        await backend.ensure_adapters("absent", KEY, {"a": "org/a"}, ())
    with pytest.raises(ValueError, match="not a safe adapter name"):
        await backend.ensure_adapters("broken", KEY, {"../etc": "org/a"}, ())
    assert len(kmock["patch"]) == 0


@pytest.mark.asyncio
async def test_set_weights_on_an_inference_model(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    await start(backend)
    assert await backend.set_weights("food-review", {"fr-1": 90, "fr-2": 10})
    spec = stored(kmock, MODELS, "food")["spec"]
    assert spec["targetModels"] == [{"name": "fr-1", "weight": 90}, {"name": "fr-2", "weight": 10}]
    assert (spec["criticality"], spec["poolRef"]) == ("Critical", {"name": "pool-a"})
    await until(lambda: weights(backend, "food-review") == {"fr-1": 90, "fr-2": 10})
    assert not await backend.set_weights("food-review", {"fr-1": 90, "fr-2": 10})
    assert await backend.set_weights("food-review", {"fr-2": 100})
    assert stored(kmock, MODELS, "food")["spec"]["targetModels"] == [
        {"name": "fr-2", "weight": 100}
    ]
    assert len(kmock["patch"]) == 2


@pytest.mark.asyncio
async def test_set_weights_writes_the_sticky_header_in_the_same_patch(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    await start(backend)
    assert await backend.set_weights("food-review", {"fr-1": 90, "fr-2": 10}, sticky="x-user-id")
    assert len(kmock["patch"]) == 1, "the weights and the header in one write"
    written = stored(kmock, MODELS, "food")
    assert written["metadata"]["annotations"][STICKY_HEADER_ANNOTATION] == "x-user-id"
    assert written["spec"]["targetModels"][1] == {"name": "fr-2", "weight": 10}

    def sticky() -> str | None:
        split = backend.inference_model("food-review")
        return None if split is None else split.sticky_header

    await until(lambda: sticky() == "x-user-id")
    same = {"fr-1": 90, "fr-2": 10}
    assert not await backend.set_weights("food-review", same, sticky="x-user-id")
    assert not await backend.set_weights("food-review", same)
    assert await backend.set_weights("food-review", same, sticky="x-session")
    assert stored(kmock, MODELS, "food")["metadata"]["annotations"] == {
        STICKY_HEADER_ANNOTATION: "x-session"
    }
    assert len(kmock["patch"]) == 2


@pytest.mark.asyncio
async def test_set_weights_on_a_rewrite_changes_only_the_matching_rule(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    rules = [
        rewrite_rule("chat", ("chat-v1", 100)),
        rewrite_rule("food-review", ("fr-1", 100)),
        {"targets": [{"modelRewrite": "fallback", "weight": 1}]},
    ]
    await cluster.create(REWRITES, "rewrites", spec={"poolRef": {"name": "p"}, "rules": rules})
    await start(backend)
    assert await backend.set_weights("food-review", {"fr-1": 50, "fr-2": 50})
    written = stored(kmock, REWRITES, "rewrites")["spec"]["rules"]
    assert written[1]["targets"] == [
        {"modelRewrite": "fr-1", "weight": 50},
        {"modelRewrite": "fr-2", "weight": 50},
    ]
    assert [written[0], written[1]["matches"], written[2]] == [
        rules[0],
        rules[1]["matches"],
        rules[2],
    ]


@pytest.mark.asyncio
async def test_set_weights_refuses_unknown_models_and_bad_weights(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    await seed(cluster)
    await start(backend)
    with pytest.raises(NotFoundError, match="routes model 'absent'"):
        await backend.set_weights("absent", {"x": 1})
    with pytest.raises(NotFoundError, match="routes model 'food-review' for pool pool-b"):
        await backend.set_weights("food-review", {"fr-1": 1}, pool="pool-b")
    with pytest.raises(ValueError, match="add up to 0"):
        await backend.set_weights("food-review", {"fr-1": 0})
    with pytest.raises(ValueError, match=r"0\.\.1000000"):
        await backend.set_weights("food-review", {"fr-1": -1})
    assert len(kmock["patch"]) == 0


@pytest.mark.asyncio
async def test_the_status_is_replaced_and_the_spec_left_alone(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    status = {"phase": "Progressing", "step": 1, "message": "at 10%", "gates": {"errors": "ok"}}
    await cluster.create(ROLLOUTS, "r", spec={"model": "m"}, status=status)
    new_status = {"phase": "Paused", "step": 1, "gates": {"latency": "ok"}, "reason": None}
    assert await backend.update_rollout_status("r", new_status, "1") == "1"
    obj = stored(kmock, ROLLOUTS, "r")
    assert obj["status"] == {"phase": "Paused", "step": 1, "gates": {"latency": "ok"}}
    assert obj["spec"] == {"model": "m"}
    assert [request.url.path for request in kmock["patch"]] == [
        f"/apis/loractl.io/v1alpha1/namespaces/{NAMESPACE}/adapterrollouts/r/status"
    ]
    assert await backend.update_rollout_status("r", new_status, "1") == "1"  # unchanged
    with pytest.raises(StaleError, match="not 0: status not written"):
        await backend.update_rollout_status("r", {"phase": "Done"}, "0")
    with pytest.raises(NotFoundError):
        await backend.update_rollout_status("absent", {"phase": "Done"}, "1")
    assert len(kmock["patch"]) == 1


@pytest.mark.asyncio
async def test_rollouts_are_created_and_their_spec_patched(
    kmock: KubernetesEmulator, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    manifest = {"metadata": {"name": "r"}, "spec": {"model": "m", "steps": [10, 50, 100]}}
    created = await backend.create_rollout(manifest)
    assert (created.ref.name, created.ref.namespace, created.spec) == (
        "r",
        NAMESPACE,
        manifest["spec"],
    )
    obj = stored(kmock, ROLLOUTS, "r")
    assert (obj["apiVersion"], obj["kind"]) == (ROLLOUT_API_VERSION, ROLLOUT_KIND)
    with pytest.raises(AlreadyExistsError):
        await backend.create_rollout(manifest)
    with pytest.raises(ValueError, match=r"metadata\.name"):
        await backend.create_rollout({"spec": {}})
    # What a real server does on create, and kmock does not.
    kmock.objects[ROLLOUTS, NAMESPACE, "r"].patch({"metadata": {"resourceVersion": "1"}})
    await backend.patch_rollout_spec("r", {"paused": True, "steps": [10, 100]})
    assert stored(kmock, ROLLOUTS, "r")["spec"] == {
        "model": "m",
        "steps": [10, 100],
        "paused": True,
    }
    await backend.patch_rollout_spec("r", {"paused": None}, expected_resource_version="7")
    assert list(kmock["patch"])[-1].data["metadata"] == {"resourceVersion": "7"}


@pytest.mark.asyncio
async def test_repeated_events_are_counted_on_one_event(
    kmock: KubernetesEmulator, cluster: Cluster, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    involved = ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE, "r", uid="u-1")
    await backend.emit_event(involved, "Normal", "StepStarted", "step 1: 10% to fr-2")
    await backend.emit_event(involved, "Normal", "StepStarted", "step 1: 10% to fr-2")
    await backend.emit_event(involved, "Warning", "GateFailed", "error rate 5% > 1%")
    events = await cluster.events()
    assert [(e["reason"], e["type"], e["count"]) for e in events] == [
        ("GateFailed", "Warning", 1),
        ("StepStarted", "Normal", 2),
    ]
    step = events[1]
    reference = {"apiVersion": ROLLOUT_API_VERSION, "kind": ROLLOUT_KIND, "namespace": NAMESPACE,
                 "name": "r", "uid": "u-1"}  # fmt: skip
    assert step["involvedObject"] == reference
    assert step["message"] == "step 1: 10% to fr-2"
    assert step["metadata"]["name"].startswith("r.")
    assert step["source"] == {"component": "loractl-controller"}
    assert step["firstTimestamp"] <= step["lastTimestamp"]


@pytest.mark.asyncio
async def test_an_event_that_cannot_be_recorded_is_logged_not_raised(
    kmock: KubernetesEmulator, backend: KubeBackend
) -> None:
    serve(kmock, *EVERYTHING)
    kmock["create events"] << 403  # a Role without events
    involved = ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE, "r")
    with capture_logs() as logs:
        await backend.emit_event(involved, "Warning", "GateFailed", "error rate 5% > 1%")
    assert [(e["log_level"], e["event"], e["reason"]) for e in logs] == [
        ("warning", "event_not_recorded", "GateFailed")
    ]
    assert logs[0]["error"].startswith("Event about AdapterRollout serving/r: HTTP 403")
