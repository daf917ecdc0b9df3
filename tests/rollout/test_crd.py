"""The AdapterRollout CRD: in step with the pydantic models, and every example valid in both.

Validating against the CRD's OpenAPI schema needs `jsonschema` (the test extra);
the structural comparison with the models needs nothing beyond pydantic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from controller.rollout import (
    GROUP,
    HISTORY_LIMIT,
    KIND,
    PLURAL,
    VERSION,
    RolloutSpec,
    RolloutStatus,
    parse_spec,
    validate_spec,
)
from controller.rollout.spec import DURATION_PATTERN
from tests.rollout.world import World, run_healthy, spec, summary
from tests.support.crd import json_schema

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
CRD_PATH = MANIFESTS / "crds" / f"{PLURAL}.{GROUP}.yaml"
CRD: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
OPENAPI: dict[str, Any] = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
_BOUNDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
)

Validate = Callable[[Any], list[str]]


def test_names_version_and_columns() -> None:
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (KIND, PLURAL, ["ar"])
    assert CRD["spec"]["scope"] == "Namespaced"
    [version] = CRD["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model",
        "From": ".spec.from.id",
        "To": ".spec.to.id",
        "Phase": ".status.phase",
        "Step": ".status.currentStep",
        "Weight(to)": ".status.toWeight",
        "Age": ".metadata.creationTimestamp",
    }


def test_spec_schema_matches_the_model() -> None:
    _compare("spec", _model_schema(RolloutSpec), _crd_node(OPENAPI["properties"]["spec"]), True)


def test_status_schema_matches_the_model() -> None:
    status = OPENAPI["properties"]["status"]
    _compare("status", _model_schema(RolloutStatus), _crd_node(status), False)
    assert status["properties"]["history"]["maxItems"] == HISTORY_LIMIT


def test_durations_have_one_pattern() -> None:
    spec_schema = OPENAPI["properties"]["spec"]["properties"]
    patterns = {
        spec_schema["steps"]["items"]["properties"]["pause"]["pattern"],
        spec_schema["gates"]["properties"]["minRequestsTimeout"]["pattern"],
        spec_schema["gates"]["properties"]["loadTimeout"]["pattern"],
    }
    assert patterns == {DURATION_PATTERN}


def _examples() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == KIND:
                yield str(path.relative_to(MANIFESTS)), document


EXAMPLES = list(_examples())


def test_there_is_an_example() -> None:
    assert "controller/example-rollout.yaml" in [name for name, _ in EXAMPLES]


@pytest.mark.parametrize("example", [doc for _, doc in EXAMPLES], ids=[n for n, _ in EXAMPLES])
def test_examples_are_valid_rollouts(example: dict[str, Any], crd_errors: Validate) -> None:
    assert example["apiVersion"] == f"{GROUP}/{VERSION}"
    assert validate_spec(parse_spec(example["spec"])) == []
    assert crd_errors(example) == []


def test_what_the_controller_writes_is_valid(crd_errors: Validate) -> None:
    statuses = run_healthy(World(), spec())
    aborting = World()
    status = RolloutStatus()
    for _ in range(3):
        aborting.pods_with_to = 3
        aborting.serve(canary=summary(100, errors=100))
        aborting.wait(minutes=5)
        status = aborting.tick(spec(), status).status
    assert status.phase == "Aborted"
    rollouts = [spec(), spec(stickiness={"header": "x-user"}, gates={"maxP95LatencyRatio": None})]
    for rollout in rollouts:
        for written in [*statuses, status]:
            document = _object(rollout.to_api(), written.to_api())
            assert crd_errors(document) == [], written


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("spec", "steps", 0, "weight"), 150, "150 is greater than the maximum of 100"),
        (("spec", "steps", 0, "pause"), "5 min", "does not match"),
        (("spec", "gates", "maxErrorRate"), 2, "2 is greater than the maximum of 1"),
        (("spec", "to", "id"), "-bad", "does not match"),
        (("spec", "stickiness"), {"header": "x user"}, "does not match"),
        (("status", "phase"), "Done", "'Done' is not one of"),
        (("status", "weights"), {"a": "x"}, "'x' is not of type 'integer'"),
    ],
)
def test_the_schema_rejects_what_the_models_reject(
    path: tuple[str | int, ...], value: Any, fragment: str, crd_errors: Validate
) -> None:
    document = _object(spec().to_api(), RolloutStatus().to_api())
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = crd_errors(document)
    assert any(fragment in error for error in errors), errors


@pytest.fixture
def crd_errors() -> Validate:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="the CRD schema checks need jsonschema (the test extra)"
    )
    schema = json_schema(OPENAPI)
    # Kubernetes' OpenAPI v3.0 schemas are Draft 4 (boolean exclusiveMinimum) plus `nullable`.
    jsonschema.Draft4Validator.check_schema(schema)
    validator = jsonschema.Draft4Validator(schema)

    def errors(document: Any) -> list[str]:
        return [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)
        ]

    return errors


def _object(spec_api: dict[str, Any], status_api: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "food-review-2"},
        "spec": spec_api,
        "status": status_api,
    }


# --- the structural comparison ----------------------------------------------------------


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return _model_node(schema, schema.get("$defs", {}))


def _model_node(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON Schema → {type, nullable, properties, ...} with refs inlined."""
    nullable = False
    options = node.get("anyOf")
    if options is not None:
        [node_type] = [o for o in options if o.get("type") != "null"]
        nullable = len(options) == 2
        node = node | node_type
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]] | {k: v for k, v in node.items() if k != "$ref"}
    result: dict[str, Any] = {"type": node.get("type"), "nullable": nullable}
    result |= {key: node[key] for key in (*_BOUNDS, "enum", "format") if key in node}
    if node.get("default") is not None:
        result["default"] = node["default"]
    if "properties" in node:
        result["properties"] = {k: _model_node(v, defs) for k, v in node["properties"].items()}
        result["required"] = set(node.get("required", []))
    if "items" in node:
        result["items"] = _model_node(node["items"], defs)
    if isinstance(node.get("additionalProperties"), dict):
        result["additionalProperties"] = _model_node(node["additionalProperties"], defs)
    return result


def _crd_node(node: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"type": node["type"], "nullable": node.get("nullable", False)}
    result |= {key: node[key] for key in (*_BOUNDS, "enum", "format", "default") if key in node}
    if node.get("exclusiveMinimum") is True:  # OpenAPI 3.0 spelling of JSON Schema's number
        result["exclusiveMinimum"] = result.pop("minimum")
    if "properties" in node:
        result["properties"] = {k: _crd_node(v) for k, v in node["properties"].items()}
        result["required"] = set(node.get("required", []))
    if "items" in node:
        result["items"] = _crd_node(node["items"])
    if "additionalProperties" in node:
        result["additionalProperties"] = _crd_node(node["additionalProperties"])
    return result


def _compare(path: str, model: dict[str, Any], crd: dict[str, Any], defaults: bool) -> None:
    assert (model["type"], model["nullable"]) == (crd["type"], crd["nullable"]), path
    for key in (*_BOUNDS, "enum", "format"):
        if key in model:  # the CRD may be stricter (patterns, lengths for CEL cost), never looser
            assert crd.get(key) == model[key], f"{path}: {key}"
    if defaults:
        _compare_default(path, model, crd)
    assert model.get("required") == crd.get("required"), path
    assert model.get("properties", {}).keys() == crd.get("properties", {}).keys(), path
    for name, child in model.get("properties", {}).items():
        _compare(f"{path}.{name}", child, crd["properties"][name], defaults)
    for key in ("items", "additionalProperties"):
        assert (key in model) == (key in crd), f"{path}: {key}"
        if key in model:
            _compare(f"{path}[]", model[key], crd[key], defaults)


def _compare_default(path: str, model: dict[str, Any], crd: dict[str, Any]) -> None:
    if crd.get("default") == {} and "properties" in crd:
        # `default: {}` lets the server fill in each child's default, as the model does.
        children = {k: v["default"] for k, v in crd["properties"].items() if "default" in v}
        assert model.get("default") == children, path
    else:
        assert model.get("default") == crd.get("default"), path


def test_the_example_runs_to_promotion() -> None:
    [example] = [doc for name, doc in EXAMPLES if name == "controller/example-rollout.yaml"]
    world = World()
    final = run_healthy(world, parse_spec(example["spec"]))[-1]
    assert final.phase == "Promoted"
    assert world.weights() == {"food-review-2": 100}
