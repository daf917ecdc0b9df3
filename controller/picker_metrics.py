"""The picker's Prometheus metrics. Names are documented in the README; keep them in step."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.extproc.outcomes import HOW_REPORTED, Outcomes
from controller.inventory import Inventory

SCHEDULING_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
RESPONSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PickerMetrics:
    def __init__(self, registry: CollectorRegistry, inventory: Inventory) -> None:
        self.requests = Counter(
            "loractl_picker_requests",
            "Requests by model, target and result (routed, bad_request, unknown_model, starting, "
            "shed, no_endpoint).",
            ["model", "target", "result"],
            registry=registry,
        )
        self.scheduling_duration = Histogram(
            "loractl_picker_scheduling_duration_seconds",
            "Time to decide one request: parse, resolve, schedule, rewrite.",
            buckets=SCHEDULING_BUCKETS,
            registry=registry,
        )
        self.affinity = Counter(
            "loractl_picker_affinity",
            "Where the target adapter stood on the chosen pod: hot (in a GPU slot), warm "
            "(registered, free slot), cold (registered, must evict), missing, base.",
            ["outcome"],
            registry=registry,
        )
        self.sheds = Counter(
            "loractl_picker_sheds",
            "Sheddable requests refused with 429 because the pool was saturated.",
            ["model"],
            registry=registry,
        )
        self.responses = Counter(
            "loractl_picker_responses",
            "Outcomes of routed requests, by status class (none = no answer).",
            ["model", "target", "code"],
            registry=registry,
        )
        self.response_duration = Histogram(
            "loractl_picker_response_duration_seconds",
            "To the first byte of the answer (for SSE: time to first token), from Envoy's "
            "access log or from the response headers on the ext_proc stream.",
            ["model", "target"],
            buckets=RESPONSE_BUCKETS,
            registry=registry,
        )
        registry.register(_EndpointCollector(inventory))


class _EndpointCollector(Collector):
    """Per-endpoint figures straight from the inventory, at scrape time."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "loractl_picker_endpoint_queue",
            "vLLM waiting requests (unknown: absent).",
            labels=["endpoint"],
        )
        running = GaugeMetricFamily(
            "loractl_picker_endpoint_running", "vLLM running requests.", labels=["endpoint"]
        )
        kv = GaugeMetricFamily(
            "loractl_picker_endpoint_kv_cache_usage",
            "vLLM KV-cache use, 0..1.",
            labels=["endpoint"],
        )
        adapters = GaugeMetricFamily(
            "loractl_picker_endpoint_adapters",
            "LoRA adapters registered on the endpoint.",
            labels=["endpoint"],
        )
        for view in self._inventory.snapshot():
            if view.metrics is not None:
                queue.add_metric([view.address], view.metrics.waiting)
                running.add_metric([view.address], view.metrics.running)
                kv.add_metric([view.address], view.metrics.kv_cache_usage)
            if view.registered is not None:
                adapters.add_metric([view.address], len(view.registered))
        yield from (queue, running, kv, adapters)


class OutcomeCollector(Collector):
    """How routed requests' outcomes reached the picker, and how many are still awaited."""

    def __init__(self, outcomes: Outcomes) -> None:
        self._outcomes = outcomes

    def collect(self) -> Iterator[Metric]:
        reported = CounterMetricFamily(
            "loractl_picker_outcomes",
            "Routed requests by how their outcome came: response_headers, access_log, "
            "timed_out (neither within the grace: status 0), forgotten (never, after an hour).",
            labels=["how"],
        )
        for how in HOW_REPORTED:
            reported.add_metric([how], self._outcomes.counts[how])
        pending = GaugeMetricFamily(
            "loractl_picker_outcomes_pending",
            "Routed requests whose outcome has not come yet.",
            value=len(self._outcomes),
        )
        yield from (reported, pending)
