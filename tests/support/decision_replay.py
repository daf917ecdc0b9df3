"""A seeded stream of scheduling decisions, printed one JSON line each: run under two
builds of the project (tests/support/builds.py), the outputs must be identical.

The workload walks through what changes a decision: scrapes (new metrics and model-list
objects, equal or not), registrations that come and go (vLLM's list and the sidecar's
word), endpoints without fresh metrics or turning unready, subset hints, base-model and
unknown-adapter requests, Sheddable requests against a saturated pool, endpoints leaving
the pool, and jumps in time past the residency tracker's memory. Both profiles, at 8 and
64 endpoints.

    python -m tests.support.decision_replay [--decisions 1500] [--seed 1]

The first line says whether the decision path ran compiled.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Sequence

from controller.inventory import Endpoint, EndpointView, MetricsObservation
from controller.scheduling import compiled
from controller.scheduling.pipeline import Pipeline
from controller.scheduling.profile import DEFAULT_PROFILE, UPSTREAM_PROFILE, load_profile
from controller.scheduling.types import Criticality, SchedulingRequest

ADAPTERS = [f"adapter-{i:02d}" for i in range(24)]
BASE = "base"


class Pool:
    """Endpoints whose observations change at random, as scrapes would change them."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.addresses = [f"10.0.0.{index + 1}:8000" for index in range(size)]
        self.registered = [set(rng.sample(ADAPTERS, rng.randint(4, 12))) for _ in range(size)]
        self.views = [self.observe(index) for index in range(size)]

    def observe(self, index: int) -> EndpointView:
        rng, names = self.rng, sorted(self.registered[index])
        metrics = None
        if rng.random() > 0.05:  # a missed scrape now and then
            saturated = rng.random() < 0.1
            metrics = MetricsObservation(
                running=rng.randint(0, 12),
                waiting=rng.randint(6, 9) if saturated else rng.choice([0, 0, 0, 1, 2, 4]),
                kv_cache_usage=round(rng.uniform(0.0, 0.95), 3),
                max_lora=rng.choice([None, 2, 4]),
                running_adapters=frozenset(rng.sample(names, min(len(names), rng.randint(0, 3)))),
                waiting_adapters=frozenset(rng.sample(names, min(len(names), rng.randint(0, 1)))),
                gpu_adapters=frozenset(names[:2]) if rng.random() < 0.1 else None,
                cpu_adapters=None,
                last_busy_running=frozenset(names[:1]),
            )
        listed = rng.random() > 0.1  # no fresh model list now and then
        sidecar = None
        if rng.random() < 0.5:
            sidecar = {name: "loaded" for name in names}
            if names and rng.random() < 0.3:
                sidecar[names[0]] = rng.choice(["loading", "failed"])
        return EndpointView(
            endpoint=Endpoint(self.addresses[index], ready=rng.random() > 0.03),
            metrics=metrics,
            registered=frozenset(names) if listed else None,
            sidecar_states=sidecar,
        )

    def step(self) -> None:
        """Between two decisions: a scrape of a few endpoints, sometimes a registration."""
        rng = self.rng
        count = len(self.views)
        for index in rng.sample(range(count), min(count, rng.randint(0, 3))):
            if rng.random() < 0.1:
                self.registered[index] ^= {rng.choice(ADAPTERS)}
            self.views[index] = self.observe(index)

    def remove(self, index: int) -> None:
        del self.addresses[index], self.registered[index], self.views[index]


def requests(rng: random.Random) -> Iterator[SchedulingRequest]:
    popularity = [1.0 / (rank + 1) for rank in range(len(ADAPTERS))]
    while True:
        draw = rng.random()
        if draw < 0.1:
            target, is_adapter = BASE, False
        elif draw < 0.13:
            target, is_adapter = "adapter-unknown", True
        else:
            target, is_adapter = rng.choices(ADAPTERS, popularity)[0], True
        subset = None
        if rng.random() < 0.1:
            subset = frozenset(f"10.0.0.{i}:8000" for i in rng.sample(range(1, 9), 3))
        criticality = rng.choice(list(Criticality))
        yield SchedulingRequest(target, target, is_adapter, criticality, subset)


def replay(pipeline: Pipeline, size: int, decisions: int, seed: int) -> Iterator[object]:
    rng = random.Random(seed)
    pool = Pool(rng, size)
    now = 1000.0
    for _, request in zip(range(decisions), requests(rng), strict=False):
        pool.step()
        now += rng.choice([0.001, 0.01, 0.2]) if rng.random() > 0.01 else 400.0
        if rng.random() < 0.005:
            pipeline.residency.forget(rng.choice(pool.views).address)
        if rng.random() < 0.005 and len(pool.views) > 2:  # an endpoint leaves the pool
            pool.remove(rng.randrange(len(pool.views)))
        if pipeline.should_shed(request, pool.views):
            yield ["shed", request.target]
            continue
        result = pipeline.schedule(request, pool.views, now)
        yield [
            request.target,
            [view.address for view in result.endpoints],
            result.affinity.value,
            {address: sorted(scores.items()) for address, scores in result.scores.items()},
        ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--decisions", type=int, default=1500, help="per profile and size")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps({"compiled": compiled()}))
    for name, profile in (("ours", DEFAULT_PROFILE), ("upstream", UPSTREAM_PROFILE)):
        for size in (8, 64):
            pipeline = load_profile(profile, rng=random.Random(args.seed))
            for decision in replay(pipeline, size, args.decisions, args.seed):
                # json writes floats by repr, every bit of them: the builds must agree exactly.
                print(json.dumps([name, size, decision]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
