"""Keeps the inventory fresh: every endpoint's vLLM /metrics, /v1/models and sidecar /status.

Each (endpoint, source) pair has its own small loop on its own interval, so a slow or dead
endpoint only ever delays itself: there is no round that waits for the slowest answer. At
most one request per pair is in flight, so the shared connection pool needs no cap of its
own (a cap would let a hanging endpoint hold slots that live ones wait for).

A slow answer is waited for up to its source's staleness bound: a vLLM busy enough to
answer /metrics late is the one whose queue the picker most needs to see, and an answer
later than the bound would be stale on arrival. After each scrape the endpoint is left
alone for REST_PER_SCRAPE times what the scrape took, so a slow page is never asked for
back to back.

The HTTP client is aiohttp, not httpx: measured against the simulator on this machine, an
httpx request costs about 0.9 ms of client CPU and an aiohttp one about 0.2 ms, and a
64-pod pool scraped every 50 ms makes 1,280 requests a second.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.inventory import Endpoint, Inventory, MetricsObservation
from controller.vllm_metrics import FAMILIES, MetricsParseError, parse_vllm_metrics

log = structlog.get_logger("controller")

# How often the endpoint set is compared with the running loops. The inventory has no
# change notification, and the comparison costs microseconds.
ENDPOINTS_POLL = 0.05
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# vLLM renders /metrics in its API server, which also serves the requests, and the page only
# grows (vLLM keeps every vllm:lora_requests_info label set it has exported): after each
# scrape, rest this many times what it took, so that this picker holds an endpoint at most
# a quarter of the time, whatever the interval. The rest never exceeds half the staleness
# bound: the time taken includes any stall of this process (a CPU throttled by its quota,
# a paused VM), and resting three times a stall would leave the figures unknown for long.
REST_PER_SCRAPE = 3.0
MAX_REST_SHARE_OF_STALENESS = 0.5
# Slowed scrapes in a row before it is told: a lone slow one is as likely a pause of this
# process (its own measure of the time taken includes it) as the endpoint's doing.
SLOW_SCRAPES_BEFORE_WARNING = 3
# On-schedule scrapes in a row before a slowed pair counts as back to its pace: a slow
# answer now and then among fast ones must not log again and again.
BACK_TO_PACE_AFTER = 20
# Only the families the picker reads: prometheus_client's app honours `name[]`, and the
# page shrinks from vLLM's whole one (53 KB on a fresh server, 3.9 ms a scrape, measured)
# to about 0.5 KB (0.7 ms). vLLM 0.32 answers /metrics through an instrumentator that
# ignores the parameter, with prometheus_client's app mounted behind it at /metrics/ (the
# slash). A server without that route, or whose restricted page lacks the families (a
# registry that cannot restrict, as a multiprocess one may), gets the plain /metrics.
RESTRICTED_PATH = "/metrics/?" + urlencode([("name[]", family) for family in FAMILIES])
NO_SUCH_ROUTE = frozenset({404, 405})


class Source(enum.StrEnum):
    """What is scraped; the values are the inventory's error sources and metric labels."""

    METRICS = "metrics"
    MODELS = "models"
    SIDECAR = "sidecar"


class ScrapeError(ValueError):
    """An answer that arrived but cannot be used."""


class HttpStatusError(ScrapeError):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


Key = tuple[str, Source]  # (endpoint address, source)


class Scraper:
    def __init__(
        self,
        inventory: Inventory,
        *,
        metrics_interval: float = 0.05,
        models_interval: float = 1.0,
        sidecar_interval: float = 1.0,
        timeout: float | None = None,
        api_key: str | None = None,
        sidecar_port: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """timeout: for each request; None = the inventory's staleness bound for its source
        (a later answer would be stale on arrival). api_key goes to vLLM only, never to the
        sidecar. sidecar_port: where to find a sidecar for endpoints that do not name their
        own."""
        self._inventory = inventory
        self._intervals = {
            Source.METRICS: metrics_interval,
            Source.MODELS: models_interval,
            Source.SIDECAR: sidecar_interval,
        }
        stale_after = {
            Source.METRICS: inventory.staleness.metrics,
            Source.MODELS: inventory.staleness.models,
            Source.SIDECAR: inventory.staleness.sidecar,
        }
        self._timeouts = {
            source: aiohttp.ClientTimeout(total=bound if timeout is None else timeout)
            for source, bound in stale_after.items()
        }
        self._max_rests = {
            source: MAX_REST_SHARE_OF_STALENESS * bound for source, bound in stale_after.items()
        }
        # identity: vLLM's metrics app gzips on request, and inflating costs more CPU than
        # the bytes saved on a pod network.
        self._vllm_headers = {"Accept-Encoding": "identity"}
        if api_key:
            self._vllm_headers["Authorization"] = f"Bearer {api_key}"
        self._sidecar_port = sidecar_port
        self._endpoints: dict[str, Endpoint] = {}
        self._unrestricted: set[str] = set()  # endpoints that serve only the whole page
        self._export_loaded: set[str] = set()  # endpoints seen exporting lora_adapter_loaded
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._health = _Health(registry)
        self._stopping = False

    async def run(self) -> None:
        """Scrapes until stop(), following the inventory's endpoint set as it changes.
        Runs once: a stopped scraper is not restarted."""
        connector = aiohttp.TCPConnector(limit=0)  # bounded by one request per pair
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                while not self._stopping:
                    self._follow_endpoints(session)
                    await asyncio.sleep(ENDPOINTS_POLL)
            finally:
                await self._cancel_all()

    def stop(self) -> None:
        """run() returns within ENDPOINTS_POLL."""
        self._stopping = True

    def _follow_endpoints(self, session: aiohttp.ClientSession) -> None:
        self._endpoints = {e.address: e for e in self._inventory.endpoints()}
        wanted = {
            (address, source)
            for address, endpoint in self._endpoints.items()
            for source in Source
            if source is not Source.SIDECAR or self._sidecar_url(endpoint) is not None
        }
        if gone := self._tasks.keys() - wanted:
            for key in gone:
                self._tasks.pop(key).cancel()
                self._health.forget(key)
            # An address that left may come back as another server.
            self._unrestricted &= self._endpoints.keys()
            self._export_loaded &= self._endpoints.keys()
        for key in wanted:
            task = self._tasks.get(key)
            # A finished task can only have died of a bug (logged by _poll): start it again.
            if task is None or task.done():
                self._health.track(key)
                poll = self._poll(key, session)
                self._tasks[key] = asyncio.create_task(poll, name=f"scrape {key}")

    async def _cancel_all(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self, key: Key, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        interval, max_rest = self._intervals[key[1]], self._max_rests[key[1]]
        # Random phases spread the endpoints over the interval instead of in one burst.
        await asyncio.sleep(random.uniform(0, interval))
        due = loop.time()
        try:
            while True:
                started = loop.time()
                answered = await self._scrape(key, session)
                finished = loop.time()
                took = finished - started
                rested = finished + min(REST_PER_SCRAPE * took, max_rest)
                if answered:  # failures are told as such (scrape_failing)
                    self._health.paced(key, rested > due + interval, took, rested - started)
                # Behind schedule (a slow answer): go again once rested, never in a burst.
                due = max(due + interval, rested)
                await asyncio.sleep(due - loop.time())
        except Exception:  # a bug: log it; _follow_endpoints restarts the loop
            log.exception("scrape_loop_crashed", endpoint=key[0], source=key[1].value)

    async def _scrape(self, key: Key, session: aiohttp.ClientSession) -> bool:
        """True when an answer was recorded."""
        address, source = key
        endpoint = self._endpoints.get(address)
        url = None if endpoint is None else self._url(endpoint, source)
        if url is None:
            return False  # gone since the last poll; the loop is about to be cancelled
        started = time.perf_counter()
        try:
            await self._fetch_and_record(session, address, source, url)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            message = _describe(error, self._timeouts[source].total)
            self._inventory.record_error(address, source.value, message)
            self._health.failed(key, message)
            return False
        else:
            self._health.succeeded(key)
            return True
        finally:
            self._health.observe(source, time.perf_counter() - started)

    async def _fetch_and_record(
        self, session: aiohttp.ClientSession, address: str, source: Source, url: str
    ) -> None:
        if source is Source.METRICS:
            self._inventory.record_metrics(address, await self._metrics(session, address, url))
            return
        body = await self._fetch(session, source, url)
        if source is Source.MODELS:
            self._inventory.record_registered(address, registered_adapters(json.loads(body)))
        else:
            self._inventory.record_sidecar(address, sidecar_states(json.loads(body)))

    async def _metrics(
        self, session: aiohttp.ClientSession, address: str, whole_page: str
    ) -> MetricsObservation:
        observation = await self._metrics_of(session, address, whole_page)
        if observation.gpu_adapters is not None:
            self._export_loaded.add(address)
        elif address in self._export_loaded:
            # A restricted page leaves an empty family out: exported, and nothing loaded.
            observation = replace(observation, gpu_adapters=frozenset(), cpu_adapters=frozenset())
        return observation

    async def _metrics_of(
        self, session: aiohttp.ClientSession, address: str, whole_page: str
    ) -> MetricsObservation:
        """The restricted page, or the whole one from a server that has no restricted one
        (remembered: the next scrapes ask for the whole page at once)."""
        if address not in self._unrestricted:
            try:
                return await self._metrics_page(session, f"http://{address}{RESTRICTED_PATH}")
            except (HttpStatusError, MetricsParseError) as error:
                if isinstance(error, HttpStatusError) and error.status not in NO_SUCH_ROUTE:
                    raise  # the route is there, the server could not answer: a failure
                self._unrestricted.add(address)
                log.info("scrape_metrics_unrestricted", endpoint=address, why=str(error))
        return await self._metrics_page(session, whole_page)

    async def _metrics_page(self, session: aiohttp.ClientSession, url: str) -> MetricsObservation:
        return parse_vllm_metrics((await self._fetch(session, Source.METRICS, url)).decode())

    async def _fetch(self, session: aiohttp.ClientSession, source: Source, url: str) -> bytes:
        headers = None if source is Source.SIDECAR else self._vllm_headers
        async with session.get(url, headers=headers, timeout=self._timeouts[source]) as r:
            if r.status != 200:
                raise HttpStatusError(r.status, url)
            return await r.read()

    def _url(self, endpoint: Endpoint, source: Source) -> str | None:
        if source is Source.METRICS:
            return f"http://{endpoint.address}/metrics"
        if source is Source.MODELS:
            return f"http://{endpoint.address}/v1/models"
        base = self._sidecar_url(endpoint)
        return None if base is None else f"{base}/status"

    def _sidecar_url(self, endpoint: Endpoint) -> str | None:
        if endpoint.sidecar_url:
            return endpoint.sidecar_url.rstrip("/")
        if self._sidecar_port is not None:
            return f"http://{endpoint.host}:{self._sidecar_port}"
        return None


def registered_adapters(models: Any) -> frozenset[str]:
    """LoRA names from a /v1/models answer: the cards that have a parent (the base model)."""
    try:
        cards = models["data"]
        return frozenset(str(card["id"]) for card in cards if card.get("parent") is not None)
    except (KeyError, TypeError, AttributeError) as error:
        raise ScrapeError(f"/v1/models answered an unexpected body ({error!r})") from None


def sidecar_states(status: Any) -> dict[str, str]:
    """adapter id → state from a sidecar /status answer."""
    try:
        adapters = status["adapters"]
        return {str(i): str(record["state"]) for i, record in adapters.items()}
    except (KeyError, TypeError, AttributeError) as error:
        raise ScrapeError(f"sidecar /status answered an unexpected body ({error!r})") from None


def _describe(error: Exception, timeout: float | None) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return f"no answer within {timeout}s"
    return f"{type(error).__name__}: {error}"


class _Health:
    """The scraper's own metrics, and one log line when a pair starts or stops failing."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._errors = Counter(
            "loractl_picker_scrape_errors",
            "Failed scrapes, by endpoint and source (metrics, models, sidecar).",
            ["endpoint", "source"],
            registry=registry,
        )
        duration = Histogram(
            "loractl_picker_scrape_duration_seconds",
            "Time taken by one scrape, failed or not, by source.",
            ["source"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._durations = {source: duration.labels(source.value) for source in Source}
        self._since: dict[Key, float] = {}  # last success, or when tracking began
        self._failures: dict[Key, int] = {}
        self._slow_streak: dict[Key, int] = {}  # slowed scrapes in a row
        self._on_pace: dict[Key, int] = {}  # of pairs told slowed: on-schedule scrapes since
        if registry is not None:
            registry.register(_DataAge(self.ages))

    def track(self, key: Key) -> None:
        self._since.setdefault(key, time.monotonic())

    def forget(self, key: Key) -> None:
        self._since.pop(key, None)
        self._failures.pop(key, None)
        self._slow_streak.pop(key, None)
        self._on_pace.pop(key, None)
        self._errors.remove(key[0], key[1].value)

    def succeeded(self, key: Key) -> None:
        self._since[key] = time.monotonic()
        if failures := self._failures.pop(key, 0):
            log.info("scrape_recovered", endpoint=key[0], source=key[1].value, failures=failures)

    def failed(self, key: Key, message: str) -> None:
        self._errors.labels(key[0], key[1].value).inc()
        if not self._failures.get(key):
            log.warning("scrape_failing", endpoint=key[0], source=key[1].value, error=message)
        self._failures[key] = self._failures.get(key, 0) + 1

    def paced(self, key: Key, slowed: bool, took: float, every: float) -> None:
        """One log line when a pair's answers stay too slow for its interval, one when they
        have been fast enough again for BACK_TO_PACE_AFTER scrapes."""
        if slowed:
            streak = self._slow_streak[key] = self._slow_streak.get(key, 0) + 1
            if key in self._on_pace:
                self._on_pace[key] = 0
            elif streak >= SLOW_SCRAPES_BEFORE_WARNING:
                self._on_pace[key] = 0
                log.warning(
                    "scrape_slowed",
                    endpoint=key[0],
                    source=key[1].value,
                    took_seconds=round(took, 4),
                    every_seconds=round(every, 4),
                    why=f"a slow answer is asked for again only after resting "
                    f"{REST_PER_SCRAPE:g} times as long (at most half the staleness bound); "
                    "for /metrics, look at the page's size (vLLM keeps every "
                    "vllm:lora_requests_info label set until it restarts) and at the API "
                    "server's load",
                )
        else:
            self._slow_streak.pop(key, None)
            if key not in self._on_pace:
                return
            self._on_pace[key] += 1
            if self._on_pace[key] >= BACK_TO_PACE_AFTER:
                del self._on_pace[key]
                log.info("scrape_back_to_pace", endpoint=key[0], source=key[1].value)

    def observe(self, source: Source, seconds: float) -> None:
        self._durations[source].observe(seconds)

    def ages(self) -> Iterator[tuple[Key, float]]:
        now = time.monotonic()
        for key, since in list(self._since.items()):
            yield key, now - since


class _DataAge(Collector):
    """Computed when Prometheus scrapes: always current, and free in between."""

    def __init__(self, ages: Callable[[], Iterator[tuple[Key, float]]]) -> None:
        self._ages = ages

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "loractl_picker_data_age_seconds",
            "Seconds since the last successful scrape (since the endpoint appeared, if none).",
            labels=["endpoint", "source"],
        )
        for (address, source), age in self._ages():
            family.add_metric([address, source.value], age)
        yield family
