"""The sidecar's own HTTP endpoints: probes, status and metrics."""

from __future__ import annotations

from aiohttp import web

from sidecar.reconciler import Reconciler

RECONCILER = web.AppKey("reconciler", Reconciler)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[RECONCILER].readiness()
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECONCILER].status())


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[RECONCILER].metrics.render(), content_type="text/plain")


def build_app(reconciler: Reconciler) -> web.Application:
    app = web.Application()
    app[RECONCILER] = reconciler
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app
