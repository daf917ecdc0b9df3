"""How long one scheduling decision takes: Pipeline.schedule() latency, in process.

For 8, 64 and 256 endpoints serving 100 adapters, each profile (ours and the upstream
re-implementation) schedules a stream of adapter requests against inventory snapshots
built the way the picker sees them. Each endpoint registers 20 adapters drawn by
popularity (Zipf, s = 1), so popular adapters live on most endpoints and the tail on a
few, so the adapter-registered filter keeps a different share for each target.
Request targets follow the same popularity. Each endpoint is scraped once every 200
decisions, staggered as independent scrapers would be: before a decision, the views of
the endpoints due get new metrics and model-list objects, outside the timed region.

Each call is timed alone with perf_counter_ns, garbage collector enabled, as in the
picker. The process is pinned to one core when it can be, and every configuration is
measured in several interleaved rounds; the figures are the medians over rounds, which
shared, noisy machines need (one round's p99 moves with whatever else runs). Goal:
p99 <= 50 us at 64 endpoints.

Side by side, the same run measures two builds of the project, each installed by pip
into a temporary directory (tests/support/builds.py): `interpreted` (a plain install)
and `compiled` (LORACTL_COMPILE=1, the container image's build: the decision path
compiled by mypyc). Every round runs each build in a fresh process, in alternating order.

    python -m bench.pick_latency [--iterations 10000] [--rounds 5] [--seed 1]
                                 [--builds interpreted,compiled]

Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from controller.inventory import Endpoint, EndpointView, MetricsObservation
from controller.scheduling import compiled
from controller.scheduling.pipeline import Pipeline
from controller.scheduling.profile import DEFAULT_PROFILE, UPSTREAM_PROFILE, load_profile
from controller.scheduling.types import SchedulingRequest
from tests.support.builds import BUILDS, Build, environment, install

SIZES = (8, 64, 256)
ADAPTERS = [f"adapter-{i:03d}" for i in range(100)]
POPULARITY = [1.0 / (rank + 1) for rank in range(len(ADAPTERS))]
REGISTERED_PER_ENDPOINT = 20
MAX_LORA = 4
SCRAPE_EVERY = 200
WARMUP = 2_000
PROFILES = {"ours": DEFAULT_PROFILE, "upstream": UPSTREAM_PROFILE}
CONFIGURATIONS = [(name, size) for name in PROFILES for size in SIZES]


def zipf_sample(rng: random.Random, count: int) -> list[str]:
    """`count` distinct adapters, more popular ones more likely."""
    chosen: dict[str, None] = {}
    while len(chosen) < count:
        chosen[rng.choices(ADAPTERS, POPULARITY)[0]] = None
    return list(chosen)


def registrations(rng: random.Random, size: int) -> list[list[str]]:
    return [zipf_sample(rng, REGISTERED_PER_ENDPOINT) for _ in range(size)]


def observe(rng: random.Random, index: int, names: list[str]) -> EndpointView:
    """One scrape of one endpoint: fresh metrics and model-list objects."""
    busy = rng.sample(names[:8], rng.randint(0, MAX_LORA))
    queued = rng.random() < 0.3
    metrics = MetricsObservation(
        running=rng.randint(0, 16),
        waiting=rng.randint(1, 6) if queued else 0,
        kv_cache_usage=rng.uniform(0.0, 0.9),
        max_lora=MAX_LORA,
        running_adapters=frozenset(busy),
        waiting_adapters=frozenset(rng.sample(names, 1)) if queued else frozenset(),
        gpu_adapters=None,
        cpu_adapters=None,
    )
    return EndpointView(
        endpoint=Endpoint(address=f"10.0.{index // 250}.{index % 250 + 1}:8000"),
        metrics=metrics,
        registered=frozenset(names),
        sidecar_states=dict.fromkeys(names, "loaded"),
    )


def measure(pipeline: Pipeline, size: int, iterations: int, seed: int) -> list[int]:
    """Nanoseconds per schedule() call, warm-up excluded."""
    rng = random.Random(seed)
    registered = registrations(rng, size)
    targets = rng.choices(ADAPTERS, POPULARITY, k=WARMUP + iterations)
    requests = [SchedulingRequest(model=t, target=t, is_adapter=True) for t in targets]
    views = [observe(rng, index, names) for index, names in enumerate(registered)]
    # Endpoint i is scraped when count % SCRAPE_EVERY == due[i].
    due = [index * SCRAPE_EVERY // size for index in range(size)]
    scraped_at: dict[int, list[int]] = {}
    for index, slot in enumerate(due):
        scraped_at.setdefault(slot, []).append(index)
    durations: list[int] = []
    now = 0.0
    clock = time.perf_counter_ns
    for count, request in enumerate(requests):
        for index in scraped_at.get(count % SCRAPE_EVERY, ()):
            views[index] = observe(rng, index, registered[index])
        now += 0.001
        start = clock()
        pipeline.schedule(request, views, now)
        elapsed = clock() - start
        if count >= WARMUP:
            durations.append(elapsed)
    return durations


def percentile(sorted_values: Sequence[int], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))] / 1000


def round_figures(durations: list[int]) -> dict[str, float]:
    """One round's percentiles, in microseconds."""
    ordered = sorted(durations)
    return {
        "p50_us": percentile(ordered, 0.50),
        "p99_us": percentile(ordered, 0.99),
        "max_us": ordered[-1] / 1000,
    }


def summarise(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The median of each per-round percentile over the rounds, and the best round's p99."""
    return {
        "p50_us": round(statistics.median(r["p50_us"] for r in rounds), 2),
        "p99_us": round(statistics.median(r["p99_us"] for r in rounds), 2),
        "p99_best_round_us": round(min(r["p99_us"] for r in rounds), 2),
        "max_us": round(max(r["max_us"] for r in rounds), 2),
    }


def reference_us() -> float:
    """A fixed pure-Python workload (one 64-element list comprehension), best of many
    runs: figures divided by it compare across machines and interpreter builds."""
    values = [float(i) for i in range(64)]
    timer = timeit.Timer(lambda: [value * 2.0 + 1.0 for value in values])
    return round(min(timer.repeat(repeat=7, number=20_000)) / 20_000 * 1e6, 2)


def pin_to_one_core() -> int | None:
    """Stay on one core, so that the scheduler does not migrate the loop mid-measurement."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def measure_round(iterations: int, seed: int) -> dict[str, object]:
    """One round of every configuration, in this process (the `--child` side)."""
    core = pin_to_one_core()
    figures = {}
    for name, size in CONFIGURATIONS:
        pipeline = load_profile(PROFILES[name], rng=random.Random(seed))
        figures[f"{name}/{size}"] = round_figures(measure(pipeline, size, iterations, seed))
    return {"compiled": compiled(), "core": core, "reference_us": reference_us(), **figures}


def run_round(target: Path, iterations: int, seed: int) -> dict[str, Any]:
    """One round in a fresh process running the build installed in `target`."""
    command = [sys.executable, "-m", "bench.pick_latency", "--child"]
    command += ["--iterations", str(iterations), "--seed", str(seed)]
    done = subprocess.run(
        command, cwd=target, env=environment(target), capture_output=True, text=True, check=True
    )
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=10_000, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--builds", default=",".join(BUILDS), help="comma-separated, in order")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_round(args.iterations, args.seed)))
        return 0
    builds = [cast(Build, b) for b in args.builds.split(",")]
    unknown = sorted(set(builds) - set(BUILDS))
    if unknown:
        parser.error(f"unknown build {unknown[0]!r}; builds: {', '.join(BUILDS)}")

    with tempfile.TemporaryDirectory(prefix="pick-latency-") as workdir:
        targets = {build: install(build, Path(workdir, build)) for build in builds}
        rounds: dict[Build, list[dict[str, Any]]] = {build: [] for build in builds}
        for round_index in range(args.rounds):
            order = builds if round_index % 2 == 0 else builds[::-1]
            for build in order:
                figures = run_round(targets[build], args.iterations, args.seed + round_index)
                if figures["compiled"] != (build == "compiled"):
                    raise SystemExit(f"the {build} build did not run as {build}: {figures}")
                rounds[build].append(figures)

    results = []
    header = f"{'build':<12} {'profile':<9} {'endpoints':>9}"
    print(f"{header} {'p50 us':>8} {'p99 us':>8} {'max us':>9}")
    for build in builds:
        for name, size in CONFIGURATIONS:
            row = {"build": build, "profile": name, "endpoints": size}
            row |= summarise([figures[f"{name}/{size}"] for figures in rounds[build]])
            results.append(row)
            print(
                f"{build:<12} {name:<9} {size:>9} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f}"
                f" {row['max_us']:>9.1f}"
            )
    references = [figures["reference_us"] for build in builds for figures in rounds[build]]
    print(f"reference workload: {min(references)} us (see reference_us)")
    summary = {
        "benchmark": "pick_latency",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "reference_us": min(references),
        "adapters": len(ADAPTERS),
        "iterations": args.iterations,
        "rounds": args.rounds,
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
