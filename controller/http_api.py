"""The controller's HTTP side: Prometheus metrics, probes, and the inventory as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from controller.inventory import EndpointView, Inventory
from controller.stats import TrafficStats


@dataclass
class HttpState:
    registry: CollectorRegistry
    inventory: Inventory
    stats: TrafficStats


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


def build_app(state: HttpState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/inventory", inventory)
    return app
