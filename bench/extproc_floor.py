"""The CPU floor of a Python ext_proc server: what one request costs before any routing.

Envoy opens one ext_proc stream per HTTP request and, with the picker's configuration
(BUFFERED body, response headers sent), exchanges three message pairs on it: request
headers, request body, response headers. This benchmark plays Envoy's part from a separate
process with the same message sequence and measures the server process's CPU per request
(from /proc) for servers that do less and less:

- picker: the real `ExternalProcessor` and `_Exchange` around a router that answers a
  constant route at once (the protocol layer: header map, body, answer building, the
  response report), no scheduling;
- bare: a servicer that answers every message with one prebuilt response (gRPC aio and
  protobuf alone);
- bare-2: the same with only two message pairs (request headers skipped, as a gateway
  configured with `request_header_mode: SKIP` would do).

Each is served by one process in its own grpc.aio server; the client keeps `--concurrency`
streams busy for `--duration` seconds after a warm-up, and alternates the servers over
`--rounds` rounds. Figures are medians over rounds. The picker's routing decision adds to
these (bench/pick_latency.py).

    python -m bench.extproc_floor [--concurrency 8] [--duration 4] [--rounds 3]

Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from multiprocessing.connection import Connection

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench.sim_throughput import busy_cpu_seconds, cpu_model, process_cpu_seconds
from controller.extproc.outcomes import Outcomes
from controller.extproc.router import Reject, Route
from controller.extproc.server import ExternalProcessor

SERVERS = ("picker", "bare", "bare-2")
BODY = b'{"model":"bench-adapter","prompt":"The soup was","max_tokens":5}'
ENDPOINTS = ["127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.4:8000"]


class ConstantRouter:
    """Routes every request to the same endpoints: the protocol layer without scheduling."""

    def route(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        return Route(ENDPOINTS, None, "bench")

    def on_response(self, context: object, status: int, elapsed_seconds: float) -> None:
        return None


class BareProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """One prebuilt answer per message: what gRPC aio costs with no work of ours."""

    _ANSWER = pb.ProcessingResponse(request_headers=pb.HeadersResponse())

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: object
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for _request in request_iterator:
            yield self._ANSWER


def _messages(kind: str) -> list[pb.ProcessingRequest]:
    """What Envoy sends for one buffered POST and its 200 answer."""
    config = pb.ProtocolConfiguration(request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED)
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=key, raw_value=value)
            for key, value in (
                (":method", b"POST"),
                (":path", b"/v1/completions"),
                (":authority", b"gateway"),
                ("content-type", b"application/json"),
                ("content-length", str(len(BODY)).encode()),
            )
        ]
    )
    request_headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=headers), protocol_config=config
    )
    body = pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True))
    status = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")])
    response_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=status))
    if kind == "bare-2":
        body.protocol_config.CopyFrom(config)
        return [body, response_headers]
    return [request_headers, body, response_headers]


def _serve(kind: str, ready: Connection) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        router = ConstantRouter()
        servicer = (
            BareProcessor()
            if kind.startswith("bare")
            else ExternalProcessor(router, Outcomes(router.on_response))
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


async def _load(port: int, kind: str, concurrency: int, warmup: float, duration: float) -> int:
    """Requests completed inside the measured window, `concurrency` streams at a time."""
    messages = _messages(kind)
    counted = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        start = time.monotonic()
        window = (start + warmup, start + warmup + duration)

        async def worker() -> None:
            nonlocal counted
            while (now := time.monotonic()) < window[1]:
                call = stub.Process()
                for message in messages:  # Envoy waits for each answer before going on
                    await call.write(message)
                    await call.read()
                await call.done_writing()
                if now >= window[0] and time.monotonic() < window[1]:
                    counted += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counted


def _required(seconds: float | None) -> float:
    if seconds is None:
        raise RuntimeError("this benchmark reads CPU times from /proc (Linux only)")
    return seconds


def _busy() -> float:
    return _required(busy_cpu_seconds())


def _measure(kind: str, concurrency: int, warmup: float, duration: float) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(kind, child), daemon=True)
    process.start()
    try:
        port = parent.recv()
        assert process.pid is not None
        pid = process.pid

        async def run() -> tuple[int, float, float]:
            task = asyncio.create_task(_load(port, kind, concurrency, warmup, duration))
            await asyncio.sleep(warmup)
            server_before, busy_before = _required(process_cpu_seconds(pid)), _busy()
            count = await task
            server_after, busy_after = _required(process_cpu_seconds(pid)), _busy()
            return count, server_after - server_before, busy_after - busy_before

        count, server_cpu, busy = asyncio.run(run())
    finally:
        process.terminate()
        process.join()
    return {
        "requests_per_s": count / duration,
        "server_cpu_us_per_request": server_cpu / max(count, 1) * 1e6,
        "server_cpu_share": server_cpu / duration,
        "machine_busy_cores": busy / duration,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in SERVERS}
    for round_index in range(args.rounds):
        order = SERVERS if round_index % 2 == 0 else tuple(reversed(SERVERS))
        for kind in order:
            rounds[kind].append(_measure(kind, args.concurrency, args.warmup, args.duration))
    results = []
    print(
        f"{'server':<8} {'req/s':>8} {'server CPU us/req':>18} {'server cores':>13} {'machine':>8}"
    )
    for kind in SERVERS:
        row: dict[str, object] = {"server": kind}
        for key in rounds[kind][0]:
            row[key] = round(statistics.median(r[key] for r in rounds[kind]), 3)
        results.append(row)
        print(
            f"{kind:<8} {row['requests_per_s']:>8.0f} {row['server_cpu_us_per_request']:>18.0f}"
            f" {row['server_cpu_share']:>13.2f} {row['machine_busy_cores']:>8.2f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "extproc_floor",
                "cpu": cpu_model(),
                "grpc": grpc.__version__,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
