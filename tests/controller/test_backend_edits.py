"""The document edits every backend applies: the adapter ConfigMap, the traffic split, and
the merge patch that replaces a status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.backend import NotFoundError
from controller.backend.base import edit_adapter_config, reweighted_spec, traffic_split
from controller.backend.kube import merge_patch
from controller.models import WeightedTarget
from sidecar.config import ConfigError, parse_config

UPSTREAM_CONFIGS = Path(__file__).parent.parent / "sidecar" / "upstream_configs"


def document(exist: list[dict[str, Any]] | None, not_exist: list[dict[str, Any]] | None) -> str:
    config: dict[str, Any] = {"name": "adapters"}
    if exist is not None:
        config["ensureExist"] = {"models": exist}
    if not_exist is not None:
        config["ensureNotExist"] = {"models": not_exist}
    return yaml.safe_dump({"vLLMLoRAConfig": config}, sort_keys=False)


def sections(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    config = yaml.safe_load(text)["vLLMLoRAConfig"]
    return (
        ((config.get("ensureExist") or {}).get("models") or []),
        ((config.get("ensureNotExist") or {}).get("models") or []),
    )


@pytest.mark.parametrize("name", sorted(p.name for p in UPSTREAM_CONFIGS.glob("*.yaml")))
def test_every_upstream_document_takes_an_edit_and_still_parses(name: str) -> None:
    text = (UPSTREAM_CONFIGS / name).read_text()
    edited = edit_adapter_config(text, {"canary-1": "org/canary"}, ())
    assert edited is not None
    assert "canary-1" in parse_config(edited).ensure_exist
    assert edit_adapter_config(edited, {"canary-1": "org/canary"}, ()) is None


def test_listing_an_id_of_ensure_not_exist_moves_it_back() -> None:
    text = document([], [{"id": "a", "source": "org/a", "base-model": "m"}])
    edited = edit_adapter_config(text, {"a": "org/a"}, ())
    assert edited is not None
    assert sections(edited) == ([{"id": "a", "source": "org/a"}], [])


def test_removing_moves_the_whole_entry_once() -> None:
    entry = {"id": "a", "source": "org/a", "base-model": "m", "pinned": True}
    edited = edit_adapter_config(document([entry], None), {}, {"a"})
    assert edited is not None
    assert sections(edited) == ([], [entry])
    assert edit_adapter_config(edited, {}, {"a"}) is None  # already there


def test_a_new_source_replaces_the_old_one_and_its_revision() -> None:
    text = document([{"id": "a", "source": "org/a", "revision": "v1", "x": 1}], None)
    edited = edit_adapter_config(text, {"a": "hf://org/a@v2"}, ())
    assert edited is not None
    assert sections(edited) == ([{"id": "a", "source": "hf://org/a@v2", "x": 1}], [])


def test_empty_sections_are_filled_and_unneeded_ones_not_added() -> None:
    text = "vLLMLoRAConfig:\n  ensureExist:\n"
    edited = edit_adapter_config(text, {"a": "org/a"}, ())
    assert edited is not None
    assert yaml.safe_load(edited) == {
        "vLLMLoRAConfig": {"ensureExist": {"models": [{"id": "a", "source": "org/a"}]}}
    }


def test_an_id_in_both_lists_is_mended_by_listing_it() -> None:
    # The upstream unit-test config has one: a per-adapter problem, not a broken document.
    text = document([{"id": "a", "source": "org/a"}], [{"id": "a", "source": "org/a"}])
    edited = edit_adapter_config(text, {"a": "org/a"}, ())
    assert edited is not None
    assert parse_config(edited).problems == {}


@pytest.mark.parametrize(
    ("listed", "removed", "error"),
    [
        ({"a": "org/a"}, {"a"}, "both listed and removed: a"),
        ({"a/b": "org/a"}, set(), "not a safe adapter name"),
        ({}, {".."}, "not a safe adapter name"),
        ({"a": "s3://bucket/a"}, set(), "adapter 'a'"),
    ],
)
def test_bad_ids_and_sources_are_refused(
    listed: dict[str, str], removed: set[str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        edit_adapter_config(document([], None), listed, removed)


@pytest.mark.parametrize("text", ["not: [yaml", "other: 1", "vLLMLoRAConfig: {port: 0}"])
def test_a_document_the_sidecars_reject_is_not_edited(text: str) -> None:
    with pytest.raises(ConfigError):
        edit_adapter_config(text, {"a": "org/a"}, ())


def inference_model(targets: list[dict[str, Any]] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": "m", "poolRef": {"name": "p"}}
    if targets is not None:
        spec["targetModels"] = targets
    return {"kind": "InferenceModel", "metadata": {"name": "im", "resourceVersion": "3"},
            "spec": spec}  # fmt: skip


def test_the_split_of_an_inference_model() -> None:
    split = traffic_split(inference_model([{"name": "a", "weight": 0}, {"name": "b"}]), "m")
    assert split is not None
    assert (split.ref.name, split.pool, split.resource_version) == ("im", "p", "3")
    assert split.targets == (WeightedTarget("a", 0), WeightedTarget("b", 1))
    assert traffic_split(inference_model(None), "m").weights() == {"m": 1}  # type: ignore[union-attr]
    assert traffic_split(inference_model(None), "other") is None


def test_weights_keep_the_order_and_other_keys_of_existing_targets() -> None:
    obj = inference_model([{"name": "a", "weight": 100, "note": "x"}, {"name": "b", "weight": 0}])
    assert reweighted_spec(obj, "m", {"c": 5, "b": 10, "a": 85}) == {
        "targetModels": [
            {"name": "a", "weight": 85, "note": "x"},
            {"name": "b", "weight": 10},
            {"name": "c", "weight": 5},
        ]
    }
    assert reweighted_spec(obj, "m", {"a": 100, "b": 0}) is None
    assert reweighted_spec(obj, "m", {"b": 1}) == {"targetModels": [{"name": "b", "weight": 1}]}
    with pytest.raises(NotFoundError, match="no longer routes model 'other'"):
        reweighted_spec(obj, "other", {"a": 1})


def test_the_first_matching_rule_of_a_rewrite_is_the_one() -> None:
    def rule(model: str, target: str) -> dict[str, Any]:
        return {"matches": [{"model": {"value": model}}],
                "targets": [{"modelRewrite": target, "weight": 1}]}  # fmt: skip

    rules = [rule("x", "x-1"), rule("m", "m-1"), rule("m", "m-shadowed")]
    obj = {"kind": "InferenceModelRewrite", "metadata": {"name": "rw"}, "spec": {"rules": rules}}
    split = traffic_split(obj, "m")
    assert split is not None
    assert split.weights() == {"m-1": 1}
    patch = reweighted_spec(obj, "m", {"m-2": 1})
    assert patch is not None
    assert [r["targets"][0]["modelRewrite"] for r in patch["rules"]] == ["x-1", "m-2", "m-shadowed"]
    assert rules[1]["targets"][0]["modelRewrite"] == "m-1"  # a copy was edited


@pytest.mark.parametrize(
    ("weights", "error"),
    [({}, "add up to 0"), ({"a": 0}, "add up to 0"), ({"a": 1_000_001}, "0..1000000"),
     ({"a": True}, "integer"), ({"": 1}, "needs a name")],
)  # fmt: skip
def test_bad_weights_are_refused(weights: dict[str, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        reweighted_spec(inference_model([{"name": "a", "weight": 1}]), "m", weights)


def test_a_merge_patch_turns_the_old_document_into_the_new_one() -> None:
    old = {"phase": "A", "gone": 1, "nested": {"keep": 1, "drop": 2}, "list": [1, 2]}
    new = {"phase": "B", "nested": {"keep": 1, "add": 3}, "list": [1], "absent": None}
    assert merge_patch(old, new) == {
        "phase": "B",
        "gone": None,
        "nested": {"drop": None, "add": 3},
        "list": [1],
    }
    assert merge_patch(new, new) == {}
    assert merge_patch({}, {"a": None}) == {}
