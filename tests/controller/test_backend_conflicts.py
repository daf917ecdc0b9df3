"""KubeBackend's compare-and-swap, against a server that does refuse stale writes.

kmock never answers 409 (and cannot fake one honestly), so these tests run against
`StrictApi`: resourceVersions that change on every write, and a 409 Conflict for a merge
patch naming an old one. Its `meddle` lands another writer's change between our read and
our write, which is exactly the race the retry exists for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from controller.backend import ConflictError, StaleError
from controller.backend.base import CONFLICT_ATTEMPTS
from controller.backend.kube import KubeBackend
from tests.controller.strict_api import StrictApi
from tests.support.kube import use_kubeconfig

NAMESPACE = "serving"
KEY = "configmap.yaml"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
ROLLOUTS = f"/apis/loractl.io/v1alpha1/namespaces/{NAMESPACE}/adapterrollouts"
REWRITES = (
    f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{NAMESPACE}/inferencemodelrewrites"
)
CONFIGMAP = f"{CONFIGMAPS}/adapters"
ROLLOUT = f"{ROLLOUTS}/r"
DOCUMENT = {
    "vLLMLoRAConfig": {
        "name": "adapters",
        "ensureExist": {"models": [{"id": "base-1", "source": "org/base-1"}]},
    }
}


@pytest_asyncio.fixture
async def strict() -> AsyncIterator[StrictApi]:
    server = StrictApi()
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def backend(
    strict: StrictApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[KubeBackend]:
    api = use_kubeconfig(strict.url, tmp_path / "kubeconfig", monkeypatch)
    made = KubeBackend(api, NAMESPACE)
    yield made
    await made.stop()
    api.close()  # type: ignore[no-untyped-call]


def add_configmap(strict: StrictApi) -> None:
    strict.add(CONFIGMAP, {"metadata": {"name": "adapters", "namespace": NAMESPACE},
                           "data": {KEY: yaml.safe_dump(DOCUMENT)}})  # fmt: skip


def adapter_added(adapter_id: str) -> Callable[[dict[str, Any]], None]:
    """Another writer adding an adapter to the document."""

    def change(configmap: dict[str, Any]) -> None:
        document = yaml.safe_load(configmap["data"][KEY])
        models = document["vLLMLoRAConfig"]["ensureExist"]["models"]
        models.append({"id": adapter_id, "source": f"org/{adapter_id}"})
        configmap["data"][KEY] = yaml.safe_dump(document)

    return change


def adapter_ids(strict: StrictApi) -> list[str]:
    document = yaml.safe_load(strict.objects[CONFIGMAP]["data"][KEY])
    return [entry["id"] for entry in document["vLLMLoRAConfig"]["ensureExist"]["models"]]


@pytest.mark.asyncio
async def test_a_conflicting_edit_is_read_again_and_both_changes_kept(
    strict: StrictApi, backend: KubeBackend
) -> None:
    add_configmap(strict)
    strict.meddle(adapter_added("theirs"))
    assert await backend.ensure_adapters("adapters", KEY, {"ours": "org/ours"}, ())
    assert adapter_ids(strict) == ["base-1", "theirs", "ours"]
    assert strict.patches == [(CONFIGMAP, 409, True), (CONFIGMAP, 200, True)]
    assert strict.requests.count(("GET", CONFIGMAP)) == 2  # read again after the conflict


@pytest.mark.asyncio
async def test_an_edit_that_keeps_conflicting_gives_up_with_a_clear_error(
    strict: StrictApi, backend: KubeBackend
) -> None:
    add_configmap(strict)
    strict.meddle(adapter_added("theirs"), times=CONFLICT_ATTEMPTS)
    with pytest.raises(ConflictError, match=f"before each of {CONFLICT_ATTEMPTS} attempts"):
        await backend.ensure_adapters("adapters", KEY, {"ours": "org/ours"}, ())
    assert strict.patches == [(CONFIGMAP, 409, True)] * CONFLICT_ATTEMPTS
    assert "ours" not in adapter_ids(strict)


@pytest.mark.asyncio
async def test_set_weights_reads_the_rewrite_again_after_a_conflict(
    strict: StrictApi, backend: KubeBackend
) -> None:
    def rule(model: str, *targets: str) -> dict[str, Any]:
        return {"matches": [{"model": {"type": "Exact", "value": model}}],
                "targets": [{"modelRewrite": t, "weight": 1} for t in targets]}  # fmt: skip

    rewrite = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": "rewrites", "namespace": NAMESPACE},
        "spec": {"poolRef": {"name": "p"}, "rules": [rule("chat", "chat-v1"), rule("food", "f-1")]},
    }
    strict.add(f"{REWRITES}/rewrites", rewrite)

    def their_canary(obj: dict[str, Any]) -> None:
        obj["spec"]["rules"][0] = rule("chat", "chat-v1", "chat-v2")

    async with asyncio.timeout(5):
        await backend.start()
    strict.meddle(their_canary)
    assert await backend.set_weights("food", {"f-1": 80, "f-2": 20})
    rules = strict.objects[f"{REWRITES}/rewrites"]["spec"]["rules"]
    assert rules[0] == rule("chat", "chat-v1", "chat-v2")
    assert rules[1]["targets"] == [
        {"modelRewrite": "f-1", "weight": 80},
        {"modelRewrite": "f-2", "weight": 20},
    ]
    assert [status for _, status, _ in strict.patches] == [409, 200]


def add_rollout(strict: StrictApi) -> str:
    strict.add(ROLLOUT, {"metadata": {"name": "r", "namespace": NAMESPACE},
                         "spec": {"model": "m"}, "status": {"phase": "Progressing"}})  # fmt: skip
    return str(strict.objects[ROLLOUT]["metadata"]["resourceVersion"])


@pytest.mark.asyncio
async def test_a_status_is_written_only_on_the_version_it_was_computed_from(
    strict: StrictApi, backend: KubeBackend
) -> None:
    version = add_rollout(strict)
    new_version = await backend.update_rollout_status("r", {"phase": "Paused"}, version)
    assert new_version == strict.objects[ROLLOUT]["metadata"]["resourceVersion"] != version
    assert strict.objects[ROLLOUT]["status"] == {"phase": "Paused"}

    # Computed from the version before: refused without a write.
    with pytest.raises(StaleError):
        await backend.update_rollout_status("r", {"phase": "Done"}, version)
    assert len(strict.patches) == 1


@pytest.mark.asyncio
async def test_a_status_overtaken_by_a_spec_change_is_refused_not_retried(
    strict: StrictApi, backend: KubeBackend
) -> None:
    version = add_rollout(strict)

    def paused_by_the_cli(obj: dict[str, Any]) -> None:
        obj["spec"]["paused"] = True

    strict.meddle(paused_by_the_cli)
    with pytest.raises(StaleError, match="409"):
        await backend.update_rollout_status("r", {"phase": "Done"}, version)
    assert strict.patches == [(f"{ROLLOUT}/status", 409, True)]
    assert strict.objects[ROLLOUT]["status"] == {"phase": "Progressing"}
    assert strict.objects[ROLLOUT]["spec"] == {"model": "m", "paused": True}


@pytest.mark.asyncio
async def test_a_spec_patch_is_conditional_only_when_asked(
    strict: StrictApi, backend: KubeBackend
) -> None:
    version = add_rollout(strict)
    new_version = await backend.patch_rollout_spec("r", {"paused": True})
    with pytest.raises(StaleError):
        await backend.patch_rollout_spec("r", {"paused": False}, expected_resource_version=version)
    await backend.patch_rollout_spec("r", {"paused": None}, expected_resource_version=new_version)
    assert strict.objects[ROLLOUT]["spec"] == {"model": "m"}
    assert [(status, conditional) for _, status, conditional in strict.patches] == [
        (200, False),
        (409, True),
        (200, True),
    ]
