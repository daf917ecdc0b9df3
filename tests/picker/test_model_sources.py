"""Where model weights come from: a watched file, or the cluster's objects (kmock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CustomObjectsApi
from structlog.testing import capture_logs

from controller.model_sources import MODEL_GROUP, MODEL_VERSION, ClusterModels, FileModels
from controller.models import ModelTable
from tests.support.gateway import inference_model, write_models
from tests.support.kube import call, use_kubeconfig

NAMESPACE = "default"


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling a state set from other threads
            await asyncio.sleep(0.02)


def targets(table: ModelTable, model: str) -> dict[str, int]:
    route = table.resolve(model)
    return {} if route is None else {t.name: t.weight for t in route.targets}


@pytest.mark.asyncio
async def test_file_reloads_on_change_and_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = write_models(tmp_path / "models.yaml", [inference_model("m", {"v1": 100})])
    models = FileModels(path, asyncio.get_running_loop())
    models.start()
    try:
        assert targets(models.current(), "m") == {"v1": 100}
        write_models(path, [inference_model("m", {"v1": 50, "v2": 50})])
        await eventually(lambda: targets(models.current(), "m") == {"v1": 50, "v2": 50})
        path.write_text("kind: [broken")
        await eventually(lambda: models.error is not None)
        assert targets(models.current(), "m") == {"v1": 50, "v2": 50}, "last good table kept"
    finally:
        models.stop()


@asynccontextmanager
async def cluster_models(kmock: KubernetesEmulator, api: ApiClient) -> AsyncIterator[ClusterModels]:
    models = ClusterModels(api, NAMESPACE, "pool", asyncio.get_running_loop())
    models.start()
    try:
        yield models
    finally:
        await asyncio.to_thread(models.stop)


async def create(api: ApiClient, plural: str, obj: dict[str, Any]) -> None:
    await call(
        CustomObjectsApi(api).create_namespaced_custom_object,
        MODEL_GROUP,
        MODEL_VERSION,
        NAMESPACE,
        plural,
        obj,
    )


@pytest.mark.asyncio
async def test_cluster_objects_are_watched(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kmock.resources[f"{MODEL_GROUP}/{MODEL_VERSION}/inferencemodels"] = ResourceInfo(
        namespaced=True, kind="InferenceModel"
    )
    # InferenceModelRewrite is not served here: as on a cluster without that CRD.
    api = use_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    await create(api, "inferencemodels", inference_model("food-review", {"v1": 90, "v2": 10}))
    async with cluster_models(kmock, api) as models:
        await eventually(lambda: targets(models.current(), "food-review") == {"v1": 90, "v2": 10})
        await call(
            CustomObjectsApi(api).patch_namespaced_custom_object,
            MODEL_GROUP,
            MODEL_VERSION,
            NAMESPACE,
            "inferencemodels",
            "food-review",
            {"spec": {"targetModels": [{"name": "v2", "weight": 100}]}},
            _content_type="application/merge-patch+json",
        )
        await eventually(lambda: targets(models.current(), "food-review") == {"v2": 100})
        broken = inference_model("broken", {"a": 1})
        broken["spec"]["criticality"] = "Urgent"
        with capture_logs() as logs:
            await create(api, "inferencemodels", broken)
            await eventually(lambda: any(e["event"] == "model_object_rejected" for e in logs))
        assert "is not one of Critical" in next(
            e["error"] for e in logs if e["event"] == "model_object_rejected"
        )
        assert models.current().resolve("broken") is None
        assert targets(models.current(), "food-review") == {"v2": 100}, "others keep serving"
    api.close()  # type: ignore[no-untyped-call]
