"""A tiny Kubernetes API server with real optimistic concurrency, for what kmock cannot do.

kmock keeps no resourceVersions and never answers 409 Conflict; nor can one of its
reactions stand in for a conflict, since it applies every write before a reaction answers
(a "409" reaction would refuse a write that has in fact landed). This server speaks just
enough of the API for the backend's writes and the leader election, honestly:

- GET of an object, or of a collection (a list, for the informers); a watch stays open
  and quiet until its timeoutSeconds;
- POST creates (409 AlreadyExists when the name is taken);
- PATCH is a JSON merge patch (RFC 7386) of the object or of its status subresource; a
  metadata.resourceVersion in it is a precondition: not the stored one, 409 Conflict.

Every stored change gets a new resourceVersion. `meddle` queues changes by another
writer, each landing just before one of the next PATCHes: the race a conflict is about.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from loractl.kube import MERGE_PATCH

STATUS = "/status"
Change = Callable[[dict[str, Any]], None]


class StrictApi:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}  # object path → object
        self.requests: list[tuple[str, str]] = []  # (method, path), in order
        self.patches: list[tuple[str, int, bool]] = []  # (path, status, had a precondition)
        self._meddlers: list[Change] = []
        self._version = 0
        self._runner: web.AppRunner | None = None
        self.url = ""  # once started

    async def start(self) -> None:
        """Serves on a free port of 127.0.0.1, at self.url."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        # Cancelled on disconnect: a watch the client dropped must not hold the shutdown.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add(self, path: str, obj: dict[str, Any]) -> None:
        """Stores an object at its path (collection/name) with a fresh resourceVersion."""
        stored = copy.deepcopy(obj)
        stored.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        self.objects[path] = stored
        self._bump(stored)

    def meddle(self, change: Change, times: int = 1) -> None:
        """Another writer changes the object just before each of the next `times` PATCHes."""
        self._meddlers.extend([change] * times)

    def conflicts(self) -> int:
        return sum(1 for _, status, _ in self.patches if status == 409)

    def _bump(self, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.method == "GET" and request.query.get("watch") in ("true", "1"):
            return await _quiet_watch(request)
        if request.method == "GET":
            return self._get(request.path)
        if request.method == "POST":
            return self._create(request.path, await request.json())
        if request.method == "PATCH":
            patch = await request.json()
            conditional = "resourceVersion" in (patch.get("metadata") or {})
            response = self._patch(request.path, request.content_type, patch)
            self.patches.append((request.path, response.status, conditional))
            return response
        return _status(405, "MethodNotAllowed", f"{request.method} is not served here")

    def _get(self, path: str) -> web.Response:
        if _is_collection(path):
            items = [obj for key, obj in self.objects.items() if key.rsplit("/", 1)[0] == path]
            metadata = {"resourceVersion": str(self._version)}
            return web.json_response({"kind": "List", "metadata": metadata, "items": items})
        if path not in self.objects:
            return _status(404, "NotFound", f"{path} not found")
        return web.json_response(self.objects[path])

    def _create(self, collection: str, body: dict[str, Any]) -> web.Response:
        path = f"{collection}/{body['metadata']['name']}"
        if path in self.objects:
            return _status(409, "AlreadyExists", f"{path} already exists")
        self.add(path, body)
        return web.json_response(self.objects[path], status=201)

    def _patch(self, path: str, content_type: str, body: dict[str, Any]) -> web.Response:
        status_only = path.endswith(STATUS)
        path = path.removesuffix(STATUS)
        if path not in self.objects:
            return _status(404, "NotFound", f"{path} not found")
        if content_type != MERGE_PATCH:
            return _status(415, "UnsupportedMediaType", f"{content_type} is not served here")
        stored = self.objects[path]
        if self._meddlers:
            self._meddlers.pop(0)(stored)
            self._bump(stored)
        expected = (body.pop("metadata", None) or {}).get("resourceVersion")
        if expected is not None and expected != stored["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f"the object has been modified: {path}")
        # The status subresource takes only the status; the object itself, all but it.
        if status_only:
            change = {"status": body.get("status")}
        else:
            change = {key: value for key, value in body.items() if key != "status"}
        self.objects[path] = merged(stored, change)
        self._bump(self.objects[path])
        return web.json_response(self.objects[path])


def merged(target: Any, patch: Any) -> Any:
    """RFC 7386: a dict merges key by key, None deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(result.get(key), value)
    return result


def _is_collection(path: str) -> bool:
    # /api/v1/namespaces/ns/plural or /apis/group/version/namespaces/ns/plural
    parts = path.strip("/").split("/")
    return len(parts) == (5 if parts[0] == "api" else 6)


async def _quiet_watch(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_type = "application/json"
    await response.prepare(request)
    await asyncio.sleep(float(request.query.get("timeoutSeconds", "30")))
    return response


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason,
            "message": message, "code": code}  # fmt: skip
    return web.json_response(body, status=code)
