"""Sidecar metrics. Names are documented in the README; keep the two in step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.status import AdapterRecord, AdapterState

OPERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class SidecarMetrics:
    def __init__(self, records: Callable[[], Iterable[AdapterRecord]]) -> None:
        self.registry = CollectorRegistry()
        self.load_duration = Histogram(
            "loractl_sidecar_load_duration_seconds",
            "Time vLLM took to answer a load_lora_adapter call, successful or not.",
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.unload_duration = Histogram(
            "loractl_sidecar_unload_duration_seconds",
            "Time vLLM took to answer an unload_lora_adapter call.",
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.download_duration = Histogram(
            "loractl_sidecar_download_duration_seconds",
            "Time to make an adapter available on local disk and verify it.",
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "loractl_sidecar_failures",
            "Failed adapter operations by adapter and reason "
            "(configuration, bad_artifact, transient, invalid_spec).",
            ["adapter_name", "reason"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "loractl_sidecar_reconcile_duration_seconds",
            "Time to read the config, observe vLLM and plan (operations run on their own).",
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.config_errors = Counter(
            "loractl_sidecar_config_errors",
            "Config documents rejected whole (YAML syntax or schema); the last good one is kept.",
            registry=self.registry,
        )
        self.config_generation = Gauge(
            "loractl_sidecar_config_generation",
            "Increments each time a changed, valid config is accepted.",
            registry=self.registry,
        )
        self.config_valid = Gauge(
            "loractl_sidecar_config_valid",
            "1 when the current config document was accepted, 0 when it was rejected.",
            registry=self.registry,
        )
        self.vllm_reachable = Gauge(
            "loractl_sidecar_vllm_reachable",
            "1 when vLLM answered the last probe, 0 otherwise.",
            registry=self.registry,
        )
        self.registry.register(_RecordCollector(records))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RecordCollector(Collector):
    """Adapter state gauges, computed from the records at scrape time so they cannot drift."""

    def __init__(self, records: Callable[[], Iterable[AdapterRecord]]) -> None:
        self._records = records

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "loractl_sidecar_adapter_state",
            "1 for the adapter's current state, 0 for the others.",
            labels=["adapter_name", "state"],
        )
        upstream = GaugeMetricFamily(
            "lora_syncer_adapter_status",
            "Status of LoRA adapters (1=loaded, 0=not_loaded); same as the upstream lora-syncer.",
            labels=["adapter_name"],
        )
        for record in self._records():
            for candidate in AdapterState:
                state.add_metric([record.id, candidate.value], float(record.state is candidate))
            upstream.add_metric([record.id], float(record.state is AdapterState.LOADED))
        yield state
        yield upstream
