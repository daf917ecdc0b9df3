"""The endpoint picker's gRPC face: Envoy's ext_proc protocol around a `Router` (DESIGN §3).

Envoy opens one `Process` stream per HTTP request: request headers, then the body (one
message when BUFFERED, chunks when STREAMED), then, once the upstream answered, the response
headers. Every message gets exactly one answer, in order; the picker decides once the whole
body is in. The destination goes out as the `x-gateway-destination-endpoint` header and as
`envoy.lb` dynamic metadata; a refusal goes out as an immediate JSON error.

How each routed request ended (status, latency) reaches the router through `Outcomes`: from
the response headers when the gateway sends them on the stream, or from Envoy's gRPC access
log (`access_log`), which the same server receives; the route id that ties an access log
entry to its request goes out as dynamic metadata beside the destination.

Where the routing header can still change the destination depends on the body mode Envoy
announces on the stream (`protocol_config`):

- BUFFERED: Envoy holds the request headers until the body is answered, so the routing header
  (and the content-length of a rewritten body) rides on the body answer.
- STREAMED with `send_body_without_waiting_for_header_response` (what `envoy_config` writes),
  and FULL_DUPLEX_STREAMED: Envoy sends the chunks without waiting for the headers answer, so
  the picker holds that answer back until the last chunk, then routes on it.
- Plain STREAMED: Envoy forwards the headers as soon as they are answered, before any body;
  routing on the body cannot work there, which is logged once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from controller.extproc.access_log import ROUTE_ID_KEY, ROUTE_NAMESPACE, AccessLogReceiver
from controller.extproc.outcomes import DEFAULT_GRACE_S, Outcomes
from controller.extproc.router import Reject, Route, Router

log = structlog.get_logger("picker")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# Room for the headers and protobuf framing around the largest body Envoy may send us.
_MESSAGE_OVERHEAD_BYTES = 1024 * 1024
# Full-duplex bodies go back in pieces this size, well under Envoy's default buffer limits.
_STREAMED_PIECE_BYTES = 64 * 1024

_Mode = processing_mode_pb2.ProcessingMode
_APPLICATION_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
)

# Answers that carry nothing are the same every time: build them once (the hot path).
_CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CLEAR_REQUEST_BODY = pb.ProcessingResponse(
    request_body=pb.BodyResponse(
        response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True))
    )
)
_CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class _Phase(Enum):
    IDLE = auto()  # nothing seen yet
    BODY = auto()  # request headers seen, waiting for (the rest of) the body
    ROUTED = auto()  # decision sent, waiting for the response headers
    DONE = auto()  # rejected, or the response headers went by


@dataclass(frozen=True)
class _BodyMode:
    """What Envoy announced (first message) about how it sends bodies on this stream."""

    whole: bool = False  # BUFFERED(_PARTIAL): one message is all of the body the picker gets
    hold_headers: bool = False  # body comes without waiting for the headers answer: hold it
    full_duplex: bool = False  # FULL_DUPLEX_STREAMED: the body goes back as streamed pieces
    response_full_duplex: bool = False


_UNANNOUNCED = _BodyMode()
_warned_streamed_too_late = False


def _body_mode(config: pb.ProtocolConfiguration) -> _BodyMode:
    global _warned_streamed_too_late
    mode = config.request_body_mode
    held = mode == _Mode.FULL_DUPLEX_STREAMED or (
        mode == _Mode.STREAMED and config.send_body_without_waiting_for_header_response
    )
    if mode == _Mode.STREAMED and not held and not _warned_streamed_too_late:
        _warned_streamed_too_late = True
        log.warning(
            "picker_streamed_mode_cannot_route_on_body",
            reason="Envoy forwards the headers before the body arrives",
            fix="set send_body_without_waiting_for_header_response, or use BUFFERED",
        )
    return _BodyMode(
        whole=mode in (_Mode.BUFFERED, _Mode.BUFFERED_PARTIAL),
        hold_headers=held,
        full_duplex=mode == _Mode.FULL_DUPLEX_STREAMED,
        response_full_duplex=config.response_body_mode == _Mode.FULL_DUPLEX_STREAMED,
    )


def _headers_dict(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    headers: dict[str, str] = {}
    for header in header_map.headers:
        # Envoy fills raw_value (bytes); other gateways may still fill the older string field.
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        key = header.key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _subset_hint(metadata: base_pb2.Metadata) -> list[str] | None:
    """The gateway's subset hint: a list of "ip:port" strings, or one comma-joined string."""
    if SUBSET_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [item.string_value for item in value.list_value.values]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        # The protocol says "pick only from the hint": an unreadable hint allows nothing.
        log.warning("picker_subset_hint_unreadable", kind=kind)
        items = []
    return [item.strip() for item in items if item.strip()]


def _set_header(key: str, value: str, *, append: bool = False) -> base_pb2.HeaderValueOption:
    # Envoy's ext_proc (1.40) reads the deprecated `append` flag and ignores `append_action`:
    # an APPEND_IF_EXISTS_OR_ADD action still overwrites.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append=wrappers_pb2.BoolValue(value=append),
    )


def _destination_headers(endpoints: list[str]) -> list[base_pb2.HeaderValueOption]:
    """One header line per endpoint, best first: `a,b` in HTTP terms (RFC 9110 §5.3).

    Envoy's ORIGINAL_DST cluster parses the first header value as one address, so a single
    comma-joined value would leave it no destination at all (503 "no healthy upstream").
    """
    first, *fallbacks = endpoints
    return [
        _set_header(DESTINATION_HEADER, first),
        *(_set_header(DESTINATION_HEADER, endpoint, append=True) for endpoint in fallbacks),
    ]


def _routing(endpoints: list[str], new_body: bytes | None) -> pb.CommonResponse:
    """The header mutation that routes, with the content-length of a rewritten body."""
    set_headers = _destination_headers(endpoints)
    if new_body is not None:
        set_headers.append(_set_header("content-length", str(len(new_body))))
    return pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=set_headers),
        clear_route_cache=True,  # the route may depend on the header that just appeared
    )


def _route_metadata(endpoints: list[str], route_id: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    destination = metadata.fields[DESTINATION_NAMESPACE].struct_value
    destination.fields[DESTINATION_HEADER].string_value = ",".join(endpoints)
    metadata.fields[ROUTE_NAMESPACE].struct_value.fields[ROUTE_ID_KEY].string_value = route_id
    return metadata


def _headers_answer(
    endpoints: list[str], new_body: bytes | None, route_id: str
) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=_routing(endpoints, new_body)),
        dynamic_metadata=_route_metadata(endpoints, route_id),
    )


def routing_body_answer(
    endpoints: list[str], new_body: bytes | None, route_id: str
) -> pb.ProcessingResponse:
    """The answer to a buffered body that sends the request to `endpoints[0]` (the rest are
    fallbacks), with the rewritten body if any; public so a benchmark answers Envoy exactly so.
    """
    common = _routing(endpoints, new_body)
    if new_body is not None:
        common.body_mutation.body = new_body
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common),
        dynamic_metadata=_route_metadata(endpoints, route_id),
    )


def _replace_body(new_body: bytes) -> pb.ProcessingResponse:
    mutation = pb.BodyMutation(body=new_body)
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    )


def _streamed_piece(data: bytes, end_of_stream: bool) -> pb.CommonResponse:
    streamed = pb.StreamedBodyResponse(body=data, end_of_stream=end_of_stream)
    return pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=streamed))


def _streamed_body(body: bytes) -> list[pb.ProcessingResponse]:
    """A full-duplex body goes back as pieces, the last one marked end_of_stream."""
    starts = range(0, max(len(body), 1), _STREAMED_PIECE_BYTES)
    return [
        pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=_streamed_piece(
                    body[start : start + _STREAMED_PIECE_BYTES],
                    end_of_stream=start + _STREAMED_PIECE_BYTES >= len(body),
                )
            )
        )
        for start in starts
    ]


def _immediate(reject: Reject) -> pb.ProcessingResponse:
    body = {
        "error": {
            "message": reject.message,
            "type": reject.error_type,
            "param": None,
            "code": reject.status,
        }
    }
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reject.status),
            headers=pb.HeaderMutation(set_headers=[_APPLICATION_JSON]),
            body=json.dumps(body).encode(),
            details="endpoint_picker_rejected",  # shows up as %RESPONSE_CODE_DETAILS%
        )
    )


def _status(headers: base_pb2.HeaderMap) -> int:
    for header in headers.headers:
        if header.key == ":status":
            raw = header.raw_value.decode() if header.raw_value else header.value
            return int(raw) if raw.isdigit() else 0
    return 0


class _Exchange:
    """One HTTP request's walk through an ext_proc stream: every message in, answers out.

    Body chunks are answered only once the body is complete (answers just have to come back
    in order): a rewritten body then replaces the last chunk and empties the others, so the
    upstream gets the new body whole whichever way Envoy cut the original.
    """

    def __init__(self, router: Router, outcomes: Outcomes, max_body_bytes: int) -> None:
        self._router = router
        self._outcomes = outcomes
        self._max_body_bytes = max_body_bytes
        self._mode = _UNANNOUNCED
        self._phase = _Phase.IDLE
        self._started = 0.0
        self._headers: dict[str, str] = {}
        self._subset: list[str] | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._route_id = ""

    def handle(self, request: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if request.HasField("protocol_config"):  # Envoy sends it on the first message only
            self._mode = _body_mode(request.protocol_config)
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return self._on_request_headers(request)
        if kind == "request_body":
            return self._on_request_body(request.request_body)
        if kind == "response_headers":
            return self._on_response_headers(request.response_headers)
        if kind == "request_trailers":
            return self._on_request_trailers()
        if kind == "response_body":
            return [self._response_body_answer(request.response_body)]
        if kind == "response_trailers":
            return [_CONTINUE_RESPONSE_TRAILERS]
        log.warning("picker_empty_message")
        return []

    def close(self) -> None:
        """The stream ended: a routed request without response headers waits for the log."""
        if self._phase is _Phase.BODY:
            log.info("picker_stream_closed_before_body_end", received_bytes=self._size)
        elif self._phase is _Phase.ROUTED:
            self._outcomes.unanswered(self._route_id)
        self._phase = _Phase.DONE

    def _on_request_headers(self, request: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if self._phase is not _Phase.IDLE:
            log.warning("picker_request_headers_again", phase=self._phase.name)
            self.close()
            self._chunks, self._size = [], 0
        self._started = time.monotonic()
        self._headers = _headers_dict(request.request_headers.headers)
        self._subset = _subset_hint(request.metadata_context)
        if request.request_headers.end_of_stream:  # no body (GET): decide on the headers
            return self._decide_without_body()
        self._phase = _Phase.BODY
        return [] if self._mode.hold_headers else [_CONTINUE_REQUEST_HEADERS]

    def _on_request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self._phase is not _Phase.BODY:
            log.warning("picker_unexpected_request_body", phase=self._phase.name)
            return [_CONTINUE_REQUEST_BODY]
        self._size += len(body.body)
        if self._size > self._max_body_bytes:
            self._phase = _Phase.DONE
            return [self._reject_too_large()]
        self._chunks.append(body.body)
        # A buffered body comes in one message; end_of_stream is false when trailers follow.
        if body.end_of_stream or self._mode.whole:
            return self._decide_on_body()
        return []

    def _on_request_trailers(self) -> list[pb.ProcessingResponse]:
        # Trailers end a body whose last chunk did not say end_of_stream.
        answers = self._decide_on_body() if self._phase is _Phase.BODY else []
        return [*answers, _CONTINUE_REQUEST_TRAILERS]

    def _on_response_headers(self, headers: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        if self._phase is _Phase.ROUTED:
            elapsed = time.monotonic() - self._started
            status = _status(headers.headers)
            self._outcomes.answered(self._route_id, status, elapsed, "response_headers")
        self._phase = _Phase.DONE
        return [_CONTINUE_RESPONSE_HEADERS]

    def _response_body_answer(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        """Only a gateway configured to send response bodies gets here: pass them on as is."""
        if not self._mode.response_full_duplex:
            return _CONTINUE_RESPONSE_BODY
        return pb.ProcessingResponse(
            response_body=pb.BodyResponse(response=_streamed_piece(body.body, body.end_of_stream))
        )

    def _reject_too_large(self) -> pb.ProcessingResponse:
        log.info("picker_body_too_large", limit=self._max_body_bytes)
        message = f"Request body is larger than {self._max_body_bytes} bytes."
        return _immediate(Reject(413, message, "BadRequestError"))

    def _ask_router(self, body: bytes) -> Route | Reject:
        try:
            decision = self._router.route(self._headers, body, self._subset)
        except Exception:
            log.exception("picker_router_failed", path=self._headers.get(":path"))
            return Reject(500, "The endpoint picker failed.", "InternalServerError")
        if isinstance(decision, Route) and not decision.endpoints:
            log.error("picker_route_without_endpoints")
            return Reject(503, "No endpoint to serve the request.", "ServiceUnavailableError")
        return decision

    def _decide_without_body(self) -> list[pb.ProcessingResponse]:
        decision = self._ask_router(b"")
        if isinstance(decision, Reject):
            self._phase = _Phase.DONE
            return [_immediate(decision)]
        self._accept(decision)
        return [_headers_answer(decision.endpoints, None, self._route_id)]

    def _decide_on_body(self) -> list[pb.ProcessingResponse]:
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        decision = self._ask_router(body)
        if isinstance(decision, Reject):
            self._phase = _Phase.DONE
            return [_immediate(decision)]
        self._accept(decision)
        endpoints, route_id = decision.endpoints, self._route_id
        if self._mode.full_duplex:
            new_body = body if decision.body is None else decision.body
            headers = _headers_answer(endpoints, decision.body, route_id)
            return [headers, *_streamed_body(new_body)]
        earlier = self._earlier_chunk_answers(decision.body)
        if self._mode.hold_headers:
            last = _CONTINUE_REQUEST_BODY if decision.body is None else _replace_body(decision.body)
            return [_headers_answer(endpoints, decision.body, route_id), *earlier, last]
        # The headers are still held by Envoy (BUFFERED): route on the last body answer.
        return [*earlier, routing_body_answer(endpoints, decision.body, route_id)]

    def _earlier_chunk_answers(self, new_body: bytes | None) -> list[pb.ProcessingResponse]:
        """Answers to all chunks but the last: emptied when the last one carries a new body."""
        filler = _CONTINUE_REQUEST_BODY if new_body is None else _CLEAR_REQUEST_BODY
        return [filler] * (len(self._chunks) - 1)

    def _accept(self, route: Route) -> None:
        self._phase = _Phase.ROUTED
        self._route_id = self._outcomes.open(route.context, self._started)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ext_proc servicer; `serve_picker` mounts it, tests may mount it elsewhere."""

    def __init__(
        self,
        router: Router,
        outcomes: Outcomes,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._router = router
        self._outcomes = outcomes
        self._max_body_bytes = max_body_bytes

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = _Exchange(self._router, self._outcomes, self._max_body_bytes)
        try:
            async for request in request_iterator:
                try:
                    answers = exchange.handle(request)
                except Exception:
                    # A bug of ours must cost one request, never the server: end this stream.
                    log.exception("picker_message_failed")
                    return
                for answer in answers:
                    yield answer
        finally:
            exchange.close()


@dataclass
class PickerServer:
    """A running picker: the ports it got (useful when 0 was asked for), and `stop`."""

    port: int
    health_port: int
    outcomes: Outcomes
    _servers: list[grpc.aio.Server]
    _health: health_aio.HealthServicer
    _expiry: asyncio.Task[None]

    async def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING, then let streams in flight finish for up to `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        self._expiry.cancel()


async def _expire_outcomes(outcomes: Outcomes, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        outcomes.expire()


def _server(max_message_bytes: int) -> grpc.aio.Server:
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC shares a port with any other process that set SO_REUSEPORT: a second
            # picker (or a stale one) would silently get half of the streams. Fail instead.
            ("grpc.so_reuseport", 0),
        ]
    )


class PortUnavailable(RuntimeError):
    """gRPC could not listen on `address`; it does not say why, so `reason` lists the causes."""

    reason = "in use, or not an address of this machine"

    def __init__(self, address: str, port: int) -> None:
        super().__init__(f"cannot listen on {address}: {self.reason}")
        self.address = address
        self.port = port


def _bind(server: grpc.aio.Server, host: str, port: int, tls: tuple[Path, Path] | None) -> int:
    address = f"{host}:{port}"
    try:
        if tls is None:
            return server.add_insecure_port(address)
        cert_path, key_path = tls
        key_and_cert = (key_path.read_bytes(), cert_path.read_bytes())
        return server.add_secure_port(address, grpc.ssl_server_credentials([key_and_cert]))
    except RuntimeError as exc:  # gRPC says no more than "Failed to bind"
        raise PortUnavailable(address, port) from exc


async def serve_picker(
    router: Router,
    host: str,
    port: int,
    health_port: int,
    tls: tuple[str | Path, str | Path] | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    outcome_grace_s: float = DEFAULT_GRACE_S,
) -> PickerServer:
    """Start the ext_proc server (with gRPC health and the access log service) on `port` and
    gRPC health on `health_port`.

    Port 0 picks a free port (see the returned `PickerServer`). `tls` is (cert, key) PEM files
    for the ext_proc port; the health port stays plaintext because kubelet gRPC probes cannot
    speak TLS. A `health_port` equal to a non-zero `port` serves health there only. A routed
    request whose stream closed without response headers is reported with status 0 unless
    the access log tells its outcome within `outcome_grace_s`.
    """
    health = health_aio.HealthServicer()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)

    outcomes = Outcomes(router.on_response, grace_s=outcome_grace_s)
    main = _server(max_body_bytes + _MESSAGE_OVERHEAD_BYTES)
    processor = ExternalProcessor(router, outcomes, max_body_bytes)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, main)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(outcomes), main)
    health_pb2_grpc.add_HealthServicer_to_server(health, main)
    tls_paths = None if tls is None else (Path(tls[0]), Path(tls[1]))
    bound_port = _bind(main, host, port, tls_paths)
    servers = [main]
    bound_health_port = bound_port
    shares_port = health_port == port != 0
    if not shares_port:
        health_only = _server(_MESSAGE_OVERHEAD_BYTES)
        health_pb2_grpc.add_HealthServicer_to_server(health, health_only)
        bound_health_port = _bind(health_only, host, health_port, None)
        servers.append(health_only)
    for server in servers:
        await server.start()
    log.info(
        "picker_listening",
        host=host,
        port=bound_port,
        health_port=bound_health_port,
        tls=tls is not None,
    )
    expiry = asyncio.create_task(
        _expire_outcomes(outcomes, min(1.0, outcome_grace_s / 2)), name="picker outcomes"
    )
    return PickerServer(bound_port, bound_health_port, outcomes, servers, health, expiry)
