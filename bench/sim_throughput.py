"""How many short completions per second one `loractl sim --time-scale 0` process serves.

With all simulated latency removed, what is left is the simulator's own per-request
cost (HTTP framing, validation, text generation, metrics), which is the ceiling of
every benchmark or test that uses it as a stand-in for vLLM.

The load comes from separate processes: an in-process client would share the
server's interpreter lock and event loop, and on a small machine the client's
cost would be counted as the server's. Each load process keeps a fixed number of
keep-alive connections busy (closed loop), first for a warm-up that is not
counted, then for the measured window; only responses that complete inside the
window count. CPU time of the server and of the load processes over the window
is reported too, so a reader can tell which side was the bottleneck.

    python -m bench.sim_throughput [--duration 10] [--warmup 1] [--concurrency 64]
                                   [--clients 1] [--no-pin] [--max-requests N] [--json-only]

By default the server is pinned to one core and the load generator to the others, so
that each has a core of its own. The last line printed is one JSON object. Exit status
is 1 if any request failed (warm-up included) or none succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import aiohttp

from loractl.processes import ChildProcess, free_port

HOST = "127.0.0.1"
MODEL = "bench-base"
PROMPT = "The soup was"
MAX_TOKENS = 5
START_DELAY_S = 0.3
"""Lead time for every load process to open its session before the common start."""
REQUEST_TIMEOUT_S = 10.0
MAX_REQUESTS = 1_000_000
"""Default cap on requests per run, so a wrong flag cannot turn the benchmark into a flood."""


@dataclasses.dataclass
class ClientResult:
    """What one load process saw; plain fields only, as it crosses a process boundary."""

    requests: int = 0
    errors: int = 0
    warmup_requests: int = 0
    warmup_errors: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    error_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_seconds: float = 0.0
    capped: bool = False


@dataclasses.dataclass(frozen=True)
class ClientPlan:
    url: str
    connections: int
    start: float
    measure_from: float
    measure_until: float
    max_requests: int


# --- load process ---------------------------------------------------------------------


async def _worker(
    session: aiohttp.ClientSession,
    plan: ClientPlan,
    body: bytes,
    result: ClientResult,
    error_kinds: Counter[str],
    sent: list[int],
) -> None:
    headers = {"Content-Type": "application/json"}
    while time.monotonic() < plan.measure_until and sent[0] < plan.max_requests:
        sent[0] += 1
        started = time.monotonic()
        failure: str | None = None
        try:
            async with session.post(plan.url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    failure = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = type(exc).__name__
        finished = time.monotonic()
        if finished < plan.measure_from:
            result.warmup_requests += 1
            if failure is not None:
                result.warmup_errors += 1
                error_kinds[f"warmup {failure}"] += 1
        elif finished <= plan.measure_until:
            if failure is None:
                result.requests += 1
                result.latencies_ms.append((finished - started) * 1000.0)
            else:
                result.errors += 1
                error_kinds[failure] += 1
        # Answers arriving after the window are neither counted nor failures: the window
        # closed while they were in flight, and counting them would stretch it.


async def _cpu_over_window(plan: ClientPlan, result: ClientResult) -> None:
    await asyncio.sleep(max(0.0, plan.measure_from - time.monotonic()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, plan.measure_until - time.monotonic()))
    result.cpu_seconds = time.process_time() - before


async def _generate_load(plan: ClientPlan) -> ClientResult:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
    result = ClientResult()
    error_kinds: Counter[str] = Counter()
    sent = [0]
    connector = aiohttp.TCPConnector(limit=plan.connections, keepalive_timeout=60.0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # No User-Agent or Accept-Encoding: fewer bytes to build and parse on both sides.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    ) as session:
        await asyncio.sleep(max(0.0, plan.start - time.monotonic()))
        await asyncio.gather(
            _cpu_over_window(plan, result),
            *(
                _worker(session, plan, body, result, error_kinds, sent)
                for _ in range(plan.connections)
            ),
        )
    result.error_kinds = dict(error_kinds)
    result.capped = sent[0] >= plan.max_requests
    return result


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # uvloop only if the machine happens to have it: it is not a project dependency,
    # and the figures must not depend on it silently, hence "event_loop" in the report.
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _client_main(conn: Connection, url: str, connections: int) -> None:
    """Entry point of a load process: report ready, get the schedule, run, send results."""
    try:
        conn.send("ready")
        plan = ClientPlan(url=url, connections=connections, **conn.recv())
        with asyncio.Runner(loop_factory=_new_event_loop) as runner:
            result = runner.run(_generate_load(plan))
        conn.send(dataclasses.asdict(result))
    finally:
        conn.close()


def event_loop_name() -> str:
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# --- report ---------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of another process, from /proc (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are positional.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float | None:
    """CPU time spent by the whole machine, all cores, outside idle and I/O wait."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...; guest time is inside user already.
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def percentile_ms(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile: always a latency that was actually observed."""
    if not sorted_values:
        return None  # not NaN: the JSON line must stay valid JSON
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return round(sorted_values[min(rank, len(sorted_values)) - 1], 3)


def likely_bottleneck(
    server_cpu_seconds: float | None, client_cpu_seconds: float, client_cores: int
) -> str | None:
    """The side that used more of the CPU it had: the one a faster other side would wait on."""
    if server_cpu_seconds is None:
        return None
    if server_cpu_seconds >= client_cpu_seconds / client_cores:
        return "server"
    return "load generator"


def summarize(
    results: list[ClientResult],
    args: argparse.Namespace,
    server_cpu_seconds: float | None,
    client_cores: int,
    machine_cpu_seconds: float | None,
) -> dict[str, Any]:
    latencies = sorted(latency for r in results for latency in r.latencies_ms)
    requests = sum(r.requests for r in results)
    error_kinds: Counter[str] = Counter()
    for r in results:
        error_kinds.update(r.error_kinds)
    seconds = float(args.duration)
    client_cpu = sum(r.cpu_seconds for r in results)
    return {
        "benchmark": "sim_throughput",
        "requests": requests,
        "errors": sum(r.errors for r in results),
        "warmup_requests": sum(r.warmup_requests for r in results),
        "warmup_errors": sum(r.warmup_errors for r in results),
        "error_kinds": dict(error_kinds),
        "seconds": seconds,
        "requests_per_second": round(requests / seconds, 1),
        "latency_p50_ms": percentile_ms(latencies, 0.50),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "concurrency": args.concurrency,
        "client_processes": args.clients,
        "server_cpu_percent": (
            None if server_cpu_seconds is None else round(100 * server_cpu_seconds / seconds, 1)
        ),
        "client_cpu_percent": round(100 * client_cpu / seconds, 1),
        # Per-request CPU is steadier than req/s on a shared or throttled machine, and says
        # which side would give out first if both had a core to themselves.
        "server_cpu_us_per_request": (
            None
            if server_cpu_seconds is None or not requests
            else round(1e6 * server_cpu_seconds / requests, 1)
        ),
        "client_cpu_us_per_request": round(1e6 * client_cpu / requests, 1) if requests else None,
        "likely_bottleneck": (
            likely_bottleneck(server_cpu_seconds, client_cpu, client_cores) if requests else None
        ),
        # Anything else running on the machine takes cores from server and load generator
        # alike; a high figure here explains a low, noisy run better than the code does.
        "other_cpu_percent": (
            None
            if machine_cpu_seconds is None or server_cpu_seconds is None
            else round(
                100 * max(0.0, machine_cpu_seconds - server_cpu_seconds - client_cpu) / seconds, 1
            )
        ),
        "request_cap_reached": any(r.capped for r in results),
        "pinned": args.pin,
        "max_tokens": MAX_TOKENS,
        "event_loop": event_loop_name(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
    }


def print_table(summary: dict[str, Any]) -> None:
    def cpu(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}% of one core"

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    rows = [
        ("completions (HTTP 200)", f"{summary['requests']}"),
        ("errors", f"{summary['errors']} (+{summary['warmup_errors']} during warm-up)"),
        ("measured window", f"{summary['seconds']:.1f} s"),
        ("throughput", f"{summary['requests_per_second']:.1f} req/s"),
        (
            "latency p50 / p99",
            f"{ms(summary['latency_p50_ms'])} / {ms(summary['latency_p99_ms'])} ms",
        ),
        (
            "concurrency",
            f"{summary['concurrency']} connections over {summary['client_processes']} "
            "load process(es)",
        ),
        ("server CPU", cpu(summary["server_cpu_percent"])),
        ("load generator CPU", cpu(summary["client_cpu_percent"])),
        ("other processes CPU", cpu(summary["other_cpu_percent"])),
        ("likely bottleneck", summary["likely_bottleneck"] or "n/a"),
        ("event loop", summary["event_loop"]),
        ("python", f"{summary['python_implementation']} {summary['python']}"),
        ("cpu", f"{summary['cpu_model']} ({summary['cpu_cores']} cores)"),
    ]
    if summary["error_kinds"]:
        rows.append(("error kinds", json.dumps(summary["error_kinds"])))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


# --- orchestration --------------------------------------------------------------------


def _pin(pid: int, cpus: set[int]) -> None:
    # Best effort: without it the scheduler may put server and load generator on the same
    # core for a while, which shows up as noise between runs rather than as a lower figure.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(pid, cpus)


def _cpu_sets() -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, set(cpus[1:])


def run_benchmark(args: argparse.Namespace, log_dir: Path) -> tuple[dict[str, Any], ChildProcess]:
    port = free_port(HOST)
    server = ChildProcess(
        "sim",
        [
            sys.executable,
            "-m",
            "loractl",
            "sim",
            "--host",
            HOST,
            "--port",
            str(port),
            "--time-scale",
            "0",
            "--served-model-name",
            MODEL,
        ],
        log_dir / "sim.log",
    )
    # spawn, not fork: the load processes must not inherit this process's state, such as
    # the exit hook of loractl.processes that would stop the server from a child.
    context = multiprocessing.get_context("spawn")
    clients: list[tuple[SpawnProcess, Connection]] = []
    done = False
    try:
        server.start()
        server.wait_http_ok(f"http://{HOST}:{port}/health", timeout=30.0)
        server_cpus, client_cpus = _cpu_sets()
        if args.pin:
            _pin(server.pid, server_cpus)
        url = f"http://{HOST}:{port}/v1/completions"
        shares = [
            args.concurrency // args.clients + (i < args.concurrency % args.clients)
            for i in range(args.clients)
        ]
        for share in shares:
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_client_main, args=(child_end, url, share), daemon=True
            )
            process.start()
            child_end.close()
            clients.append((process, parent_end))
            if args.pin and process.pid is not None:
                _pin(process.pid, client_cpus)
        for process, conn in clients:
            if not conn.poll(60.0) or conn.recv() != "ready":
                raise RuntimeError(f"load process {process.pid} did not start")
        # One schedule serves every process: time.monotonic is a single system-wide clock
        # on Linux, so the windows line up without any further handshake.
        start = time.monotonic() + START_DELAY_S
        measure_from = start + args.warmup
        measure_until = measure_from + args.duration
        per_client_cap = max(1, args.max_requests // args.clients)
        schedule = {
            "start": start,
            "measure_from": measure_from,
            "measure_until": measure_until,
            "max_requests": per_client_cap,
        }
        for _, conn in clients:
            conn.send(schedule)
        time.sleep(max(0.0, measure_from - time.monotonic()))
        server_cpu_before = process_cpu_seconds(server.pid)
        machine_cpu_before = busy_cpu_seconds()
        time.sleep(max(0.0, measure_until - time.monotonic()))
        server_cpu_after = process_cpu_seconds(server.pid)
        machine_cpu_after = busy_cpu_seconds()
        results = []
        for process, conn in clients:
            if not conn.poll(REQUEST_TIMEOUT_S + 30.0):
                raise RuntimeError(f"load process {process.pid} sent no result")
            results.append(ClientResult(**conn.recv()))
        server_cpu = (
            None
            if server_cpu_before is None or server_cpu_after is None
            else server_cpu_after - server_cpu_before
        )
        machine_cpu = (
            None
            if machine_cpu_before is None or machine_cpu_after is None
            else machine_cpu_after - machine_cpu_before
        )
        client_cores = min(args.clients, len(client_cpus) if args.pin else os.cpu_count() or 1)
        summary = summarize(results, args, server_cpu, max(1, client_cores), machine_cpu)
        done = True
        return summary, server
    finally:
        for process, conn in clients:
            # After a failure the load processes may still be mid-window: no point waiting.
            process.join(5.0 if done else 0.1)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            conn.close()
        server.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Completions per second of one `loractl sim --time-scale 0` process."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
    parser.add_argument("--concurrency", type=int, default=64, help="open connections in all")
    parser.add_argument(
        "--clients", type=int, default=1, help="load-generator processes sharing the connections"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the server to one core and the load generator to the others",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=MAX_REQUESTS,
        help="stop sending after this many requests in all (warm-up included)",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be in [0, 60]")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be in [1, 1024]")
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    if not 1 <= args.clients <= min(args.concurrency, 16):
        parser.error("--clients must be in [1, min(concurrency, 16)]")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) would otherwise end this process without running the
    # finally blocks, leaving the server behind in its own process group.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="sim-throughput-") as tmp:
        summary, server = run_benchmark(args, Path(tmp))
        failed = summary["errors"] > 0 or summary["warmup_errors"] > 0 or summary["requests"] == 0
        if failed:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
    if summary["request_cap_reached"]:
        print(
            "warning: --max-requests was reached before the window closed; "
            "requests_per_second undercounts",
            file=sys.stderr,
        )
    if not args.json_only:
        print_table(summary)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
