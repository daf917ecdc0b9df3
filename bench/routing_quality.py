"""Routing quality with LoRA swap costs: adapter swaps and time to first token per policy.

Pool: 8 simulators (127.0.0.2-9, one port, as pods of a pool) with `--max-loras 4` GPU
slots, a CPU cache large enough for every adapter (`--max-cpu-loras 64`), 32 adapters
registered on every pod at start (`--lora-modules`), and non-zero swap-in, disk-load,
prefill and inter-token costs. A request whose adapter is not in a slot pays the swap-in
(plus the disk read if the CPU cache had evicted it, which a 64-entry cache never does
here); a request whose adapter needs a slot while all four are pinned by running requests
waits until one drains. Those two costs are what LoRA-aware routing is meant to avoid.

Workload: requests for adapters drawn from a Zipf popularity (exponent --zipf, seeded),
arriving open loop as a Poisson process at --load (default 70 %) of the pool's capacity,
as measured at the start of the run; or at a fixed --rate (requests per second), which
makes runs comparable across sessions on a machine whose capacity measurement wanders.
Capacity is measured first, in the same run: a closed loop of base-model requests (no
adapter, so no slot can block them) at twice the pool's sequence slots, round robin, so
every pod is full; it is the pool's throughput without LoRA constraints, an upper bound
that no policy is favoured by. Each request is a streaming completion with a fixed
--max-tokens (shorter when the simulated model stops on its own, the same for every
policy); prompts are seeded, so every policy gets the very same requests at the very same
offsets.

Policies: `ours` (DEFAULT_PROFILE), `upstream` (UPSTREAM_PROFILE, the re-implemented
Gateway API Inference Extension scheduler), `round-robin`, `random`, and any custom profile
YAML given with --profile NAME=PATH. Profiles run in this process, the same code the picker
runs: an Inventory fed by the real Scraper (every 50 ms, as `loractl controller`), and
`load_profile(...)`'s Pipeline.schedule() for each request, which is then sent straight to
the chosen simulator. Envoy and gRPC are left out on purpose: they add the same cost to
every policy and would only blur the comparison on a 2-core machine. Before each policy the
simulators are started anew (empty GPU slots, adapters registered from --lora-modules) and
a fresh Pipeline starts with empty memory, so every policy starts cold. New processes, not
`POST /sim/restart`: a restart keeps the metrics registry, and with it every
`vllm:lora_requests_info` label set seen so far (vLLM never drops one; the simulator keeps
512), which made each scrape dearer for whichever policy ran later.
With --rounds N every policy runs N times, the order reversed every other round.

Measured per policy: adapter swaps (sum over the pods of the `sim:lora_swaps_total` delta),
time to first token on the client (from the request's planned arrival, so queueing in the
client under overload is not hidden, to the first SSE chunk), the simulators' own mean TTFT
(`vllm:time_to_first_token_seconds` sum / count deltas) as a cross-check, end-to-end
latency, errors, how the requests spread over the pods, and the queues the scraper saw;
TTFT is also split by the affinity the profile saw, by the chosen pod's state at its last
scrape (queued / full / free) and by adapter popularity, to tell where a tail comes from.

    python -m bench.routing_quality [--requests 2400] [--load 0.7 | --rate R] [--seed 1]
        [--rounds 1]
        [--policies ours,upstream,round-robin,random] [--profile NAME=PATH ...]
        [--plot bench/routing_quality.png] [--json-only]

A run of one round takes about two and a half minutes (at --time-scale 1, each policy's
2,400 requests arrive over some 20 s); the plot needs matplotlib, which loractl does not
depend on: without it the figures are still printed.

Prints a table, then one JSON object on the last line. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from bench.sim_throughput import busy_cpu_seconds, cpu_model, process_cpu_seconds
from controller.inventory import Endpoint, Inventory
from controller.scheduling.pipeline import Pipeline
from controller.scheduling.profile import DEFAULT_PROFILE, UPSTREAM_PROFILE, load_profile
from controller.scheduling.types import SchedulingRequest
from controller.scrape import Scraper
from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter
from simulator.textgen import VOCABULARY

BASE = "bench-base"
BUILT_IN_PROFILES = {"ours": DEFAULT_PROFILE, "upstream": UPSTREAM_PROFILE}
TRIVIAL_POLICIES = ("round-robin", "random")
DEFAULT_POLICIES = "ours,upstream,round-robin,random"
REQUEST_TIMEOUT_S = 120.0
MAX_IN_FLIGHT = 2048
"""Above this many open requests the client stops opening more (they wait, and their TTFT,
counted from the planned arrival, shows it): a hopeless policy must not exhaust sockets."""
FRESH_TIMEOUT_S = 20.0
SAMPLE_EVERY_S = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
    sims: int
    adapters: int
    max_loras: int
    max_cpu_loras: int
    max_num_seqs: int
    swap_in_ms: float
    disk_load_ms: float
    inter_token_ms: float
    prefill_ms_per_token: float
    time_scale: float
    max_tokens: int
    prompt_words: int
    zipf: float
    load: float
    requests: int
    seed: int
    rate: float | None = None  # fixed arrivals per second; None: load x measured capacity

    def sim_flags(self) -> list[str]:
        return [
            "--served-model-name",
            BASE,
            "--max-loras",
            str(self.max_loras),
            "--max-cpu-loras",
            str(self.max_cpu_loras),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--swap-in-ms",
            str(self.swap_in_ms),
            "--disk-load-ms",
            str(self.disk_load_ms),
            "--inter-token-ms",
            str(self.inter_token_ms),
            "--prefill-ms-per-token",
            str(self.prefill_ms_per_token),
            "--time-scale",
            str(self.time_scale),
            "--log-level",
            "warning",
        ]

    def service_seconds(self) -> float:
        """Wall time of one request at most --max-tokens long, without queueing or swaps."""
        simulated_ms = (
            self.prefill_ms_per_token * self.prompt_words  # one token per word here
            + (self.max_tokens - 1) * self.inter_token_ms
        )
        return simulated_ms * self.time_scale / 1000.0


def adapter_names(count: int) -> list[str]:
    return [f"adapter-{i:02d}" for i in range(count)]


# --- workload -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    adapter: str
    prompt: str


def zipf_weights(count: int, exponent: float) -> list[float]:
    weights = [1.0 / (rank + 1) ** exponent for rank in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


def popularity_ranks(settings: Settings) -> dict[str, int]:
    """adapter → popularity rank (0 = most requested). Ranks are shuffled over the names
    (seeded), so that the most popular adapter is not also the first in every listing a
    policy might iterate in order."""
    rng = random.Random(settings.seed)
    ranked = rng.sample(adapter_names(settings.adapters), settings.adapters)
    return {name: rank for rank, name in enumerate(ranked)}


def arrivals(settings: Settings, rate: float) -> list[Arrival]:
    """The whole schedule, drawn up front from the seed: every policy replays it exactly."""
    ranks = popularity_ranks(settings)
    ranked = sorted(ranks, key=ranks.__getitem__)
    weights = zipf_weights(settings.adapters, settings.zipf)
    rng = random.Random(settings.seed + 1)  # not the ranks' stream: independent draws
    out = []
    at = 0.0
    for _ in range(settings.requests):
        at += rng.expovariate(rate)
        adapter = rng.choices(ranked, weights)[0]
        prompt = " ".join(rng.choices(VOCABULARY, k=settings.prompt_words))
        out.append(Arrival(at, adapter, prompt))
    return out


# --- policies -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a request went, and how that pod looked in the inventory when it was chosen."""

    address: str | None  # None: no endpoint passed the filters
    affinity: str | None = None  # the profile's classification; None for trivial policies
    waiting: int | None = None  # waiting requests at the last scrape (None: unknown)
    running: int | None = None


class Policy(Protocol):
    name: str

    def choose(self, adapter: str) -> Decision: ...


def _observed(inventory: Inventory, address: str) -> Decision:
    for view in inventory.snapshot():
        if view.address == address:
            metrics = view.metrics
            if metrics is not None:
                return Decision(address, waiting=metrics.waiting, running=metrics.running)
    return Decision(address)


class RoundRobin:
    def __init__(self, addresses: list[str], inventory: Inventory) -> None:
        self.name = "round-robin"
        self._addresses = addresses
        self._inventory = inventory
        self._next = 0

    def choose(self, adapter: str) -> Decision:
        address = self._addresses[self._next % len(self._addresses)]
        self._next += 1
        return _observed(self._inventory, address)


class RandomChoice:
    def __init__(self, addresses: list[str], inventory: Inventory, seed: int) -> None:
        self.name = "random"
        self._addresses = addresses
        self._inventory = inventory
        self._rng = random.Random(seed)

    def choose(self, adapter: str) -> Decision:
        return _observed(self._inventory, self._rng.choice(self._addresses))


class ProfilePolicy:
    """The picker's decision: the inventory's snapshot through the profile's pipeline."""

    def __init__(self, name: str, pipeline: Pipeline, inventory: Inventory) -> None:
        self.name = name
        self._pipeline = pipeline
        self._inventory = inventory
        self.decision_us: list[float] = []

    def choose(self, adapter: str) -> Decision:
        started = time.perf_counter()
        request = SchedulingRequest(model=adapter, target=adapter, is_adapter=True)
        result = self._pipeline.schedule(request, self._inventory.snapshot())
        self.decision_us.append((time.perf_counter() - started) * 1e6)
        if not result.endpoints:
            return Decision(None, result.affinity.value)
        view = result.endpoints[0]
        metrics = view.metrics
        return Decision(
            view.address,
            result.affinity.value,
            None if metrics is None else metrics.waiting,
            None if metrics is None else metrics.running,
        )


# --- measuring ------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    decision: Decision
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None
    lag_s: float = 0.0  # how late the client sent it (a starved event loop shows here)


async def stream_completion(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], since: float
) -> tuple[float, float]:
    """(TTFT, end to end), both from `since`; raises on anything but a complete stream."""
    loop = asyncio.get_running_loop()
    first: float | None = None
    done = False
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                done = True
            elif first is None:
                # The first chunk of a non-chat completion stream carries the first token;
                # parse only that one, the rest is just read (client CPU is scarce here).
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    first = loop.time()
    if first is None or not done:
        raise RuntimeError("stream ended without a token or without [DONE]")
    return first - since, loop.time() - since


async def replay(
    policy: Policy,
    schedule: list[Arrival],
    urls: dict[str, str],
    settings: Settings,
    session: aiohttp.ClientSession,
) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    start = loop.time() + 0.2

    async def one(arrival: Arrival) -> Outcome:
        planned = start + arrival.at
        await asyncio.sleep(max(0.0, planned - loop.time()))
        async with gate:
            lag = loop.time() - planned
            decision = policy.choose(arrival.adapter)
            address = decision.address
            outcome = Outcome(decision, lag_s=lag)
            if address is None:
                outcome.error = "no endpoint"
                return outcome
            body = {
                "model": arrival.adapter,
                "prompt": arrival.prompt,
                "max_tokens": settings.max_tokens,
                "stream": True,
            }
            try:
                outcome.ttft_s, outcome.e2e_s = await stream_completion(
                    session, f"{urls[address]}/v1/completions", body, planned
                )
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"[:120]
            return outcome

    return await asyncio.gather(*(one(a) for a in schedule))


async def sample_queues(
    inventory: Inventory, stop: asyncio.Event, samples: list[tuple[int, ...]]
) -> None:
    """Waiting requests per pod as the scraper saw them, every SAMPLE_EVERY_S."""
    while not stop.is_set():
        samples.append(
            tuple(v.metrics.waiting if v.metrics is not None else -1 for v in inventory.snapshot())
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


@dataclasses.dataclass
class SimCounters:
    swaps: dict[str, float]  # by source: cpu, disk
    ttft_sum: float
    ttft_count: float
    successes: float
    lora_info_series: int  # a level, not a counter: label sets on the pages right now

    def minus(self, other: SimCounters) -> SimCounters:
        return SimCounters(
            swaps={k: v - other.swaps.get(k, 0.0) for k, v in self.swaps.items()},
            ttft_sum=self.ttft_sum - other.ttft_sum,
            ttft_count=self.ttft_count - other.ttft_count,
            successes=self.successes - other.successes,
            lora_info_series=self.lora_info_series,
        )


async def sim_counters(session: aiohttp.ClientSession, urls: list[str]) -> SimCounters:
    totals = SimCounters({"cpu": 0.0, "disk": 0.0}, 0.0, 0.0, 0.0, 0)
    for url in urls:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sim:lora_swaps_total":
                    source = sample.labels.get("source", "?")
                    totals.swaps[source] = totals.swaps.get(source, 0.0) + sample.value
                elif sample.name == "vllm:time_to_first_token_seconds_sum":
                    totals.ttft_sum += sample.value
                elif sample.name == "vllm:time_to_first_token_seconds_count":
                    totals.ttft_count += sample.value
                elif sample.name == "vllm:request_success_total":
                    totals.successes += sample.value
                elif sample.name == "vllm:lora_requests_info":
                    totals.lora_info_series += 1
    return totals


def new_session() -> aiohttp.ClientSession:
    """One per phase: pods are new processes each time, so no kept-alive connection to an
    old one may be reused (it would fail the first request sent on it)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # bounded by MAX_IN_FLIGHT instead
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest rank: always a value that was observed."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 1)


# --- the pool -------------------------------------------------------------------------


class Pool:
    """The simulators. Each policy gets new processes: `/sim/restart` would empty the slots
    too, but keeps the metrics registry, whose `vllm:lora_requests_info` label sets (kept
    forever, as vLLM does) make every later scrape dearer and would tax later policies."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.settings = settings
        self.work = work
        self.hosts = [f"127.0.0.{2 + i}" for i in range(settings.sims)]
        self.port = free_port(self.hosts[0])
        self.addresses = [f"{host}:{self.port}" for host in self.hosts]
        self.urls = {a: f"http://{a}" for a in self.addresses}
        self.children: list[ChildProcess] = []
        self._generation = 0
        self._modules = [
            f"{name}={write_adapter(work / 'adapters' / name, seed=i)}"
            for i, name in enumerate(adapter_names(settings.adapters))
        ]

    def start(self) -> None:
        self._generation += 1
        self.children = []
        for host in self.hosts:
            argv = [sys.executable, "-m", "loractl", "sim", "--host", host, "--port"]
            argv += [str(self.port), *self.settings.sim_flags(), "--lora-modules", *self._modules]
            log = self.work / "logs" / f"sim-{host}-{self._generation}.log"
            self.children.append(ChildProcess(f"sim-{host}", argv, log).start())
        for child, url in zip(self.children, self.urls.values(), strict=True):
            child.wait_http_ok(f"{url}/health")

    def stop(self) -> None:
        for child in self.children:
            child.stop()

    async def restart(self) -> None:
        """Every pod new: empty GPU slots, the startup adapters in the CPU cache."""
        await asyncio.to_thread(self.stop)
        await asyncio.to_thread(self.start)
        # Metrics scraped before the restart stay fresh for Staleness.metrics (0.5 s): wait
        # them out, so that wait_fresh sees the new pods, not the old ones.
        await asyncio.sleep(0.6)


async def wait_fresh(inventory: Inventory, adapters: set[str]) -> None:
    """Until every pod has fresh metrics and lists every adapter: the picker's steady state."""
    deadline = time.monotonic() + FRESH_TIMEOUT_S
    while time.monotonic() < deadline:
        views = inventory.snapshot()
        if all(
            v.metrics is not None and v.registered is not None and adapters <= v.registered
            for v in views
        ):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"inventory not fresh after {FRESH_TIMEOUT_S}s: {inventory.errors()}")


# --- capacity -------------------------------------------------------------------------


async def measure_capacity(
    pool: Pool, settings: Settings, session: aiohttp.ClientSession, warmup: float, window: float
) -> dict[str, Any]:
    """Closed loop of base-model requests, round robin, at twice the pool's sequence slots."""
    loop = asyncio.get_running_loop()
    concurrency = 2 * settings.sims * settings.max_num_seqs
    urls = list(pool.urls.values())
    measure_from = loop.time() + warmup
    measure_until = measure_from + window
    done = [0]
    errors = [0]
    turn = [0]
    prompt = " ".join(random.Random(settings.seed).choices(VOCABULARY, k=settings.prompt_words))
    body = {"model": BASE, "prompt": prompt, "max_tokens": settings.max_tokens}

    async def worker() -> None:
        while loop.time() < measure_until:
            url = urls[turn[0] % len(urls)]
            turn[0] += 1
            try:
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if measure_from <= loop.time() <= measure_until:
                done[0] += ok
                errors[0] += not ok

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    measured = done[0] / window
    derived = settings.sims * settings.max_num_seqs / settings.service_seconds()
    return {
        "concurrency": concurrency,
        "window_s": window,
        "requests_per_second": round(measured, 1),
        "derived_requests_per_second": round(derived, 1),
        "errors": errors[0],
    }


# --- one policy -----------------------------------------------------------------------


async def run_policy(
    policy: Policy,
    pool: Pool,
    inventory: Inventory,
    schedule: list[Arrival],
    ranks: dict[str, int],
    settings: Settings,
) -> dict[str, Any]:
    await pool.restart()
    await wait_fresh(inventory, set(adapter_names(settings.adapters)))
    async with new_session() as session:
        return await _run_policy(policy, pool, inventory, schedule, ranks, settings, session)


async def _run_policy(
    policy: Policy,
    pool: Pool,
    inventory: Inventory,
    schedule: list[Arrival],
    ranks: dict[str, int],
    settings: Settings,
    session: aiohttp.ClientSession,
) -> dict[str, Any]:
    urls = list(pool.urls.values())
    before = await sim_counters(session, urls)
    sim_cpu_before = [process_cpu_seconds(child.pid) for child in pool.children]
    machine_before = busy_cpu_seconds()
    own_before = time.process_time()
    started = time.monotonic()
    stop = asyncio.Event()
    queue_samples: list[tuple[int, ...]] = []
    sampler = asyncio.create_task(sample_queues(inventory, stop, queue_samples))
    try:
        outcomes = await replay(policy, schedule, pool.urls, settings, session)
    finally:
        stop.set()
        await sampler
    elapsed = time.monotonic() - started
    own_cpu = time.process_time() - own_before
    machine_cpu = busy_cpu_seconds()
    sim_cpu_after = [process_cpu_seconds(child.pid) for child in pool.children]
    delta = (await sim_counters(session, urls)).minus(before)

    ok = [o for o in outcomes if o.error is None]
    ttft = sorted(o.ttft_s for o in ok if o.ttft_s is not None)
    e2e = sorted(o.e2e_s for o in ok if o.e2e_s is not None)
    lags = sorted(o.lag_s for o in outcomes)
    per_pod = Counter(o.decision.address for o in outcomes if o.decision.address is not None)
    shares = [per_pod.get(a, 0) / max(1, len(outcomes)) for a in pool.addresses]
    # Distinct adapters each pod served: 4 slots per pod, so above 4 it had to swap.
    served_by_pod: dict[str, set[str]] = {a: set() for a in pool.addresses}
    for outcome, arrival in zip(outcomes, schedule, strict=True):
        if outcome.decision.address is not None:
            served_by_pod[outcome.decision.address].add(arrival.adapter)
    # Where the most popular adapter was served: a policy that never spreads it beyond the
    # pods where it first became resident queues it there while other pods have room.
    top = next(name for name, rank in ranks.items() if rank == 0)
    top_by_pod = Counter(
        o.decision.address
        for o, a in zip(outcomes, schedule, strict=True)
        if a.adapter == top and o.decision.address is not None
    )
    waiting = [w for sample in queue_samples for w in sample if w >= 0]
    worst_queue = [max(s) for s in queue_samples if s]
    sims_cpu: float | None = None
    if None not in sim_cpu_before and None not in sim_cpu_after:
        sims_cpu = sum(a or 0.0 for a in sim_cpu_after) - sum(b or 0.0 for b in sim_cpu_before)
    errors = Counter(o.error for o in outcomes if o.error is not None)
    result: dict[str, Any] = {
        "policy": policy.name,
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": len(outcomes) - len(ok),
        "error_kinds": dict(errors.most_common(5)),
        "swaps": round(sum(delta.swaps.values())),
        "swaps_from_disk": round(delta.swaps.get("disk", 0.0)),
        "lora_info_series_at_end": delta.lora_info_series,
        "swaps_per_100_requests": round(100 * sum(delta.swaps.values()) / max(1, len(ok)), 1),
        "ttft_mean_ms": _ms(statistics.fmean(ttft)) if ttft else None,
        "ttft_p50_ms": _ms(percentile(ttft, 0.50)),
        "ttft_p90_ms": _ms(percentile(ttft, 0.90)),
        "ttft_p99_ms": _ms(percentile(ttft, 0.99)),
        "ttft_max_ms": _ms(ttft[-1]) if ttft else None,
        "server_ttft_mean_ms": (
            _ms(delta.ttft_sum / delta.ttft_count) if delta.ttft_count else None
        ),
        "e2e_mean_ms": _ms(statistics.fmean(e2e)) if e2e else None,
        "e2e_p99_ms": _ms(percentile(e2e, 0.99)),
        "achieved_requests_per_second": round(len(ok) / elapsed, 1),
        "elapsed_s": round(elapsed, 1),
        "pod_share_max": round(max(shares), 3),
        "pod_share_min": round(min(shares), 3),
        "top_adapter_requests_by_pod": sorted(
            (top_by_pod.get(address, 0) for address in pool.addresses), reverse=True
        ),
        "adapters_per_pod_mean": round(statistics.fmean(len(s) for s in served_by_pod.values()), 1),
        "waiting_mean": round(statistics.fmean(waiting), 2) if waiting else None,
        "worst_pod_waiting_mean": round(statistics.fmean(worst_queue), 2) if worst_queue else None,
        "client_lag_p99_ms": _ms(percentile(lags, 0.99)),
        "client_cpu_percent": round(100 * own_cpu / elapsed, 1),
        "sims_cpu_percent": None if sims_cpu is None else round(100 * sims_cpu / elapsed, 1),
        "machine_cpu_percent": (
            None
            if machine_before is None or machine_cpu is None
            else round(100 * (machine_cpu - machine_before) / elapsed, 1)
        ),
        "ttft_ms_sorted": [round(v * 1000.0, 2) for v in ttft],  # for the plot; not printed
    }
    result.update(breakdowns(outcomes, schedule, ranks, settings.max_num_seqs))
    if isinstance(policy, ProfilePolicy):
        decisions = sorted(policy.decision_us)
        result["decision_p50_us"] = round(percentile(decisions, 0.5) or 0.0, 1)
        result["decision_p99_us"] = round(percentile(decisions, 0.99) or 0.0, 1)
    return result


def _ttft_stats(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "mean_ms": _ms(statistics.fmean(ordered)) if ordered else None,
        "p99_ms": _ms(percentile(ordered, 0.99)),
    }


def breakdowns(
    outcomes: list[Outcome], schedule: list[Arrival], ranks: dict[str, int], max_num_seqs: int
) -> dict[str, Any]:
    """TTFT split three ways, to tell where a policy's tail comes from:

    - by the affinity the profile saw at decision time (hot, warm, cold);
    - by the chosen pod's state at its last scrape: `queued` (requests waiting), `full`
      (every sequence slot running, none waiting yet), `free`;
    - by the adapter's popularity rank: the top adapter, ranks 2-4, the other ones.
    """
    by_affinity: dict[str, list[float]] = {}
    by_state: dict[str, list[float]] = {}
    by_rank: dict[str, list[float]] = {}
    for outcome, arrival in zip(outcomes, schedule, strict=True):
        if outcome.ttft_s is None:
            continue
        decision = outcome.decision
        if decision.affinity is not None:
            by_affinity.setdefault(decision.affinity, []).append(outcome.ttft_s)
        if decision.waiting is None or decision.running is None:
            state = "unknown"
        elif decision.waiting > 0:
            state = "queued"
        elif decision.running >= max_num_seqs:
            state = "full"
        else:
            state = "free"
        by_state.setdefault(state, []).append(outcome.ttft_s)
        rank = ranks[arrival.adapter]
        group = "top1" if rank == 0 else "top2-4" if rank < 4 else "rest"
        by_rank.setdefault(group, []).append(outcome.ttft_s)
    return {
        "ttft_by_affinity": {k: _ttft_stats(v) for k, v in sorted(by_affinity.items())},
        "ttft_by_pod_state": {k: _ttft_stats(v) for k, v in sorted(by_state.items())},
        "ttft_by_popularity": {k: _ttft_stats(v) for k, v in sorted(by_rank.items())},
    }


def make_policy(
    name: str, profiles: dict[str, str], inventory: Inventory, addresses: list[str], seed: int
) -> Policy:
    if name == "round-robin":
        return RoundRobin(addresses, inventory)
    if name == "random":
        return RandomChoice(addresses, inventory, seed)
    # A fresh pipeline per policy run: its residency memory must start as cold as the pods.
    return ProfilePolicy(name, load_profile(profiles[name], rng=random.Random(seed)), inventory)


async def run_all(
    settings: Settings, policies: list[str], profiles: dict[str, str], rounds: int, work: Path
) -> dict[str, Any]:
    pool = Pool(settings, work)
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address=a) for a in pool.addresses])
    # As `loractl controller` scrapes by default: metrics every 50 ms, models every second.
    scraper = Scraper(inventory, metrics_interval=0.05, models_interval=1.0)
    scraping: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(pool.start)
        scraping = asyncio.create_task(scraper.run())
        await wait_fresh(inventory, set(adapter_names(settings.adapters)))
        async with new_session() as session:
            capacity = await measure_capacity(
                pool, settings, session, warmup=2.0, window=max(4.0, 4 * settings.time_scale)
            )
        if capacity["errors"] or not capacity["requests_per_second"]:
            raise RuntimeError(f"capacity measurement failed: {capacity}")
        rate = settings.rate or settings.load * capacity["requests_per_second"]
        schedule = arrivals(settings, rate)
        ranks = popularity_ranks(settings)
        runs = []
        for index in range(rounds):
            # Every other round in reverse order (ABBA): a drift of the shared machine then
            # weighs on every policy alike instead of on whichever runs last.
            for name in policies if index % 2 == 0 else policies[::-1]:
                policy = make_policy(name, profiles, inventory, pool.addresses, settings.seed)
                print(f"  round {index}: {name} ...", file=sys.stderr)
                run = await run_policy(policy, pool, inventory, schedule, ranks, settings)
                run["round"] = index
                print(
                    f"  round {index}: {name}: swaps {run['swaps']}, TTFT mean "
                    f"{run['ttft_mean_ms']} p99 {run['ttft_p99_ms']} ms, errors {run['errors']}",
                    file=sys.stderr,
                )
                runs.append(run)
    finally:
        scraper.stop()
        if scraping is not None:
            await asyncio.gather(scraping, return_exceptions=True)
        await asyncio.to_thread(pool.stop)
    results = [aggregate(name, [r for r in runs if r["policy"] == name]) for name in policies]
    popularity = zipf_weights(settings.adapters, settings.zipf)
    return {
        "benchmark": "routing_quality",
        "settings": dataclasses.asdict(settings),
        "capacity": capacity,
        "arrival_rate_per_second": round(rate, 1),
        "top_adapter_share": round(popularity[0], 3),
        "top4_adapter_share": round(sum(popularity[:4]), 3),
        "rounds": rounds,
        "policies": results,
        "runs": runs,
        "ratios_vs_upstream": ratios(results),
        "errors": sum(r["errors"] for r in runs),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
    }


def aggregate(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A policy over all its rounds: TTFT percentiles over the pooled requests, counts summed
    and divided by the rounds (per run), everything else the mean of the runs."""
    if len(runs) == 1:
        return runs[0]
    pooled = sorted(v for r in runs for v in r["ttft_ms_sorted"])
    out: dict[str, Any] = {"policy": name, "round": "all"}
    for key, value in runs[0].items():
        if key in out or key == "ttft_ms_sorted":
            continue
        values = [r[key] for r in runs]
        if isinstance(value, int | float) and not isinstance(value, bool):
            known = [v for v in values if v is not None]
            out[key] = round(statistics.fmean(known), 3) if known else None
        elif key == "error_kinds":
            total: Counter[str] = Counter()
            for v in values:
                total.update(v)
            out[key] = dict(total)
        # Breakdowns stay per run (in "runs"): averaging percentiles of groups would mislead.
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["completed"] = sum(r["completed"] for r in runs)
    out["ttft_mean_ms"] = round(statistics.fmean(pooled), 1) if pooled else None
    for key, fraction in (("ttft_p50_ms", 0.5), ("ttft_p90_ms", 0.9), ("ttft_p99_ms", 0.99)):
        out[key] = percentile(pooled, fraction)
    out["ttft_max_ms"] = pooled[-1] if pooled else None
    out["swaps_by_round"] = [r["swaps"] for r in runs]
    out["ttft_p99_ms_by_round"] = [r["ttft_p99_ms"] for r in runs]
    out["ttft_mean_ms_by_round"] = [r["ttft_mean_ms"] for r in runs]
    out["ttft_ms_sorted"] = pooled
    return out


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each policy against upstream: swaps, mean and p99 TTFT as fractions of upstream's."""
    upstream = next((r for r in results if r["policy"] == "upstream"), None)
    if upstream is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for r in results:
        row: dict[str, float | None] = {}
        for key in ("swaps", "ttft_mean_ms", "ttft_p99_ms"):
            mine, theirs = r[key], upstream[key]
            row[key] = None if mine is None or not theirs else round(mine / theirs, 3)
        out[r["policy"]] = row
    return out


# --- report ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(summary: dict[str, Any]) -> None:
    capacity = summary["capacity"]
    print(
        f"capacity (base model, closed loop, {capacity['concurrency']} connections): "
        f"{capacity['requests_per_second']} req/s measured, "
        f"{capacity['derived_requests_per_second']} derived; arrivals "
        f"{summary['arrival_rate_per_second']} req/s (Poisson"
        f"{', fixed by --rate' if summary['settings']['rate'] else ''}), "
        f"{summary['settings']['requests']} requests; top adapter "
        f"{100 * summary['top_adapter_share']:.0f} % of requests, top 4 "
        f"{100 * summary['top4_adapter_share']:.0f} %"
    )
    columns = [
        ("policy", "policy", 12),
        ("swaps", "swaps", 6),
        ("swaps/100", "swaps_per_100_requests", 9),
        ("TTFT mean", "ttft_mean_ms", 9),
        ("p50", "ttft_p50_ms", 7),
        ("p90", "ttft_p90_ms", 7),
        ("p99", "ttft_p99_ms", 8),
        ("sim mean", "server_ttft_mean_ms", 8),
        ("e2e mean", "e2e_mean_ms", 8),
        ("err", "errors", 4),
        ("pod max/min", None, 11),
        ("adapt/pod", "adapters_per_pod_mean", 9),
        ("wait avg", "waiting_mean", 8),
        ("lag p99", "client_lag_p99_ms", 7),
        ("CPU cli/sims/all %", None, 18),
    ]

    def show(rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> None:
        print(" ".join(f"{title:>{width}}" for title, _, width in columns))
        for r in rows:
            values = cells(r, label(r))
            print(" ".join(f"{v:>{w}}" for v, (_, _, w) in zip(values, columns, strict=True)))

    def cells(r: dict[str, Any], name: str) -> list[str]:
        out = []
        for title, key, _ in columns:
            if title == "policy":
                value = name
            elif title == "pod max/min":
                value = f"{100 * r['pod_share_max']:.0f}/{100 * r['pod_share_min']:.0f} %"
            elif key is None:
                value = (
                    f"{_fmt(r['client_cpu_percent'])}/{_fmt(r['sims_cpu_percent'])}/"
                    f"{_fmt(r['machine_cpu_percent'])}"
                )
            else:
                value = _fmt(r[key])
            out.append(value)
        return out

    runs = summary["runs"]
    several = summary["rounds"] > 1
    show(runs, lambda r: f"{r['policy']}#{r['round']}" if several else r["policy"])
    if several:
        print("all rounds: TTFT over the pooled requests; the other columns are means per run")
        show(summary["policies"], lambda r: r["policy"])
    print("TTFT mean / p99 ms (requests) by affinity at decision | pod state | popularity:")
    for r in runs:
        parts = []
        for key in ("ttft_by_affinity", "ttft_by_pod_state", "ttft_by_popularity"):
            parts.append(
                " ".join(
                    f"{group} {_fmt(v['mean_ms'])}/{_fmt(v['p99_ms'])} ({v['n']})"
                    for group, v in r[key].items()
                )
            )
        name = f"{r['policy']}#{r['round']}"
        decision = (
            f" decide p50/p99 {r['decision_p50_us']}/{r['decision_p99_us']} us"
            if ("decision_p50_us" in r)
            else ""
        )
        print(f"  {name:<14} " + " | ".join(p or "-" for p in parts) + decision)
    print("requests for the most popular adapter, per pod (most first):")
    for r in runs:
        print(f"  {r['policy'] + '#' + str(r['round']):<14} {r['top_adapter_requests_by_pod']}")
    for name, row in summary["ratios_vs_upstream"].items():
        print(
            f"{name} / upstream: swaps {_fmt(row['swaps'])}, TTFT mean "
            f"{_fmt(row['ttft_mean_ms'])}, TTFT p99 {_fmt(row['ttft_p99_ms'])}"
        )


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Swaps, TTFT and the TTFT distribution per policy; False when matplotlib is missing.

    matplotlib is not a dependency of loractl: the plot is a convenience for the results
    page, and the benchmark's figures are all in the table and the JSON line.
    """
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")  # no display here
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        from matplotlib.ticker import (  # type: ignore[import-not-found, unused-ignore]
            NullFormatter,
        )
    except ImportError:
        return False
    results = summary["policies"]
    names = [r["policy"] for r in results]
    colors = [f"C{i}" for i in range(len(names))]
    figure, (swaps_ax, ttft_ax, cdf_ax) = plt.subplots(1, 3, figsize=(16, 5))
    swaps_ax.bar(names, [r["swaps"] for r in results], color=colors)
    swaps_ax.set_title("adapter swaps, all pods (mean per run)")
    swaps_ax.set_ylabel("swaps")
    x = list(range(len(names)))
    width = 0.38
    ttft_ax.bar(
        [i - width / 2 for i in x], [r["ttft_mean_ms"] or 0 for r in results], width, label="mean"
    )
    ttft_ax.bar(
        [i + width / 2 for i in x], [r["ttft_p99_ms"] or 0 for r in results], width, label="p99"
    )
    ttft_ax.set_xticks(x, names)
    ttft_ax.set_title("time to first token, client side (all runs pooled)")
    ttft_ax.set_ylabel("ms")
    ttft_ax.legend()
    for r, color in zip(results, colors, strict=True):
        values = r["ttft_ms_sorted"]
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            cdf_ax.plot(values, fractions, label=r["policy"], color=color)
    cdf_ax.set_xscale("log")
    # Plain numbers at round values: matplotlib's log labels (2x10^2, ...) overlap here.
    longest = max((r["ttft_ms_sorted"][-1] for r in results if r["ttft_ms_sorted"]), default=1.0)
    ticks = [t for t in (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if t <= 1.5 * longest]
    cdf_ax.set_xticks(ticks, [str(t) for t in ticks])
    cdf_ax.xaxis.set_minor_formatter(NullFormatter())
    cdf_ax.set_xlabel("TTFT ms (log)")
    cdf_ax.set_ylabel("fraction of requests")
    cdf_ax.set_title("TTFT distribution")
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend()
    s = summary["settings"]
    pace = "a fixed rate" if s["rate"] else f"{100 * s['load']:.0f} % of capacity"
    figure.suptitle(
        f"{s['sims']} pods x {s['max_loras']} LoRA slots, {s['adapters']} adapters "
        f"(Zipf s={s['zipf']}), Poisson at {pace} "
        f"({summary['arrival_rate_per_second']} req/s), {s['requests']} requests x "
        f"{summary['rounds']} round(s), seed {s['seed']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --- command line ---------------------------------------------------------------------


def _profile_entry(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Adapter swaps and TTFT of routing policies on simulators with swap costs."
    )
    pool = parser.add_argument_group("pool")
    pool.add_argument("--sims", type=int, default=8)
    pool.add_argument("--adapters", type=int, default=32)
    pool.add_argument("--max-loras", type=int, default=4)
    pool.add_argument("--max-cpu-loras", type=int, default=64)
    pool.add_argument("--max-num-seqs", type=int, default=8)
    pool.add_argument("--swap-in-ms", type=float, default=50.0)
    pool.add_argument("--disk-load-ms", type=float, default=200.0)
    pool.add_argument("--inter-token-ms", type=float, default=25.0)
    pool.add_argument("--prefill-ms-per-token", type=float, default=0.2)
    pool.add_argument("--time-scale", type=float, default=1.0)
    load = parser.add_argument_group("workload")
    load.add_argument("--requests", type=int, default=2400, help="requests per policy")
    load.add_argument("--load", type=float, default=0.7, help="arrival rate / capacity")
    load.add_argument(
        "--rate",
        type=float,
        help="fixed arrival rate in requests per second, instead of --load x the measured capacity",
    )
    load.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--prompt-words", type=int, default=128)
    load.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma-separated, run in this order: ours, upstream, round-robin, random, "
        "or a --profile name",
    )
    parser.add_argument(
        "--profile",
        type=_profile_entry,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra policy: a scheduling profile YAML (repeatable); add NAME to --policies",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every policy, order reversed every round"
    )
    parser.add_argument("--plot", type=Path, help="write a PNG here (needs matplotlib)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if not 1 <= args.sims <= 200:
        parser.error("--sims must be in [1, 200]")
    if not 1 <= args.adapters <= 1000:
        parser.error("--adapters must be in [1, 1000]")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be in [1, 10]")
    if len(set(args.policies.split(","))) != len(args.policies.split(",")):
        parser.error("--policies: each policy once (use --rounds to repeat)")
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be in [1, 100000]")
    if not 0 < args.load <= 2:
        parser.error("--load must be in (0, 2]")
    if args.rate is not None and not 0 < args.rate <= 10_000:
        parser.error("--rate must be in (0, 10000]")
    if not 0 < args.time_scale <= 10:
        parser.error("--time-scale must be in (0, 10]: 0 would remove the costs under test")
    if args.max_tokens < 1 or args.prompt_words < 1:
        parser.error("--max-tokens and --prompt-words must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The in-process scraper logs every restart's refused connections as warnings, on stdout
    # by default; only errors (a crashed scrape loop) matter here, and stdout is the report.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # run the finally blocks: stop the pool
    profiles = dict(BUILT_IN_PROFILES)
    for name, path in args.profile:
        profiles[name] = path.read_text()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in profiles and p not in TRIVIAL_POLICIES]
    if unknown:
        print(f"unknown policies {unknown}: give a --profile NAME=PATH for each", file=sys.stderr)
        return 2
    for name in policies:
        if name in profiles:
            load_profile(profiles[name])  # fail now on a bad YAML, not after minutes of load
    settings = Settings(
        sims=args.sims,
        adapters=args.adapters,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=args.max_num_seqs,
        swap_in_ms=args.swap_in_ms,
        disk_load_ms=args.disk_load_ms,
        inter_token_ms=args.inter_token_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        time_scale=args.time_scale,
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        zipf=args.zipf,
        load=args.load,
        requests=args.requests,
        seed=args.seed,
        rate=args.rate,
    )
    with tempfile.TemporaryDirectory(prefix="routing-quality-") as tmp:
        summary = asyncio.run(run_all(settings, policies, profiles, args.rounds, Path(tmp)))
    if args.plot is not None:
        if plot(summary, args.plot):
            print(f"plot written to {args.plot}", file=sys.stderr)
        else:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    if not args.json_only:
        print_table(summary)
    compact = {
        **summary,
        "policies": [
            {k: v for k, v in r.items() if k != "ttft_ms_sorted"} for r in summary["policies"]
        ],
        "runs": [{k: v for k, v in r.items() if k != "ttft_ms_sorted"} for r in summary["runs"]],
    }
    print(json.dumps(compact))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
