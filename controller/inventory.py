"""The adapter inventory: what every endpoint (vLLM pod) is doing, as last observed.

One store, shared by the picker (which routes on it) and the controller (which
gates canaries on it). Scrapers write observations in; readers take a
consistent snapshot. Figures older than their staleness bound read as unknown
(None), never as a trusted old value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Final

from sidecar.status import AdapterState

_LOADED: Final = AdapterState.LOADED.value
_NOTHING: Final[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class MetricsObservation:
    """From vLLM's /metrics."""

    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    max_lora: int | None  # from lora_requests_info's max_lora label
    running_adapters: frozenset[str]  # adapters with requests in flight (latest label set)
    waiting_adapters: frozenset[str]
    gpu_adapters: frozenset[str] | None  # vllm:lora_adapter_loaded{level="gpu"}, when exported
    cpu_adapters: frozenset[str] | None  # vllm:lora_adapter_loaded{level="cpu"}, when exported
    last_busy_running: frozenset[str] = frozenset()
    """Running adapters of the newest label set that had any adapter in it: the upstream
    picker reads lora_requests_info this way (idle label sets ignored)."""
    last_busy_waiting: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Endpoint:
    """One serving address. `address` is what goes into x-gateway-destination-endpoint."""

    address: str  # "ip:port"
    pod: str | None = None
    namespace: str | None = None
    ready: bool = True
    sidecar_url: str | None = None  # e.g. "http://10.0.0.7:8080"; None = no sidecar known

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass(frozen=True)
class EndpointView:
    """A snapshot of one endpoint for scheduling; None means unknown or stale.

    The fields after `sidecar_states` are derived from the others when the view is built:
    the inventory builds a view only when an observation changes, while the scheduler reads
    them for every endpoint of every request.
    """

    endpoint: Endpoint
    metrics: MetricsObservation | None
    registered: frozenset[str] | None  # LoRA names in vLLM's /v1/models
    sidecar_states: dict[str, str] | None  # adapter id → sidecar state (loaded, failed, ...)
    address: str = field(init=False, repr=False, compare=False)
    ready: bool = field(init=False, repr=False, compare=False)
    loaded: frozenset[str] = field(init=False, repr=False, compare=False)
    """Adapters known registered: listed by vLLM's model list, or loaded per the sidecar."""

    def __post_init__(self) -> None:
        loaded = self.registered or _NOTHING
        if self.sidecar_states:
            sidecar_loaded = [a for a, state in self.sidecar_states.items() if state == _LOADED]
            if not loaded.issuperset(sidecar_loaded):
                loaded = loaded.union(sidecar_loaded)
        # Frozen: the derived fields are set once, here, like the others at construction.
        object.__setattr__(self, "address", self.endpoint.address)
        object.__setattr__(self, "ready", self.endpoint.ready)
        object.__setattr__(self, "loaded", loaded)


@dataclass
class _Observed:
    endpoint: Endpoint
    metrics: MetricsObservation | None = None
    metrics_at: float = 0.0
    registered: frozenset[str] | None = None
    registered_at: float = 0.0
    sidecar_states: dict[str, str] | None = None
    sidecar_at: float = 0.0
    scrape_errors: dict[str, str] = field(default_factory=dict)
    # The last view built, and which observations were fresh in it: the picker takes a
    # snapshot per request, and rebuilding unchanged views would dominate its cost.
    view: EndpointView | None = None
    view_freshness: tuple[bool, bool, bool] = (False, False, False)


# Missed scrapes in a row before an observation counts as unknown. /metrics gets more
# slack: vLLM answers it from the API server, which a burst of requests can hold up.
METRICS_STALE_AFTER = 10
OTHERS_STALE_AFTER = 5


@dataclass(frozen=True)
class Staleness:
    """How old each kind of observation may be before it counts as unknown (seconds)."""

    metrics: float = 0.5
    models: float = 5.0
    sidecar: float = 5.0

    @classmethod
    def for_intervals(cls, metrics: float, models: float, sidecar: float) -> Staleness:
        """Bounds that follow the scrape intervals, so that a longer interval never leaves
        figures unknown between two good scrapes; the defaults at the default intervals."""
        return cls(
            metrics=METRICS_STALE_AFTER * metrics,
            models=OTHERS_STALE_AFTER * models,
            sidecar=OTHERS_STALE_AFTER * sidecar,
        )


class Inventory:
    def __init__(self, staleness: Staleness | None = None) -> None:
        self.staleness = staleness or Staleness()
        self._observed: dict[str, _Observed] = {}

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Replace the endpoint set; observations of endpoints that stay are kept."""
        current = {}
        for endpoint in endpoints:
            known = self._observed.get(endpoint.address)
            current[endpoint.address] = (
                _Observed(endpoint)
                if known is None
                else replace(known, endpoint=endpoint, view=None)
            )
        self._observed = current

    def endpoints(self) -> list[Endpoint]:
        return [o.endpoint for o in self._observed.values()]

    def record_metrics(self, address: str, metrics: MetricsObservation) -> None:
        if (observed := self._observed.get(address)) is not None:
            observed.metrics, observed.metrics_at = metrics, time.monotonic()
            observed.scrape_errors.pop("metrics", None)
            observed.view = None

    def record_registered(self, address: str, adapters: frozenset[str]) -> None:
        if (observed := self._observed.get(address)) is not None:
            observed.registered, observed.registered_at = adapters, time.monotonic()
            observed.scrape_errors.pop("models", None)
            observed.view = None

    def record_sidecar(self, address: str, states: dict[str, str]) -> None:
        if (observed := self._observed.get(address)) is not None:
            observed.sidecar_states, observed.sidecar_at = dict(states), time.monotonic()
            observed.scrape_errors.pop("sidecar", None)
            observed.view = None

    def record_error(self, address: str, source: str, error: str) -> None:
        """source: "metrics", "models" or "sidecar"."""
        if (observed := self._observed.get(address)) is not None:
            observed.scrape_errors[source] = error

    def snapshot(self, now: float | None = None) -> list[EndpointView]:
        now = time.monotonic() if now is None else now
        limits = self.staleness
        views = []
        for o in self._observed.values():
            freshness = (
                now - o.metrics_at <= limits.metrics,
                now - o.registered_at <= limits.models,
                now - o.sidecar_at <= limits.sidecar,
            )
            if o.view is None or freshness != o.view_freshness:
                o.view = EndpointView(
                    endpoint=o.endpoint,
                    metrics=o.metrics if freshness[0] else None,
                    registered=o.registered if freshness[1] else None,
                    sidecar_states=o.sidecar_states if freshness[2] else None,
                )
                o.view_freshness = freshness
            views.append(o.view)
        return views

    def errors(self) -> dict[str, dict[str, str]]:
        return {a: dict(o.scrape_errors) for a, o in self._observed.items() if o.scrape_errors}
