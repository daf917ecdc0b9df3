"""Prometheus metrics with vLLM's names, labels and semantics.

Gauges that describe the engine right now (running, waiting, KV use, residency)
are computed at scrape time from the engine itself, so the hot path pays nothing
for them. `vllm:lora_requests_info` keeps vLLM's odd shape: its value is the
time a label set was last seen and old label sets stay exported, and (vLLM 0.32)
both its labels list every adapter with a request in flight, running or waiting,
which is exactly what a LoRA-aware scheduler has to cope with.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from simulator.engine import Engine
from simulator.residency import SwapKind

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
"""vLLM exports every finished_reason series from the start, at 0."""
MAX_LORA_INFO_SERIES = 512
"""vLLM never drops an old label set; we keep the newest ones so memory stays bounded."""


class SimMetrics:
    """Owns the registry; also the engine's observer."""

    def __init__(self, model_name: str, max_loras: int, export_lora_loaded: bool) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name, "engine": "0"}
        self._max_loras = str(max_loras)
        self._export_lora_loaded = export_lora_loaded
        self._lora_info: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._engine: Engine | None = None
        names = list(self._labels)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            names,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**self._labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            names,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(**self._labels)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            names,
            registry=self.registry,
        ).labels(**self._labels)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            names,
            registry=self.registry,
        ).labels(**self._labels)
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISHED_REASONS:
            self.request_success.labels(**self._labels, finished_reason=reason)
        self.swaps = Counter(
            "sim:lora_swaps",
            "Simulator only: adapters moved into a GPU slot, by where they came from "
            "(cpu = the CPU cache, disk = re-read after CPU eviction).",
            ["adapter_name", "source"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(self))

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    def render(self, families: list[str] | None = None) -> bytes:
        """The exposition page; with `families`, only their samples, as prometheus_client's
        own app answers `name[]` (an empty family is then left out)."""
        if families:
            return generate_latest(self.registry.restricted_registry(families))
        return generate_latest(self.registry)

    # EngineObserver
    def on_swap(self, adapter: str, kind: SwapKind) -> None:
        self.swaps.labels(adapter_name=adapter, source=kind.value).inc()

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finished(
        self, seconds: float, prompt_tokens: int, generated: int, finish_reason: str
    ) -> None:
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.request_success.labels(**self._labels, finished_reason=finish_reason).inc()

    def on_activity(self, running: list[str], waiting: list[str]) -> None:
        # vLLM 0.32 keeps one entry per adapter with any request in flight and writes the
        # same names into both labels: "waiting" does not mean "has no GPU slot".
        in_flight = ",".join([*running, *(name for name in waiting if name not in running)])
        key = (in_flight, in_flight)
        self._lora_info[key] = time.time()
        self._lora_info.move_to_end(key)
        while len(self._lora_info) > MAX_LORA_INFO_SERIES:
            self._lora_info.popitem(last=False)

    def collect_engine(self) -> Iterator[Metric]:
        if self._engine is None:
            return
        stats = self._engine.stats()
        names = list(self._labels)
        values = list(self._labels.values())
        for name, doc, value in (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                stats.running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                stats.waiting,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                stats.kv_cache_usage,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason: 'capacity' = waiting for scheduling "
            "capacity; 'deferred' = held back by the LoRA budget.",
            labels=[*names, "reason"],
        )
        by_reason.add_metric([*values, "capacity"], stats.waiting - stats.deferred)
        by_reason.add_metric([*values, "deferred"], stats.deferred)
        yield by_reason
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        for (running, waiting), seen in self._lora_info.items():
            info.add_metric([self._max_loras, running, waiting], seen)
        yield info
        if self._export_lora_loaded:
            loaded = GaugeMetricFamily(
                "vllm:lora_adapter_loaded",
                "LoRA adapters resident in GPU slots or the CPU cache (proposed upstream).",
                labels=["adapter_name", "level"],
            )
            residency = self._engine.residency
            for name in residency.gpu_resident:
                loaded.add_metric([name, "gpu"], 1)
            for name in residency.cpu_resident:
                loaded.add_metric([name, "cpu"], 1)
            yield loaded


# What collect_engine() may yield.
ENGINE_FAMILIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_waiting_by_reason",
    "vllm:lora_requests_info",
    "vllm:lora_adapter_loaded",
)


class _EngineCollector(Collector):
    def __init__(self, metrics: SimMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # Names for the registry: without them a page restricted with `name[]` would leave
        # these families out, where vLLM's (ordinary, named gauges) are in.
        for name in ENGINE_FAMILIES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect_engine()
