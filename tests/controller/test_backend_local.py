"""LocalBackend over a temporary directory: the KubeBackend's behaviours, with files.

Each test writes the files a user would, starts the backend on them and checks both the
cache and the files. The last two tests run the real RolloutRunner on it: the rollout
logic is the one the cluster mode runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from prometheus_client import CollectorRegistry
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
from controller.backend import local as local_module
from controller.backend.base import edit_adapter_config
from controller.backend.local import LocalBackend
from controller.inventory import Endpoint, Inventory
from controller.models import STICKY_HEADER_ANNOTATION, WeightedTarget
from controller.rollout.runner import RolloutMetrics, RolloutRunner
from controller.stats import TrafficStats

NAMESPACE = "serving"
WAIT = 5.0
QUIET = 0.3
KEY = "configmap.yaml"
POOL = "pool-a"
FROM, TO = "food-review-1", "food-review-2"
FROM_SOURCE, TO_SOURCE = "Kawon/llama3.1-food-finetune_v14_r8", "hf://org/food-review@v2"
ENDPOINT = "127.0.0.2:8000"
DOCUMENT = """\
owner: platform-team
vLLMLoRAConfig:
  name: vllm-llama3-8b-instruct-adapters
  port: 8000
  defaultBaseModel: meta-llama/Llama-3.1-8B-Instruct
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
# A hand-written file: a comment, several documents, one in another namespace.
WORLD = f"""\
# serving objects for the local demo
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: {POOL}
  annotations:
    loractl.io/endpoints: "{ENDPOINT}, 127.0.0.3:8000"
spec: {{}}
---
# the model: all traffic on the old adapter
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata:
  name: food
spec:
  modelName: food-review
  criticality: Critical
  poolRef: {{name: {POOL}}}
  targetModels:
  - {{name: {FROM}, weight: 100}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: pool-b
  namespace: {NAMESPACE}
spec: {{}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: elsewhere
  namespace: other
spec: {{}}
"""
REWRITES = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: rewrites}
spec:
  poolRef: {name: pool-a}
  rules:
  - matches: [{model: {type: Exact, value: chat}}]
    targets: [{modelRewrite: chat-v1, weight: 70}, {modelRewrite: chat-v2, weight: 30}]
  - matches: [{model: {type: Exact, value: other}}]
    targets: [{modelRewrite: other-v1, weight: 1}]
"""


def configmap(document: str = DOCUMENT) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "adapters"},
        "data": {KEY: document, "other.txt": "keep me"},
    }


def rollout_object(name: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> str:
    obj: dict[str, Any] = {
        "apiVersion": ROLLOUT_API_VERSION,
        "kind": ROLLOUT_KIND,
        "metadata": {"name": name},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return yaml.safe_dump(obj, sort_keys=False)


def seed(directory: Path) -> None:
    (directory / "world.yaml").write_text(WORLD)
    (directory / "rewrites.yml").write_text(REWRITES)
    # The ConfigMap shares its file with a rollout, after a leading comment.
    (directory / "mixed.yaml").write_text(
        "# adapters and a rollout\n"
        + yaml.safe_dump(configmap(), sort_keys=False)
        + "---\n"
        + rollout_object("b-rollout", {"model": "chat"}, {"phase": "Done"})
    )
    (directory / "a.yaml").write_text(rollout_object("a-rollout", {"model": "food-review"}))
    (directory / "notes.txt").write_text("kind: ConfigMap\nmetadata: {name: ignored}\n")


def read(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


async def until(condition: Callable[[], bool], wait: float = WAIT) -> None:
    """Polls: the cache follows the files a debounce later."""
    async with asyncio.timeout(wait):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    made = tmp_path / "objects"
    made.mkdir()
    return made


@pytest_asyncio.fixture
async def backend(directory: Path) -> AsyncIterator[LocalBackend]:
    """Not started: each test writes its files first."""
    made = LocalBackend(directory, NAMESPACE)
    yield made
    await made.stop()


def weights(backend: LocalBackend, model: str) -> dict[str, int] | None:
    split = backend.inference_model(model)
    return None if split is None else split.weights()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- reads ----


def test_the_local_backend_is_a_backend(directory: Path) -> None:
    backend: Backend = LocalBackend(directory)  # mypy checks the interface, structurally
    assert (backend.rollouts(), backend.pool("p"), backend.configmap("c")) == ([], False, None)


@pytest.mark.asyncio
async def test_the_cache_fills_from_every_file_and_document(
    directory: Path, backend: LocalBackend
) -> None:
    seed(directory)
    changes = Changes()
    backend.on_change(changes)
    await backend.start()
    await until(lambda: changes.count == 1)  # once loaded, as the kube backend once synced

    assert [r.ref.name for r in backend.rollouts()] == ["a-rollout", "b-rollout"]
    rollout = backend.rollout("b-rollout")
    assert rollout is not None
    assert rollout.ref == ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE, "b-rollout")
    assert (rollout.spec, rollout.status, rollout.generation) == (
        {"model": "chat"},
        {"phase": "Done"},
        1,
    )
    assert len(rollout.resource_version) == 16
    rollout.status["phase"] = "Scribbled"  # a copy: the cache is untouched
    assert backend.rollouts()[1].status == {"phase": "Done"}

    food = backend.inference_model("food-review")
    assert food is not None
    assert (food.ref.kind, food.ref.namespace, food.ref.name, food.pool) == (
        "InferenceModel", NAMESPACE, "food", POOL,
    )  # fmt: skip
    assert food.targets == (WeightedTarget(FROM, 100),)
    assert backend.inference_model("food-review", pool="pool-b") is None
    chat = backend.inference_model("chat")
    assert chat is not None
    assert (chat.ref.kind, chat.weights()) == (
        "InferenceModelRewrite",
        {"chat-v1": 70, "chat-v2": 30},
    )
    assert [backend.pool(p) for p in (POOL, "pool-b", "elsewhere", "absent")] == [
        True, True, False, False,
    ]  # fmt: skip
    assert backend.pool_endpoints(POOL) == [Endpoint(ENDPOINT), Endpoint("127.0.0.3:8000")]
    assert backend.pool_endpoints("pool-b") == []
    assert backend.pool_endpoints("absent") is None
    assert backend.configmap("adapters") == {KEY: DOCUMENT, "other.txt": "keep me"}
    assert backend.configmap("ignored") is None  # not a YAML file


@pytest.mark.asyncio
async def test_external_edits_are_followed_and_notified(
    directory: Path, backend: LocalBackend
) -> None:
    seed(directory)
    changes = Changes()
    backend.on_change(changes)
    await backend.start()
    await until(lambda: changes.count == 1)

    before = backend.rollouts()[0].resource_version
    (directory / "a.yaml").write_text(
        rollout_object("a-rollout", {"model": "food-review", "paused": True})
    )
    await until(lambda: backend.rollouts()[0].spec.get("paused") is True)
    assert backend.rollouts()[0].resource_version != before
    (directory / "world.yaml").write_text(
        WORLD.replace(f"name: {FROM}, weight: 100", "name: fr-2, weight: 1")
    )
    await until(lambda: weights(backend, "food-review") == {"fr-2": 1})
    (directory / "rewrites.yml").unlink()
    await until(lambda: backend.inference_model("chat") is None)
    assert changes.count >= 4

    await backend.stop()
    notified = changes.count
    (directory / "a.yaml").unlink()
    await asyncio.sleep(QUIET)
    assert changes.count == notified
    assert backend.rollout("a-rollout") is not None  # nothing reloads after stop


@pytest.mark.asyncio
async def test_a_broken_file_keeps_its_last_good_objects(
    directory: Path, backend: LocalBackend
) -> None:
    seed(directory)
    await backend.start()
    with capture_logs() as logs:
        (directory / "mixed.yaml").write_text("kind: ConfigMap\nmetadata: {name: [unclosed\n")
        (directory / "a.yaml").write_text(rollout_object("a-rollout", {"model": "new"}))
        await until(lambda: backend.rollouts()[0].spec == {"model": "new"})  # others reload
        await asyncio.sleep(QUIET)  # more events, same problem: logged once
    assert backend.configmap("adapters") == {KEY: DOCUMENT, "other.txt": "keep me"}
    assert backend.rollout("b-rollout") is not None
    invalid = [e for e in logs if e["event"] == "local_file_invalid"]
    assert [(e["file"], e["log_level"], e["kept_objects"]) for e in invalid] == [
        ("mixed.yaml", "warning", 2)
    ]
    with pytest.raises(BackendError, match=r"mixed\.yaml does not parse"):
        await backend.ensure_adapters("adapters", KEY, {"x": "org/x"}, ())

    (directory / "mixed.yaml").write_text(yaml.safe_dump(configmap("vLLMLoRAConfig: {}\n")))
    await until(lambda: backend.rollout("b-rollout") is None)
    assert backend.configmap("adapters") == {KEY: "vLLMLoRAConfig: {}\n", "other.txt": "keep me"}


# ---- writes ----


@pytest.mark.asyncio
async def test_ensure_adapters_edits_only_what_it_names_and_then_writes_nothing(
    directory: Path, backend: LocalBackend
) -> None:
    seed(directory)
    await backend.start()
    path = directory / "mixed.yaml"
    listed = {FROM: FROM_SOURCE, "food-review-3": "org/new"}
    assert await backend.ensure_adapters("adapters", KEY, listed, {"food-review-2"})

    text = path.read_text()
    assert text.startswith("# adapters and a rollout\n")  # the untouched parts keep their text
    assert text.endswith(rollout_object("b-rollout", {"model": "chat"}, {"phase": "Done"}))
    written, rollout = read(path)
    assert rollout["metadata"]["name"] == "b-rollout"
    assert written["data"]["other.txt"] == "keep me"
    expected = yaml.safe_load(DOCUMENT)
    config = expected["vLLMLoRAConfig"]
    food_review_2 = config["ensureExist"]["models"].pop(1)  # with base-model and pinned
    config["ensureExist"]["models"].append({"id": "food-review-3", "source": "org/new"})
    config["ensureNotExist"]["models"].append(food_review_2)
    assert yaml.safe_load(written["data"][KEY]) == expected
    assert "  configmap.yaml: |\n    owner: platform-team\n" in text  # readable with `cat`
    assert backend.configmap("adapters") == written["data"]  # our write reads back at once
    assert leftovers(directory) == []

    modified = path.stat().st_mtime_ns
    assert not await backend.ensure_adapters("adapters", KEY, listed, {"food-review-2"})
    assert not await backend.ensure_adapters("adapters", KEY, {}, {"never-listed"})
    assert path.stat().st_mtime_ns == modified


@pytest.mark.asyncio
async def test_ensure_adapters_refuses_what_it_cannot_edit_safely(
    directory: Path, backend: LocalBackend
) -> None:
    broken = configmap("vLLMLoRAConfig: [not, a, map]")
    broken["metadata"]["name"] = "broken"
    (directory / "broken.yaml").write_text(yaml.safe_dump(broken))
    await backend.start()
    with pytest.raises(BackendError, match=f"ConfigMap {NAMESPACE}/broken, key {KEY}: schema"):
        await backend.ensure_adapters("broken", KEY, {"a": "org/a"}, ())
    with pytest.raises(BackendError, match=r"has no key 'absent\.yaml'"):
        await backend.ensure_adapters("broken", "absent.yaml", {"a": "org/a"}, ())
    with pytest.raises(NotFoundError, match=f"ConfigMap {NAMESPACE}/absent not found"):
        await backend.ensure_adapters("absent", KEY, {"a": "org/a"}, ())
    with pytest.raises(ValueError, match="not a safe adapter name"):
        await backend.ensure_adapters("broken", KEY, {"../etc": "org/a"}, ())
    assert read(directory / "broken.yaml") == [broken]


@pytest.mark.asyncio
async def test_a_concurrent_edit_is_kept_and_the_write_retried(
    directory: Path, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(directory)
    await backend.start()
    path = directory / "mixed.yaml"
    real_edit = edit_adapter_config
    calls = 0

    def edit_while_someone_writes(*args: Any) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:  # between our read and our rename, someone else writes the file
            path.write_text(path.read_text().replace("keep me", "edited meanwhile"))
        return real_edit(*args)

    monkeypatch.setattr("controller.backend.local.edit_adapter_config", edit_while_someone_writes)
    with capture_logs() as logs:
        assert await backend.ensure_adapters("adapters", KEY, {"new-one": "org/new"}, ())
    assert calls == 2
    assert [e["attempt"] for e in logs if e["event"] == "write_conflict"] == [1]
    data = read(path)[0]["data"]
    assert data["other.txt"] == "edited meanwhile"  # their change survived ours
    assert "new-one" in data[KEY]


@pytest.mark.asyncio
async def test_set_weights_on_an_inference_model_and_a_rewrite(
    directory: Path, backend: LocalBackend
) -> None:
    seed(directory)
    await backend.start()
    assert await backend.set_weights("food-review", {FROM: 90, "fr-2": 10})
    world = read(directory / "world.yaml")
    spec = world[1]["spec"]
    assert spec["targetModels"] == [{"name": FROM, "weight": 90}, {"name": "fr-2", "weight": 10}]
    assert (spec["criticality"], spec["poolRef"]) == ("Critical", {"name": POOL})
    assert [doc["metadata"]["name"] for doc in world] == [POOL, "food", "pool-b", "elsewhere"]
    assert "# serving objects for the local demo" in (directory / "world.yaml").read_text()
    assert weights(backend, "food-review") == {FROM: 90, "fr-2": 10}
    assert not await backend.set_weights("food-review", {FROM: 90, "fr-2": 10})

    assert await backend.set_weights("chat", {"chat-v2": 100})
    rules = read(directory / "rewrites.yml")[0]["spec"]["rules"]
    assert rules[0]["targets"] == [{"modelRewrite": "chat-v2", "weight": 100}]
    assert rules[1] == yaml.safe_load(REWRITES)["spec"]["rules"][1]

    assert await backend.set_weights("chat", {"chat-v2": 100}, sticky="x-user-id")
    written = read(directory / "rewrites.yml")[0]
    assert written["metadata"]["annotations"] == {STICKY_HEADER_ANNOTATION: "x-user-id"}
    assert written["spec"]["rules"][0]["targets"] == [{"modelRewrite": "chat-v2", "weight": 100}]
    chat = backend.inference_model
    await until(lambda: getattr(chat("chat"), "sticky_header", None) == "x-user-id")
    assert not await backend.set_weights("chat", {"chat-v2": 100}, sticky="x-user-id")

    with pytest.raises(NotFoundError, match="routes model 'absent'"):
        await backend.set_weights("absent", {"x": 1})
    with pytest.raises(NotFoundError, match="routes model 'food-review' for pool pool-b"):
        await backend.set_weights("food-review", {FROM: 1}, pool="pool-b")
    with pytest.raises(ValueError, match="add up to 0"):
        await backend.set_weights("food-review", {FROM: 0})
    assert leftovers(directory) == []


@pytest.mark.asyncio
async def test_the_status_is_replaced_by_write_then_rename(
    directory: Path, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = {"phase": "Progressing", "currentStep": 1, "message": "at 10%"}
    path = directory / "r.yaml"
    path.write_text(rollout_object("r", {"model": "m"}, status))
    await backend.start()
    stored = backend.rollout("r")
    assert stored is not None
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(source: Any, destination: Any) -> None:
        # The rename is the only way into the file: what it moves is already complete.
        replaced.append((Path(source).name, Path(destination).name))
        assert yaml.safe_load(Path(source).read_text())["status"]["phase"] == "Paused"
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    new_status = {"phase": "Paused", "currentStep": 1, "lastGates": {"a": None}, "reason": None}
    version = await backend.update_rollout_status("r", new_status, stored.resource_version)
    assert len(replaced) == 1
    assert replaced[0][1] == "r.yaml"
    assert replaced[0][0].startswith(".r.yaml.")  # beside it, hidden: never loaded
    (obj,) = read(path)
    assert obj["status"] == {"phase": "Paused", "currentStep": 1, "lastGates": {}}
    assert obj["spec"] == {"model": "m"}
    assert leftovers(directory) == []
    after = backend.rollout("r")
    assert after is not None
    assert (after.resource_version, after.status) == (version, obj["status"])

    assert await backend.update_rollout_status("r", new_status, version) == version  # unchanged
    assert len(replaced) == 1
    with pytest.raises(StaleError, match="status not written"):
        await backend.update_rollout_status("r", {"phase": "Done"}, stored.resource_version)
    with pytest.raises(NotFoundError):
        await backend.update_rollout_status("absent", {"phase": "Done"}, version)


@pytest.mark.asyncio
async def test_a_file_changed_underneath_makes_the_status_stale(
    directory: Path, backend: LocalBackend
) -> None:
    path = directory / "r.yaml"
    path.write_text(rollout_object("r", {"model": "m"}))
    await backend.start()
    stored = backend.rollout("r")
    assert stored is not None
    # A user edits the file; the controller decided from what it read before.
    path.write_text(rollout_object("r", {"model": "m", "paused": True}))
    with pytest.raises(StaleError, match=f"not {stored.resource_version}"):
        await backend.update_rollout_status("r", {"phase": "Loading"}, stored.resource_version)
    assert read(path)[0] == yaml.safe_load(rollout_object("r", {"model": "m", "paused": True}))


@pytest.mark.asyncio
async def test_rollouts_are_created_and_their_spec_patched(
    directory: Path, backend: LocalBackend
) -> None:
    await backend.start()
    manifest = {"metadata": {"name": "r"}, "spec": {"model": "m", "steps": [10, 50, 100]}}
    created = await backend.create_rollout(manifest)
    assert (created.ref.name, created.ref.namespace, created.spec, created.generation) == (
        "r", NAMESPACE, manifest["spec"], 1,
    )  # fmt: skip
    path = directory / "r.adapterrollout.yaml"
    (obj,) = read(path)
    assert (obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]) == (
        ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE,
    )  # fmt: skip
    assert backend.rollout("r") == created
    with pytest.raises(AlreadyExistsError):
        await backend.create_rollout(manifest)
    with pytest.raises(ValueError, match=r"metadata\.name"):
        await backend.create_rollout({"spec": {}})
    with pytest.raises(ValueError, match="DNS-1123"):
        await backend.create_rollout({"metadata": {"name": "../escape"}})

    version = await backend.patch_rollout_spec("r", {"paused": True, "steps": [10, 100]})
    (obj,) = read(path)
    assert obj["spec"] == {"model": "m", "steps": [10, 100], "paused": True}
    assert obj["metadata"]["generation"] == 2
    with pytest.raises(StaleError, match="spec not patched"):
        await backend.patch_rollout_spec("r", {"paused": None}, expected_resource_version="7")
    await backend.patch_rollout_spec("r", {"paused": None}, expected_resource_version=version)
    assert read(path)[0]["spec"] == {"model": "m", "steps": [10, 100]}


@pytest.mark.asyncio
async def test_events_are_appended_to_events_log(directory: Path, backend: LocalBackend) -> None:
    involved = ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, NAMESPACE, "r", uid="u-1")
    with capture_logs() as logs:
        await backend.emit_event(involved, "Normal", "StepStarted", "step 1: 10% to fr-2")
        await backend.emit_event(involved, "Warning", "GateFailed", "error rate 5% > 1%")
    lines = [json.loads(line) for line in (directory / "events.log").read_text().splitlines()]
    assert [(e["type"], e["reason"], e["message"]) for e in lines] == [
        ("Normal", "StepStarted", "step 1: 10% to fr-2"),
        ("Warning", "GateFailed", "error rate 5% > 1%"),
    ]
    reference = {"apiVersion": ROLLOUT_API_VERSION, "kind": ROLLOUT_KIND,
                 "namespace": NAMESPACE, "name": "r"}  # fmt: skip
    assert lines[0]["involvedObject"] == reference
    assert [e["event"] for e in logs] == ["local_event", "local_event"]

    (directory / "events.log").unlink()
    (directory / "events.log").mkdir()  # cannot be appended to: logged, not raised
    with capture_logs() as logs:
        await backend.emit_event(involved, "Warning", "GateFailed", "again")
    assert [(e["event"], e["reason"]) for e in logs] == [("event_not_recorded", "GateFailed")]


# ---- the same rollout logic as on a cluster ----

ROLLOUT_SPEC: dict[str, Any] = {
    "pool": POOL,
    "model": "food-review",
    "configMap": {"name": "adapters"},
    "from": {"id": FROM, "source": FROM_SOURCE},
    "to": {"id": TO, "source": TO_SOURCE},
    "gates": {"minRequests": 3, "maxP95LatencyRatio": None},
    "drain": "1s",
}
ADAPTERS = f"""\
vLLMLoRAConfig:
  name: adapters
  port: 8000
  defaultBaseModel: base
  ensureExist:
    models:
    - id: {FROM}
      source: {FROM_SOURCE}
"""


def rollout_world(directory: Path, steps: list[dict[str, Any]]) -> None:
    (directory / "world.yaml").write_text(WORLD)
    (directory / "adapters.yaml").write_text(yaml.safe_dump(configmap(ADAPTERS), sort_keys=False))
    spec = {**ROLLOUT_SPEC, "steps": steps}
    (directory / "canary.yaml").write_text(rollout_object("canary", spec))


def status_in_file(directory: Path) -> dict[str, Any]:
    status: dict[str, Any] = read(directory / "canary.yaml")[0].get("status") or {}
    return status


def reasons(status: dict[str, Any]) -> list[str]:
    return [entry["reason"] for entry in status.get("history") or []]


@contextlib.asynccontextmanager
async def controller(directory: Path) -> AsyncIterator[LocalBackend]:
    """What `--local DIR` runs: a LocalBackend under the RolloutRunner, with a vLLM pod
    that has `to` loaded and answers well for both adapters."""
    backend = LocalBackend(directory, NAMESPACE)
    inventory = Inventory()
    stats = TrafficStats()
    runner = RolloutRunner(backend, inventory, stats, RolloutMetrics(CollectorRegistry(), backend))
    await backend.start()
    endpoints = backend.pool_endpoints(POOL)
    assert endpoints is not None
    inventory.set_endpoints(endpoints)
    addresses = [endpoint.address for endpoint in endpoints]

    async def serve() -> None:
        while True:
            for address in addresses:
                inventory.record_registered(address, frozenset({FROM, TO}))
            for target in (FROM, TO):
                stats.record("food-review", target, ENDPOINT, 200, 0.1)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(serve()), asyncio.create_task(runner.run(lambda: True))]
    try:
        yield backend
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.stop()


@pytest.mark.asyncio
async def test_the_rollout_runner_promotes_a_rollout_in_files(directory: Path) -> None:
    rollout_world(directory, [{"weight": 50, "pause": "1s"}, {"weight": 100, "pause": "1s"}])
    async with controller(directory):
        await until(lambda: status_in_file(directory).get("phase") == "Promoted", wait=20)
        # `from` is unlisted once drained: the status says so by clearing unlistAfter.
        await until(lambda: status_in_file(directory).get("unlistAfter") is None, wait=10)
    status = status_in_file(directory)
    assert reasons(status) == ["LoadingAdapter", "StepStarted", "StepStarted", "Promoted"]
    world = read(directory / "world.yaml")
    assert world[1]["spec"]["targetModels"] == [{"name": TO, "weight": 100}]
    config = yaml.safe_load(read(directory / "adapters.yaml")[0]["data"][KEY])["vLLMLoRAConfig"]
    assert [m["id"] for m in config["ensureExist"]["models"]] == [TO]
    assert [m["id"] for m in config["ensureNotExist"]["models"]] == [FROM]
    logged = (directory / "events.log").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in logged] == reasons(status)
    assert leftovers(directory) == []


@pytest.mark.asyncio
async def test_a_restarted_controller_resumes_at_the_same_step(directory: Path) -> None:
    steps: list[dict[str, Any]] = [
        {"weight": 10, "pause": "1s"},
        {"weight": 50, "manual": True},
        {"weight": 100},
    ]
    rollout_world(directory, steps)
    async with controller(directory):
        await until(lambda: status_in_file(directory).get("phase") == "Paused", wait=20)
    held = status_in_file(directory)
    assert (held["currentStep"], reasons(held)[-1]) == (1, "AwaitingApproval")

    async with controller(directory) as backend:
        await asyncio.sleep(1.5)  # at least one tick of the new runner: it must not restart
        assert reasons(status_in_file(directory)) == reasons(held)
        stored = backend.rollout("canary")
        assert stored is not None
        await backend.patch_rollout_spec("canary", {"approvedStep": 1})  # `canary resume`
        await until(lambda: status_in_file(directory).get("phase") == "Promoted", wait=20)
    history = reasons(status_in_file(directory))
    assert history.count("StepStarted") == 3
    assert history == [
        "LoadingAdapter", "StepStarted", "StepStarted", "AwaitingApproval", "Resumed",
        "StepStarted", "Promoted",
    ]  # fmt: skip
    assert status_in_file(directory)["observedGeneration"] == 2


def test_no_file_is_ever_written_outside_the_directory(directory: Path) -> None:
    # Names from manifests become file names: only DNS-1123 names, so never a path.
    assert local_module._NAME.fullmatch("canary.v2")
    assert not local_module._NAME.fullmatch("../x")
    assert not local_module._NAME.fullmatch(".hidden")
