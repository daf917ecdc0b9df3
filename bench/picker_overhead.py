"""What the LoRA-aware picker costs per request: Envoy + picker against plain Envoy round robin.

Topology, all on loopback: N simulators (`loractl sim --time-scale 0`, so they answer at
once) on 127.0.0.2..N+1 sharing one port as pods of a pool do; one `loractl controller`
process (static endpoints, the real scraper and ext_proc server) behind a real Envoy built
by `envoy_bootstrap`; and a second real Envoy built by `round_robin_bootstrap` in front of
the same simulators. Requests are short non-streaming completions for `bench-adapter`, an
adapter registered on every simulator and named by an InferenceModel, so the picker runs
its whole path (body parse, model resolution, filters, scorers, residency tracker, header
answer) and the round-robin Envoy sends the very same body.

Gateways alternate in phases (picker, round robin, then round robin, picker, ...) so that
drift of a shared machine hits both alike; each phase has an uncounted warm-up and a
measured window, and only answers that complete inside the window count. Two sets:

- throughput: a closed loop at high concurrency (default 32 connections): requests per
  second of each gateway, and their ratio (goal: picker / round robin >= 0.7);
- latency: closed loops at low concurrency (default 1 and 4), where queueing does not
  hide it, give the latency the picker path adds (goal: added p50 <= 1 ms).

`--floor` adds a third gateway: the same Envoy bootstrap in front of `bench/go_extproc`, an
ext_proc server in Go that does no routing work and answers with prebuilt routing answers
(built by the picker's own answer builders). It is the floor of any endpoint picker on this
machine: what Envoy's ext_proc filter, its access log and a fast gRPC server cost per
request, and so the best ratio and added latency a picker of any language could reach. It
needs a Go toolchain and gRPC for Go (Debian: `apt-get install golang-go
golang-google-grpc-dev`); without them `--floor` stops with that message.

While round robin is measured the controller is paused (SIGSTOP): a gateway without a
picker has no picker scraping the pods every 50 ms either, and its CPU would otherwise be
charged to the baseline. `--no-pause-picker` keeps it running. The load generator is a
separate process (aiohttp, keep-alive connections), so that its interpreter lock and CPU
are not the gateway's. CPU time of every process is read from /proc over each window, and
so is the whole machine's: the "other" column is what ran beside the benchmark.

    python -m bench.picker_overhead [--sims 4] [--concurrency 32] [--latency-concurrency 1,4]
                                    [--rounds 3] [--duration 5] [--warmup 1]
                                    [--body-mode buffered] [--outcomes access_log]
                                    [--no-pause-picker] [--floor] [--json-only]

Prints a table, then one JSON object on the last line. Exit status 1 if any request failed.
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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, Literal, get_args

import aiohttp
import httpx
import yaml

from bench.sim_throughput import busy_cpu_seconds, cpu_model, percentile_ms, process_cpu_seconds
from controller.extproc.envoy_config import (
    BodyMode,
    OutcomeSource,
    envoy_bootstrap,
    envoy_process,
    round_robin_bootstrap,
    wait_envoy_ready,
)
from controller.extproc.server import routing_body_answer
from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter

BASE = "bench-base"
ADAPTER = "bench-adapter"
PROMPT = "The soup was"
MAX_TOKENS = 5
REQUEST_TIMEOUT_S = 10.0
START_DELAY_S = 0.3
"""Lead time for the load process to open its session before the window schedule starts."""
MAX_REQUESTS_PER_PHASE = 200_000
"""A wrong flag must not turn the benchmark into a flood: no phase sends more than this."""
FRESH_TIMEOUT_S = 15.0

Gateway = Literal["picker", "round-robin", "floor"]
Kind = Literal["throughput", "latency"]
PICKER: Gateway = "picker"
ROUND_ROBIN: Gateway = "round-robin"
FLOOR: Gateway = "floor"
ENVOY_GROUPS: dict[str, str] = {
    PICKER: "envoy_picker",
    ROUND_ROBIN: "envoy_rr",
    FLOOR: "envoy_floor",
}
"""The CPU group of the Envoy each gateway's phases run through."""
FLOOR_SOURCE = Path(__file__).with_name("go_extproc") / "main.go"
# Debian installs Go libraries as source under this path, for builds without modules.
DEBIAN_GOPATH = "/usr/share/gocode"
FLOOR_PACKAGES = "golang-go golang-google-grpc-dev"


# --- load process ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    url: str
    connections: int
    start: float
    measure_from: float
    measure_until: float
    max_requests: int


@dataclasses.dataclass
class LoadResult:
    """What the load process saw in one phase; plain fields, as it crosses a pipe."""

    requests: int = 0
    errors: int = 0
    warmup_errors: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    error_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_seconds: float = 0.0
    capped: bool = False


async def _worker(
    session: aiohttp.ClientSession,
    plan: Plan,
    body: bytes,
    result: LoadResult,
    errors: Counter[str],
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
            if failure is not None:
                result.warmup_errors += 1
                errors[f"warmup {failure}"] += 1
        elif finished <= plan.measure_until:
            if failure is None:
                result.requests += 1
                result.latencies_ms.append((finished - started) * 1000.0)
            else:
                result.errors += 1
                errors[failure] += 1


async def _cpu_over_window(plan: Plan, result: LoadResult) -> None:
    await asyncio.sleep(max(0.0, plan.measure_from - time.monotonic()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, plan.measure_until - time.monotonic()))
    result.cpu_seconds = time.process_time() - before


async def _generate(plan: Plan) -> LoadResult:
    body = json.dumps({"model": ADAPTER, "prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
    result = LoadResult()
    errors: Counter[str] = Counter()
    sent = [0]
    connector = aiohttp.TCPConnector(limit=plan.connections, keepalive_timeout=60.0)
    # No User-Agent or Accept-Encoding: fewer bytes for every hop to parse.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    ) as session:
        await asyncio.sleep(max(0.0, plan.start - time.monotonic()))
        await asyncio.gather(
            _cpu_over_window(plan, result),
            *(_worker(session, plan, body, result, errors, sent) for _ in range(plan.connections)),
        )
    result.error_kinds = dict(errors)
    result.capped = sent[0] >= plan.max_requests
    return result


def _load_main(conn: Connection) -> None:
    """The load process: one phase per plan received, until None."""
    try:
        conn.send("ready")
        while (message := conn.recv()) is not None:
            result = asyncio.run(_generate(Plan(**message)))
            conn.send(dataclasses.asdict(result))
    finally:
        conn.close()


# --- the pool -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Floor:
    """The Go ext_proc server that does no routing, and the Envoy in front of it."""

    server: ChildProcess
    envoy: ChildProcess
    url: str


@dataclasses.dataclass
class Pool:
    sims: list[ChildProcess]
    controller: ChildProcess
    picker_envoy: ChildProcess
    rr_envoy: ChildProcess
    picker_url: str
    rr_url: str
    inventory_url: str
    addresses: list[str]
    floor: Floor | None = None
    paused: bool = False

    def url(self, gateway: Gateway) -> str:
        if gateway == FLOOR:
            assert self.floor is not None
            return self.floor.url
        return self.picker_url if gateway == PICKER else self.rr_url

    def pause_picker(self) -> None:
        if not self.paused:
            self.controller.signal(signal.SIGSTOP)
            self.paused = True

    def resume_picker(self) -> None:
        if self.paused:
            self.controller.signal(signal.SIGCONT)
            self.paused = False
        self.wait_fresh()

    def wait_fresh(self) -> None:
        """Until the picker's inventory has fresh metrics and the adapter on every pod."""

        def fresh() -> bool:
            try:
                views = httpx.get(self.inventory_url, timeout=1.0).json()["endpoints"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return len(views) == len(self.addresses) and all(
                v["metrics"] is not None and ADAPTER in (v["registered"] or ()) for v in views
            )

        self.controller.wait_until(fresh, FRESH_TIMEOUT_S, what="scraped fresh")


def _sim(host: str, port: int, adapter_dir: Path, log_dir: Path) -> ChildProcess:
    argv = [sys.executable, "-m", "loractl", "sim", "--host", host, "--port", str(port)]
    argv += ["--time-scale", "0", "--served-model-name", BASE, "--max-loras", "1"]
    argv += ["--lora-modules", f"{ADAPTER}={adapter_dir}", "--log-level", "warning"]
    return ChildProcess(f"sim-{host}", argv, log_dir / f"sim-{host}.log")


def build_floor_server(work: Path) -> Path:
    """Compiles bench/go_extproc; stops with what to install when Go or its gRPC is missing."""
    go = shutil.which("go")
    if go is None:
        raise SystemExit(f"--floor needs a Go toolchain: apt-get install {FLOOR_PACKAGES}")
    binary = work / "go-extproc"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": DEBIAN_GOPATH}
    env.setdefault("GOCACHE", str(work / "go-cache"))
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(FLOOR_SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise SystemExit(
            f"--floor: building {FLOOR_SOURCE.name} failed; it needs Debian's"
            f" {FLOOR_PACKAGES}:\n{built.stderr.strip()}"
        )
    return binary


def start_floor(
    args: argparse.Namespace, work: Path, children: list[ChildProcess], addresses: list[str]
) -> Floor:
    binary = build_floor_server(work)
    port = free_port()
    # The picker's own answers, one per endpoint, so Envoy applies the same mutations.
    answers = [
        routing_body_answer([address], None, f"floor-{i}").SerializeToString().hex()
        for i, address in enumerate(addresses)
    ]
    argv = [str(binary), "-listen", f"127.0.0.1:{port}", "-body-answers", ",".join(answers)]
    server = ChildProcess("go-extproc", argv, work / "logs" / "go-extproc.log")
    children.append(server.start())
    envoy, url = _start_envoy(work, children, "envoy-floor", _gateway(args, port))
    return Floor(server, envoy, url)


EnvoyConfig = Callable[[int, int], dict[str, Any]]
"""Builds an Envoy bootstrap from its listen and admin ports."""


def _gateway(args: argparse.Namespace, picker_port: int) -> EnvoyConfig:
    """The inference gateway's bootstrap, in front of the ext_proc server on `picker_port`."""

    def config(listen: int, admin: int) -> dict[str, Any]:
        return envoy_bootstrap(
            listen,
            f"127.0.0.1:{picker_port}",
            admin_port=admin,
            listen_host="127.0.0.1",
            body_mode=args.body_mode,
            outcomes=args.outcomes,
        )

    return config


def _start_envoy(
    work: Path, children: list[ChildProcess], name: str, config: EnvoyConfig
) -> tuple[ChildProcess, str]:
    """A running Envoy and the completions URL it listens on."""
    listen, admin = free_port(), free_port()
    envoy = envoy_process(config(listen, admin), work / "envoy", name)
    children.append(envoy.start())
    wait_envoy_ready(envoy, admin)
    return envoy, f"http://127.0.0.1:{listen}/v1/completions"


def start_pool(args: argparse.Namespace, work: Path, children: list[ChildProcess]) -> Pool:
    hosts = [f"127.0.0.{2 + i}" for i in range(args.sims)]
    port = free_port(hosts[0])
    adapter_dir = write_adapter(work / "adapters" / ADAPTER, seed=1)
    sims = []
    for host in hosts:
        sim = _sim(host, port, adapter_dir, work / "logs")
        children.append(sim.start())
        sims.append(sim)
    for sim, host in zip(sims, hosts, strict=True):
        sim.wait_http_ok(f"http://{host}:{port}/health")
    addresses = [f"{host}:{port}" for host in hosts]
    models = work / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
                "kind": "InferenceModel",
                "metadata": {"name": ADAPTER, "namespace": "default"},
                "spec": {"modelName": ADAPTER, "poolRef": {"name": "pool"}},
            }
        )
    )
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "loractl", "controller", "--host", "127.0.0.1"]
    argv += ["--endpoints", ",".join(addresses), "--models", str(models)]
    argv += ["--base-model", BASE, "--seed", "1", "--log-level", "warning"]
    argv += ["--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port)]
    argv += ["--metrics-port", str(metrics_port)]
    controller = ChildProcess("controller", argv, work / "logs" / "controller.log")
    children.append(controller.start())
    controller.wait_http_ok(f"http://127.0.0.1:{metrics_port}/healthz")
    picker_envoy, picker_url = _start_envoy(
        work, children, "envoy-picker", _gateway(args, grpc_port)
    )

    def round_robin(listen: int, admin: int) -> dict[str, Any]:
        return round_robin_bootstrap(listen, addresses, admin, listen_host="127.0.0.1")

    rr_envoy, rr_url = _start_envoy(work, children, "envoy-rr", round_robin)
    pool = Pool(
        sims=sims,
        controller=controller,
        picker_envoy=picker_envoy,
        rr_envoy=rr_envoy,
        picker_url=picker_url,
        rr_url=rr_url,
        inventory_url=f"http://127.0.0.1:{metrics_port}/inventory",
        addresses=addresses,
        floor=start_floor(args, work, children, addresses) if args.floor else None,
    )
    pool.wait_fresh()
    for url in (pool.url(gateway) for gateway in gateways(args)):
        body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
        answer = httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
        if answer.status_code != 200:
            raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
    return pool


# --- phases ---------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    kind: Kind
    gateway: Gateway
    concurrency: int
    round: int
    requests: int
    errors: int
    warmup_errors: int
    error_kinds: dict[str, int]
    requests_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    cpu_percent: dict[str, float | None]
    """Share of one core over the window, per process group (and the whole machine)."""
    capped: bool


def _cpu(pids: Sequence[int]) -> float | None:
    values = [process_cpu_seconds(pid) for pid in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _cpu_groups(pool: Pool) -> dict[str, list[int]]:
    groups = {
        "picker": [pool.controller.pid],
        "envoy_picker": [pool.picker_envoy.pid],
        "envoy_rr": [pool.rr_envoy.pid],
        "sims": [sim.pid for sim in pool.sims],
    }
    if pool.floor is not None:
        groups["floor"] = [pool.floor.server.pid]
        groups["envoy_floor"] = [pool.floor.envoy.pid]
    return groups


def run_phase(
    pool: Pool,
    load: tuple[SpawnProcess, Connection],
    args: argparse.Namespace,
    kind: Kind,
    gateway: Gateway,
    concurrency: int,
    index: int,
) -> Phase:
    if gateway == PICKER:
        pool.resume_picker()
    elif args.pause_picker:
        pool.pause_picker()
    _, conn = load
    start = time.monotonic() + START_DELAY_S
    measure_from = start + args.warmup
    measure_until = measure_from + args.duration
    conn.send(
        dataclasses.asdict(
            Plan(
                url=pool.url(gateway),
                connections=concurrency,
                start=start,
                measure_from=measure_from,
                measure_until=measure_until,
                max_requests=args.max_requests,
            )
        )
    )
    groups = _cpu_groups(pool)
    time.sleep(max(0.0, measure_from - time.monotonic()))
    before = {name: _cpu(pids) for name, pids in groups.items()}
    machine_before = busy_cpu_seconds()
    time.sleep(max(0.0, measure_until - time.monotonic()))
    after = {name: _cpu(pids) for name, pids in groups.items()}
    machine_after = busy_cpu_seconds()
    if not conn.poll(REQUEST_TIMEOUT_S + 30.0):
        raise RuntimeError("the load process sent no result")
    result = LoadResult(**conn.recv())
    seconds = args.duration
    used: dict[str, float | None] = {}
    for name in groups:
        b, a = before[name], after[name]
        used[name] = None if a is None or b is None else a - b
    used["client"] = result.cpu_seconds
    machine = (
        None if machine_before is None or machine_after is None else machine_after - machine_before
    )
    ours = [v for v in used.values() if v is not None]
    used["other"] = None if machine is None else max(0.0, machine - sum(ours))
    used["machine"] = machine
    latencies = sorted(result.latencies_ms)
    return Phase(
        kind=kind,
        gateway=gateway,
        concurrency=concurrency,
        round=index,
        requests=result.requests,
        errors=result.errors,
        warmup_errors=result.warmup_errors,
        error_kinds=result.error_kinds,
        requests_per_second=round(result.requests / seconds, 1),
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        mean_ms=round(statistics.fmean(latencies), 3) if latencies else None,
        cpu_percent={
            name: None if value is None else round(100 * value / seconds, 1)
            for name, value in used.items()
        },
        capped=result.capped,
    )


def gateways(args: argparse.Namespace) -> tuple[Gateway, ...]:
    return (PICKER, ROUND_ROBIN, FLOOR) if args.floor else (PICKER, ROUND_ROBIN)


def schedule(args: argparse.Namespace) -> list[tuple[Kind, Gateway, int, int]]:
    """Every phase in running order: per concurrency, rounds of every gateway, the order
    flipped every round (ABBA...) so that a linear drift cancels out of the comparison."""
    plan: list[tuple[Kind, Gateway, int, int]] = []
    sets: list[tuple[Kind, int]] = [("throughput", args.concurrency)]
    sets += [("latency", c) for c in args.latency_concurrency]
    for kind, concurrency in sets:
        for index in range(args.rounds):
            order = gateways(args)[:: 1 if index % 2 == 0 else -1]
            plan += [(kind, gateway, concurrency, index) for gateway in order]
    return plan


# --- report ---------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _added(pairs: list[tuple[Phase, Phase]], field: str) -> list[float | None]:
    """The gateway minus round robin, round by round, for one latency field."""
    out: list[float | None] = []
    for subject, rr in pairs:
        x, y = getattr(subject, field), getattr(rr, field)
        out.append(None if x is None or y is None else round(x - y, 3))
    return out


def compare(phases: list[Phase], subject: Gateway = PICKER) -> list[dict[str, Any]]:
    """One row per (kind, concurrency) for `subject` (the picker, or the floor) against
    round robin: medians over rounds, and paired per-round differences (each round measured
    the gateways back to back). Keys name the subject: `picker_rps`, `floor_rps`, ..."""
    rows = []
    keys = list(dict.fromkeys((p.kind, p.concurrency) for p in phases))
    name, envoy = subject, ENVOY_GROUPS[subject]
    for kind, concurrency in keys:
        mine = [p for p in phases if (p.kind, p.concurrency) == (kind, concurrency)]
        by_round: dict[int, dict[str, Phase]] = {}
        for p in mine:
            by_round.setdefault(p.round, {})[p.gateway] = p
        pairs = [
            (r[subject], r[ROUND_ROBIN])
            for r in by_round.values()
            if subject in r and ROUND_ROBIN in r
        ]
        ours = [a for a, _ in pairs]
        rr = [b for _, b in pairs]
        ratios = [a.requests_per_second / b.requests_per_second for a, b in pairs if b.requests]

        def cpu(group: list[Phase], name: str) -> float | None:
            return _median([p.cpu_percent.get(name) for p in group])

        def per_request_us(group: list[Phase], name: str) -> float | None:
            values = [
                1e4 * v / p.requests_per_second
                for p in group
                if (v := p.cpu_percent.get(name)) is not None and p.requests_per_second
            ]
            return _median(values)

        added_p50 = _added(pairs, "p50_ms")
        rows.append(
            {
                "kind": kind,
                "concurrency": concurrency,
                "rounds": len(pairs),
                f"{name}_rps": _median([p.requests_per_second for p in ours]),
                "rr_rps": _median([p.requests_per_second for p in rr]),
                "ratio": _median(ratios),
                "ratio_min": round(min(ratios), 3) if ratios else None,
                "ratio_max": round(max(ratios), 3) if ratios else None,
                f"{name}_p50_ms": _median([p.p50_ms for p in ours]),
                "rr_p50_ms": _median([p.p50_ms for p in rr]),
                f"{name}_p99_ms": _median([p.p99_ms for p in ours]),
                "rr_p99_ms": _median([p.p99_ms for p in rr]),
                "added_p50_ms": _median(added_p50),
                "added_p50_ms_range": [
                    min((v for v in added_p50 if v is not None), default=None),
                    max((v for v in added_p50 if v is not None), default=None),
                ],
                "added_p99_ms": _median(_added(pairs, "p99_ms")),
                "added_mean_ms": _median(_added(pairs, "mean_ms")),
                f"{name}_cpu_percent": cpu(ours, name),
                f"{name}_cpu_us_per_request": per_request_us(ours, name),
                f"envoy_cpu_percent_{name}_phases": cpu(ours, envoy),
                f"envoy_cpu_us_per_request_{name}_phases": per_request_us(ours, envoy),
                "envoy_cpu_percent_rr_phases": cpu(rr, "envoy_rr"),
                "envoy_cpu_us_per_request_rr_phases": per_request_us(rr, "envoy_rr"),
                f"sims_cpu_percent_{name}_phases": cpu(ours, "sims"),
                "sims_cpu_percent_rr_phases": cpu(rr, "sims"),
                f"client_cpu_percent_{name}_phases": cpu(ours, "client"),
                "client_cpu_percent_rr_phases": cpu(rr, "client"),
                f"other_cpu_percent_{name}_phases": cpu(ours, "other"),
                "other_cpu_percent_rr_phases": cpu(rr, "other"),
                f"machine_cpu_percent_{name}_phases": cpu(ours, "machine"),
                "machine_cpu_percent_rr_phases": cpu(rr, "machine"),
            }
        )
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_tables(summary: dict[str, Any]) -> None:
    print("phases (CPU in % of one core over the window)")
    header = (
        f"{'set':<10} {'conc':>4} {'rnd':>3} {'gateway':<11} {'req/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'err':>4} {'server':>6} {'envoy':>6} {'sims':>6} {'client':>6} "
        f"{'other':>6} {'machine':>7}"
    )
    print(header)
    for p in summary["phases"]:
        cpu = p["cpu_percent"]
        envoy = cpu[ENVOY_GROUPS[p["gateway"]]]
        server = cpu["floor"] if p["gateway"] == FLOOR else cpu["picker"]
        print(
            f"{p['kind']:<10} {p['concurrency']:>4} {p['round']:>3} {p['gateway']:<11} "
            f"{p['requests_per_second']:>8.1f} {_fmt(p['p50_ms'], 2):>7} "
            f"{_fmt(p['p99_ms'], 2):>7} {p['errors'] + p['warmup_errors']:>4} "
            f"{_fmt(server, 0):>6} {_fmt(envoy, 0):>6} {_fmt(cpu['sims'], 0):>6} "
            f"{_fmt(cpu['client'], 0):>6} {_fmt(cpu['other'], 0):>6} {_fmt(cpu['machine'], 0):>7}"
        )
    for name, key in (("picker", "comparison"), ("floor", "floor_comparison")):
        if key in summary:
            _print_comparison(name, summary[key])


def _print_comparison(name: str, rows: list[dict[str, Any]]) -> None:
    letter = name[0].upper()
    print()
    print(f"{name} vs round robin (medians over rounds; 'added' = paired per-round difference)")
    print(
        f"{'set':<10} {'conc':>4} {name + ' r/s':>10} {'RR r/s':>8} {'ratio':>6} "
        f"{f'p50 {letter}/RR ms':>13} {f'p99 {letter}/RR ms':>13} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {name + ' us/req':>13} {f'envoy us/req {letter}/RR':>17}"
    )
    for r in rows:
        print(
            f"{r['kind']:<10} {r['concurrency']:>4} {_fmt(r[name + '_rps']):>10} "
            f"{_fmt(r['rr_rps']):>8} {_fmt(r['ratio'], 2):>6} "
            f"{_fmt(r[name + '_p50_ms'], 2) + '/' + _fmt(r['rr_p50_ms'], 2):>13} "
            f"{_fmt(r[name + '_p99_ms'], 2) + '/' + _fmt(r['rr_p99_ms'], 2):>13} "
            f"{_fmt(r['added_p50_ms'], 2):>8} {_fmt(r['added_p99_ms'], 2):>8} "
            f"{_fmt(r[name + '_cpu_us_per_request'], 0):>13} "
            f"{_fmt(r['envoy_cpu_us_per_request_' + name + '_phases'], 0) + '/'}"
            f"{_fmt(r['envoy_cpu_us_per_request_rr_phases'], 0):<8}"
        )


# --- orchestration --------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    children: list[ChildProcess] = []
    context = multiprocessing.get_context("spawn")  # no inherited state (exit hooks, sockets)
    load: tuple[SpawnProcess, Connection] | None = None
    pool: Pool | None = None
    phases: list[Phase] = []
    try:
        pool = start_pool(args, work, children)
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_load_main, args=(child_end,), daemon=True)
        process.start()
        child_end.close()
        load = (process, parent_end)
        if not parent_end.poll(60.0) or parent_end.recv() != "ready":
            raise RuntimeError("the load process did not start")
        for kind, gateway, concurrency, index in schedule(args):
            phase = run_phase(pool, load, args, kind, gateway, concurrency, index)
            phases.append(phase)
            if not args.json_only:
                print(
                    f"  {kind} c={concurrency} round {index} {gateway}: "
                    f"{phase.requests_per_second:.0f} req/s, p50 {_fmt(phase.p50_ms, 2)} ms",
                    file=sys.stderr,
                )
    finally:
        if load is not None:
            process, conn = load
            with contextlib.suppress(OSError):  # a dead load process: nothing to tell
                conn.send(None)
            process.join(10.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            conn.close()
        if pool is not None and pool.paused:
            # A stopped process keeps SIGTERM pending: wake it so it can shut down cleanly.
            pool.controller.signal(signal.SIGCONT)
        for child in reversed(children):
            child.stop()
    summary: dict[str, Any] = {
        "benchmark": "picker_overhead",
        "comparison": compare(phases),
        "phases": [dataclasses.asdict(p) for p in phases],
        "errors": sum(p.errors + p.warmup_errors for p in phases),
        "request_cap_reached": any(p.capped for p in phases),
        "sims": args.sims,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "body_mode": args.body_mode,
        "outcomes": args.outcomes,
        "picker_paused_during_rr": args.pause_picker,
        "max_tokens": MAX_TOKENS,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpu_model": cpu_model(),
        "cpu_cores": multiprocessing.cpu_count(),
    }
    if args.floor:
        summary["floor_comparison"] = compare(phases, FLOOR)
    return summary


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if any(not 1 <= v <= 1024 for v in values):
        raise argparse.ArgumentTypeError("each concurrency must be in [1, 1024]")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Envoy + LoRA-aware picker against Envoy round robin, same simulators."
    )
    parser.add_argument("--sims", type=int, default=4, help="simulators (pods) in the pool")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="connections of the throughput set"
    )
    parser.add_argument(
        "--latency-concurrency",
        type=_concurrency_list,
        default=[1, 4],
        help="connections of each latency set, comma separated (empty: none)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="phases of each gateway per set")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per phase")
    parser.add_argument("--body-mode", choices=get_args(BodyMode), default="buffered")
    parser.add_argument(
        "--outcomes",
        choices=get_args(OutcomeSource),
        default="access_log",
        help="how Envoy tells the picker each request's outcome",
    )
    parser.add_argument(
        "--no-pause-picker",
        dest="pause_picker",
        action="store_false",
        help="keep the controller running (and scraping) during round-robin phases",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=MAX_REQUESTS_PER_PHASE,
        help="stop sending after this many requests in a phase (warm-up included)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure Envoy in front of a Go ext_proc server that does no routing work",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if not 1 <= args.sims <= 200:
        parser.error("--sims must be in [1, 200]")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be in [1, 1024]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in [1, 20]")
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    if not 0 <= args.warmup <= 30:
        parser.error("--warmup must be in [0, 30]")
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM would otherwise skip the finally blocks and leave the pool running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="picker-overhead-") as tmp:
        summary = run(args, Path(tmp))
    if summary["request_cap_reached"]:
        print("warning: --max-requests cut a phase short; its req/s undercounts", file=sys.stderr)
    if not args.json_only:
        print_tables(summary)
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
