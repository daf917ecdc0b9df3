"""The picker's policy in-process (no sockets): what each request gets before scheduling."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from controller.extproc.router import Reject, Route
from controller.inventory import Endpoint, Inventory
from controller.models import ModelTable
from controller.picker import EndpointPicker, PickerSettings
from controller.picker_metrics import PickerMetrics
from controller.scheduling.profile import load_profile
from controller.stats import TrafficStats
from tests.support.gateway import inference_model


def picker(synced: bool, passthrough: bool = False) -> EndpointPicker:
    inventory = Inventory()
    inventory.set_endpoints([Endpoint("10.0.0.1:8000")])
    table = ModelTable.from_objects([inference_model("m", {"v1": 100})])
    return EndpointPicker(
        inventory,
        load_profile(),
        lambda: table,
        lambda: synced,
        PickerSettings(passthrough=passthrough),
        TrafficStats(),
        PickerMetrics(CollectorRegistry(), inventory),
    )


def body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "hi"}).encode()


def test_unknown_models_are_503_until_the_models_are_read_then_404() -> None:
    starting = picker(synced=False).route({}, body("nobody"), None)
    assert isinstance(starting, Reject)
    assert starting.status == 503
    assert "starting" in starting.message
    known = picker(synced=False).route({}, body("m"), None)
    assert isinstance(known, Route), "a model already known is served while starting"
    ready = picker(synced=True).route({}, body("nobody"), None)
    assert isinstance(ready, Reject)
    assert ready.status == 404


def test_passthrough_routes_unknown_models_as_they_are() -> None:
    routed = picker(synced=True, passthrough=True).route({}, body("anything"), None)
    assert isinstance(routed, Route)
    assert routed.body is None, "no rewrite: the target is the model itself"
    assert routed.endpoints == ["10.0.0.1:8000"]


def test_the_body_is_rewritten_to_the_target() -> None:
    routed = picker(synced=True).route({}, body("m"), None)
    assert isinstance(routed, Route)
    assert routed.body is not None
    assert json.loads(routed.body) == {"model": "v1", "prompt": "hi"}
