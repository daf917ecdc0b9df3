"""What the ext_proc server asks of the routing logic, and what it gets back.

The server owns the Envoy protocol; a `Router` owns every decision. Keeping the seam this
narrow lets the protocol layer be tested with tiny routers and the routing logic without gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Route:
    endpoints: list[str]  # "ip:port", best first; the rest are fallbacks
    body: bytes | None = None  # replacement request body (model rewritten); None = unchanged
    context: object = None  # handed back to on_response


@dataclass(frozen=True)
class Reject:
    status: int  # 400, 404, 413, 429, 503 ...
    message: str
    error_type: str  # OpenAI/vLLM style, e.g. "BadRequestError"


class Router(Protocol):
    def route(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject: ...

    def on_response(self, context: object, status: int, elapsed_seconds: float) -> None: ...
