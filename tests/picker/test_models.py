"""Model resolution from InferenceModel / InferenceModelRewrite objects."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from controller.models import (
    STICKY_HEADER_ANNOTATION,
    ModelConfigError,
    ModelTable,
    routes_from_object,
)
from controller.scheduling.types import Criticality


def inference_model(name: str, targets: list[dict[str, Any]] | None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"modelName": name, "poolRef": {"name": "pool"}, **spec}
    if targets is not None:
        body["targetModels"] = targets
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "ns"}, "spec": body}


def rewrite(model: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "InferenceModelRewrite",
        "metadata": {"name": f"{model}-rw", "namespace": "ns"},
        "spec": {
            "poolRef": {"name": "pool"},
            "rules": [
                {"matches": [{"model": {"type": "Exact", "value": model}}], "targets": targets}
            ],
        },
    }


def test_weights_split_traffic() -> None:
    table = ModelTable.from_objects(
        [
            inference_model(
                "food-review", [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]
            )
        ]
    )
    assert table.errors == ()
    route = table.resolve("food-review")
    assert route is not None
    rng = random.Random(1)
    counts = Counter(route.choose(None, rng) for _ in range(10_000))
    assert 0.88 < counts["v1"] / 10_000 < 0.92


def test_sticky_key_keeps_a_user_on_one_target_and_only_moves_users_forward() -> None:
    def table(weight_v2: int) -> ModelTable:
        targets = [{"name": "v1", "weight": 100 - weight_v2}, {"name": "v2", "weight": weight_v2}]
        return ModelTable.from_objects([inference_model("m", targets)])

    rng = random.Random(0)
    users = [f"user-{i}" for i in range(2000)]
    at_10 = {u: table(10).resolve("m").choose(u, rng) for u in users}  # type: ignore[union-attr]
    again = {u: table(10).resolve("m").choose(u, rng) for u in users}  # type: ignore[union-attr]
    at_50 = {u: table(50).resolve("m").choose(u, rng) for u in users}  # type: ignore[union-attr]
    assert at_10 == again
    assert 0.07 < sum(t == "v2" for t in at_10.values()) / len(users) < 0.13
    assert all(at_50[u] == "v2" for u in users if at_10[u] == "v2"), "no one flips back"


def test_rewrite_rules_and_criticality() -> None:
    table = ModelTable.from_objects(
        [
            rewrite("chat", [{"modelRewrite": "chat-v3", "weight": 1}]),
            inference_model("batch", None, criticality="Sheddable"),
        ]
    )
    chat, batch = table.resolve("chat"), table.resolve("batch")
    assert chat is not None
    assert batch is not None
    assert chat.choose(None, random.Random()) == "chat-v3"
    assert batch.targets[0].name == "batch", "no targetModels: the model serves itself"
    assert batch.criticality is Criticality.SHEDDABLE


def test_pool_filter_and_bad_objects_reported_not_fatal() -> None:
    other_pool = inference_model("elsewhere", None)
    other_pool["spec"]["poolRef"]["name"] = "other"
    bad = inference_model("bad", [{"name": "a", "weight": 1}, {"name": "b"}])
    table = ModelTable.from_objects([inference_model("ok", None), other_pool, bad], pool="pool")
    assert [r.model for r in table.routes()] == ["ok"]
    assert len(table.errors) == 1
    assert "InferenceModel/ns/bad" in table.errors[0]
    assert "weight on every target or on none" in table.errors[0]


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (inference_model("", None), "spec.modelName is required"),
        (rewrite("m", []), "must be a non-empty list"),
        (inference_model("m", [{"name": "a", "weight": -1}]), "must be 0..1000000"),
        (inference_model("m", [{"name": "a", "weight": 0}]), "add up to 0"),
        (
            inference_model("m", None, criticality="Urgent"),
            "is not one of Critical, Standard, Sheddable",
        ),
        ({"kind": "Deployment", "metadata": {}, "spec": {}}, "kind must be"),
        ({"kind": "InferenceModel", "metadata": {}}, "no spec"),
    ],
)
def test_invalid_objects_name_the_problem(obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        list(routes_from_object(obj))
    assert fragment in str(caught.value)


def test_zero_weight_targets_get_no_traffic() -> None:
    table = ModelTable.from_objects(
        [inference_model("m", [{"name": "v1", "weight": 100}, {"name": "v2", "weight": 0}])]
    )
    route = table.resolve("m")
    assert route is not None
    assert {route.choose(str(i), random.Random()) for i in range(200)} == {"v1"}


def annotated(obj: dict[str, Any], header: Any) -> dict[str, Any]:
    obj["metadata"]["annotations"] = {STICKY_HEADER_ANNOTATION: header}
    return obj


def test_a_sticky_header_annotation_applies_to_every_model_of_its_object() -> None:
    table = ModelTable.from_objects(
        [
            annotated(inference_model("food", None), "X-User-Id"),
            annotated(rewrite("chat", [{"modelRewrite": "chat-v3"}]), "x-session"),
            inference_model("plain", None),
        ]
    )
    assert table.errors == ()
    headers = {route.model: route.sticky_header for route in table.routes()}
    assert headers == {"food": "x-user-id", "chat": "x-session", "plain": None}


@pytest.mark.parametrize("header", ["", "x user", 7])
def test_a_bad_sticky_header_annotation_is_reported_and_the_model_still_routes(
    header: Any,
) -> None:
    table = ModelTable.from_objects([annotated(inference_model("food", None), header)])
    route = table.resolve("food")
    assert route is not None, "a bad annotation must not take the model's traffic away"
    assert route.sticky_header is None
    [error] = table.errors
    assert error.startswith(f"InferenceModel/ns/food: annotation {STICKY_HEADER_ANNOTATION} ")
