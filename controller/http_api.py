"""The controller's HTTP side: Prometheus metrics, probes, and as JSON the inventory and
the model table the picker routes by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from controller.inventory import EndpointView, Inventory
from controller.models import ModelRoute, ModelTable
from controller.stats import TrafficStats


@dataclass
class HttpState:
    registry: CollectorRegistry
    inventory: Inventory
    stats: TrafficStats
    models: Callable[[], ModelTable]
    models_synced: Callable[[], bool]


STATE = web.AppKey("state", HttpState)


def view_json(view: EndpointView) -> dict[str, Any]:
    metrics = view.metrics
    return {
        "address": view.address,
        "pod": view.endpoint.pod,
        "ready": view.endpoint.ready,
        "metrics": None
        if metrics is None
        else {
            "running": metrics.running,
            "waiting": metrics.waiting,
            "kv_cache_usage": metrics.kv_cache_usage,
            "max_lora": metrics.max_lora,
            "running_adapters": sorted(metrics.running_adapters),
            "waiting_adapters": sorted(metrics.waiting_adapters),
        },
        "registered": None if view.registered is None else sorted(view.registered),
        "sidecar": view.sidecar_states,
    }


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, content_type="text/plain")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def inventory(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "endpoints": [view_json(v) for v in state.inventory.snapshot()],
            "errors": state.inventory.errors(),
        }
    )


def route_json(route: ModelRoute) -> dict[str, Any]:
    return {
        "model": route.model,
        "targets": [{"name": t.name, "weight": t.weight} for t in route.targets],
        "criticality": route.criticality.value,
        "pool": route.pool,
        "sticky_header": route.sticky_header,
        "source": route.source,
    }


async def models(request: web.Request) -> web.Response:
    """What the picker resolves each model name to: debug a split or a sticky header here."""
    state = request.app[STATE]
    table = state.models()
    routes = sorted(table.routes(), key=lambda route: route.model)
    return web.json_response(
        {
            "synced": state.models_synced(),
            "models": [route_json(route) for route in routes],
            "errors": list(table.errors),
        }
    )


def build_app(state: HttpState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/inventory", inventory)
    app.router.add_get("/models", models)
    return app
