"""The Scraper against real simulators and sidecars, and small servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from controller.inventory import Endpoint, EndpointView, Inventory, MetricsObservation, Staleness
from controller.scrape import Scraper
from loractl.processes import ChildProcess, free_port
from tests.conftest import FAST, SidecarFactory, SimulatorFactory
from tests.support.gateway import inference_model, start_controller, write_models
from tests.support.sidecars import adapter_config

WAIT = 5.0
API_KEY = "sekret"
METRICS_PAGE = (
    'vllm:num_requests_running{engine="0"} 2.0\n'
    'vllm:num_requests_waiting{engine="0"} 0.0\n'
    'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
)
MODELS_BODY = {
    "object": "list",
    "data": [
        {"id": "base", "parent": None},
        {"id": "food-review-1", "parent": "base"},
    ],
}


def address(url: str) -> str:
    return url.removeprefix("http://")


async def watch_metrics(inventory: Inventory, seen: dict[str, list[float]]) -> None:
    """Note when each endpoint's metrics change, by polling the inventory every 5 ms (a
    scrape records a new observation object each time). Runs until cancelled."""
    last: dict[str, MetricsObservation | None] = {}
    while True:
        now = time.monotonic()
        for view in inventory.snapshot():
            if view.metrics is not None and view.metrics is not last.get(view.address):
                seen.setdefault(view.address, []).append(now)
            last[view.address] = view.metrics
        await asyncio.sleep(0.005)


def complete(view: EndpointView, sidecar: bool = True) -> bool:
    known = (view.metrics, view.registered, view.sidecar_states if sidecar else {})
    return None not in known


def view(inventory: Inventory, url_or_address: str) -> EndpointView:
    wanted = address(url_or_address)
    return next(v for v in inventory.snapshot() if v.address == wanted)


async def until(condition: Callable[[], bool], within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(scraper: Scraper) -> AsyncIterator[Scraper]:
    task = asyncio.create_task(scraper.run())
    try:
        yield scraper
    finally:
        scraper.stop()
        async with asyncio.timeout(1.0):
            await task


def fast_scraper(inventory: Inventory, **kwargs: object) -> Scraper:
    options: dict[str, object] = {"models_interval": 0.1, "sidecar_interval": 0.1, **kwargs}
    return Scraper(inventory, **options)  # type: ignore[arg-type]


class FakeServer:
    """A vLLM-and-sidecar stand-in that counts requests and answers what it is told."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.answers: dict[str, tuple[int, str]] = {
            "/metrics": (200, METRICS_PAGE),
            "/v1/models": (200, httpx.Response(200, json=MODELS_BODY).text),
            "/status": (200, '{"adapters": {"food-review-1": {"state": "loaded"}}}'),
        }
        self.delays: dict[str, float] = {}  # seconds to take before answering, by path
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        await asyncio.sleep(self.delays.get(request.path, 0.0))
        status, text = self.answers.get(request.path, (404, "not found"))
        return web.Response(status=status, text=text)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return runner


FakeFactory = Callable[[], Awaitable[FakeServer]]


@pytest_asyncio.fixture
async def fake_server() -> AsyncIterator[FakeFactory]:
    runners: list[web.AppRunner] = []

    async def start() -> FakeServer:
        server = FakeServer()
        runners.append(await server.start())
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture
async def hanging_address() -> AsyncIterator[str]:
    """Accepts connections and never answers, like a wedged server."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def post(url: str, path: str, body: Mapping[str, object]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text


@pytest.mark.asyncio
async def test_the_inventory_fills_from_real_simulators_and_follows_loads(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    first = start_simulator(*FAST, "--max-loras", "2", "--export-lora-loaded")
    second = start_simulator(*FAST, "--max-loras", "3")
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address(first.url)), Endpoint(address(second.url))])
    async with running(fast_scraper(inventory)):
        await until(lambda: all(complete(v, sidecar=False) for v in inventory.snapshot()))
        assert view(inventory, first.url).registered == frozenset()
        metrics = view(inventory, second.url).metrics
        assert metrics is not None
        assert (metrics.running, metrics.waiting, metrics.gpu_adapters) == (0, 0, None)

        load = {"lora_name": "review", "lora_path": adapters("review")}
        await post(first.url, "/v1/load_lora_adapter", load)
        await until(lambda: view(inventory, first.url).registered == frozenset({"review"}))
        await post(first.url, "/v1/completions", {"model": "review", "prompt": "hi"})

        def hot() -> bool:
            observed = view(inventory, first.url).metrics
            return observed is not None and observed.gpu_adapters == frozenset({"review"})

        await until(hot)
        assert view(inventory, second.url).registered == frozenset()
        await post(first.url, "/v1/unload_lora_adapter", {"lora_name": "review"})
        await until(lambda: view(inventory, first.url).registered == frozenset())

        def nothing_loaded() -> bool:
            # The restricted page leaves the emptied family out; the scraper knows it is
            # exported, so this reads as none loaded, not as unknown.
            observed = view(inventory, first.url).metrics
            return observed is not None and observed.gpu_adapters == frozenset()

        await until(nothing_loaded)
    assert inventory.errors() == {}


@pytest.mark.asyncio
async def test_metrics_come_from_the_restricted_page_when_served(
    fake_server: FakeFactory,
) -> None:
    restricted, plain_only, failing = [await fake_server() for _ in range(3)]
    restricted.answers["/metrics/"] = (200, METRICS_PAGE)
    failing.answers["/metrics/"] = (503, "overloaded")
    servers = (restricted, plain_only, failing)
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address(s.url)) for s in servers])
    with capture_logs() as logs:
        async with running(fast_scraper(inventory, metrics_interval=0.02)):
            await until(lambda: plain_only.hits["/metrics"] >= 5)
            await until(lambda: "metrics" in inventory.errors().get(address(failing.url), {}))
    assert restricted.hits["/metrics/"] >= 1
    assert restricted.hits["/metrics"] == 0
    assert view(inventory, restricted.url).metrics is not None
    # A server without the route: asked once, then only for the whole page.
    assert plain_only.hits["/metrics/"] == 1
    assert view(inventory, plain_only.url).metrics is not None
    [switched] = [e for e in logs if e["event"] == "scrape_metrics_unrestricted"]
    assert switched["endpoint"] == address(plain_only.url)
    assert "HTTP 404" in switched["why"]
    # A route that fails is a failure, not a reason to ask for the whole page.
    assert failing.hits["/metrics"] == 0
    assert "HTTP 503" in inventory.errors()[address(failing.url)]["metrics"]


@pytest.mark.asyncio
async def test_sidecar_states_come_from_a_real_sidecar(
    start_simulator: SimulatorFactory, start_sidecar: SidecarFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST)
    sidecar = start_sidecar(sim.url, adapter_config({"review": adapters()}))
    sidecar.wait_states(review="loaded")
    port = int(sidecar.url.rsplit(":", 1)[1])
    named = Inventory()
    named.set_endpoints([Endpoint(address(sim.url), sidecar_url=sidecar.url)])
    # The other way to find it: the same port on every pod, at the pod's own address.
    by_port = Inventory()
    by_port.set_endpoints([Endpoint(address(sim.url))])
    async with running(fast_scraper(named)), running(fast_scraper(by_port, sidecar_port=port)):
        for inventory in (named, by_port):
            await until(lambda: complete(view(inventory, sim.url)))  # noqa: B023
            assert view(inventory, sim.url).sidecar_states == {"review": "loaded"}
            assert view(inventory, sim.url).registered == frozenset({"review"})


@pytest.mark.asyncio
async def test_without_a_sidecar_none_is_asked_for(fake_server: FakeFactory) -> None:
    server = await fake_server()
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address(server.url))])
    async with running(fast_scraper(inventory)):
        await until(lambda: view(inventory, server.url).registered is not None)
        await asyncio.sleep(0.3)
    assert server.hits["/status"] == 0
    assert view(inventory, server.url).sidecar_states is None


@pytest.mark.asyncio
async def test_dead_and_hanging_endpoints_do_not_delay_a_live_one(
    fake_server: FakeFactory, hanging_address: str
) -> None:
    live = await fake_server()
    closed = f"127.0.0.1:{free_port()}"
    inventory = Inventory(Staleness(metrics=0.3, models=0.3, sidecar=0.3))
    inventory.set_endpoints([Endpoint(a) for a in (closed, hanging_address, address(live.url))])
    registry = CollectorRegistry()
    # A long timeout: the hanging endpoint holds its request for the whole run.
    scraper = fast_scraper(inventory, metrics_interval=0.05, timeout=5.0, registry=registry)
    metrics_at: dict[str, list[float]] = {}
    watcher = asyncio.create_task(watch_metrics(inventory, metrics_at))
    async with running(scraper):
        await asyncio.sleep(1.0)
        snapshot = {v.address: v for v in inventory.snapshot()}
        errors = inventory.errors()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    times = metrics_at[address(live.url)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 12  # about 20 expected in a second; slack for a busy machine
    assert max(gaps) < 0.3
    assert snapshot[address(live.url)].metrics is not None
    assert snapshot[closed].metrics is None
    assert snapshot[hanging_address].metrics is None
    assert closed not in metrics_at
    assert hanging_address not in metrics_at
    assert "Cannot connect" in errors[closed]["metrics"]
    assert hanging_address not in errors  # still waiting for its first answer
    assert address(live.url) not in errors

    def errors_of(endpoint: str) -> float | None:
        labels = {"endpoint": endpoint, "source": "metrics"}
        return registry.get_sample_value("loractl_picker_scrape_errors_total", labels)

    assert errors_of(closed)
    assert errors_of(address(live.url)) is None
    assert errors_of(hanging_address) is None


@pytest.mark.asyncio
async def test_a_hanging_endpoint_times_out_at_its_staleness_bound(hanging_address: str) -> None:
    inventory = Inventory(Staleness(metrics=0.1, models=0.2, sidecar=0.2))
    inventory.set_endpoints([Endpoint(hanging_address)])
    async with running(Scraper(inventory, metrics_interval=0.05, models_interval=0.05)):
        # The messages tell the timeouts used; the wait only has to outlast a busy machine.
        await until(lambda: "models" in inventory.errors().get(hanging_address, {}))
    assert inventory.errors()[hanging_address] == {
        "metrics": "no answer within 0.1s",
        "models": "no answer within 0.2s",
    }


@pytest.mark.asyncio
async def test_a_slow_metrics_page_is_waited_for_and_never_asked_for_back_to_back(
    fake_server: FakeFactory,
) -> None:
    server = await fake_server()
    server.delays["/metrics"] = 0.06  # three intervals: a late answer, not a lost one
    inventory = Inventory()  # /metrics answers count for 0.5 s, and are waited for as long
    inventory.set_endpoints([Endpoint(address(server.url))])
    with capture_logs() as logs:
        async with running(fast_scraper(inventory, metrics_interval=0.02)):
            await until(lambda: view(inventory, server.url).metrics is not None)
            server.hits.clear()
            await asyncio.sleep(1.2)
            slow_hits = server.hits["/metrics"]
            server.delays.clear()
            await until(lambda: any(e["event"] == "scrape_back_to_pace" for e in logs))
    # Back to back, 1.2 s of 60 ms answers would be 20 scrapes; resting three times as long
    # after each leaves at most one per 240 ms.
    assert 2 <= slow_hits <= 6, slow_hits
    assert "metrics" not in inventory.errors().get(address(server.url), {})
    [slowed] = [e for e in logs if e["event"] == "scrape_slowed"]
    assert slowed["source"] == "metrics"
    assert slowed["log_level"] == "warning"
    assert slowed["took_seconds"] >= 0.06
    assert "vllm:lora_requests_info" in slowed["why"]


@pytest.mark.asyncio
async def test_a_stall_of_the_picker_itself_is_not_rested_three_times_over(
    fake_server: FakeFactory,
) -> None:
    server = await fake_server()
    server.delays["/metrics"] = 0.2  # so that a scrape is surely in flight below
    inventory = Inventory()  # /metrics: stale after 0.5 s, so a rest of at most 0.25 s
    inventory.set_endpoints([Endpoint(address(server.url))])
    async with running(fast_scraper(inventory, metrics_interval=0.05)):
        await until(lambda: view(inventory, server.url).metrics is not None)
        asked = server.hits["/metrics"]
        await until(lambda: server.hits["/metrics"] > asked)  # the server is answering
        # The whole process stops, as when its CPU quota is spent or its VM is paused: the
        # scrape in flight takes 2.2 s by this process's clock, none of it the endpoint's.
        time.sleep(2.0)  # noqa: ASYNC251
        asked = server.hits["/metrics"]
        await until(lambda: server.hits["/metrics"] > asked, within=1.5)


@pytest.mark.asyncio
async def test_an_endpoint_that_dies_goes_stale_with_errors(
    start_simulator: SimulatorFactory,
) -> None:
    sim = start_simulator(*FAST)
    inventory = Inventory(Staleness(metrics=0.3, models=0.5, sidecar=0.5))
    inventory.set_endpoints([Endpoint(address(sim.url))])
    registry = CollectorRegistry()
    with capture_logs() as logs:
        async with running(fast_scraper(inventory, registry=registry)):
            await until(
                lambda: (
                    view(inventory, sim.url).registered is not None
                    and view(inventory, sim.url).metrics is not None
                )
            )
            await asyncio.to_thread(sim.process.stop)
            await until(lambda: view(inventory, sim.url).metrics is None, within=1.0)
            await until(lambda: view(inventory, sim.url).registered is None, within=1.0)
            age = registry.get_sample_value(
                "loractl_picker_data_age_seconds",
                {"endpoint": address(sim.url), "source": "metrics"},
            )
    assert age is not None
    assert age > 0.3
    assert set(inventory.errors()[address(sim.url)]) == {"metrics", "models"}
    failing = [e for e in logs if e["event"] == "scrape_failing"]
    assert sorted(e["source"] for e in failing) == ["metrics", "models"]  # once per streak


@pytest.mark.asyncio
async def test_endpoint_set_changes_are_followed(fake_server: FakeFactory) -> None:
    first, second = await fake_server(), await fake_server()
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address(first.url))])
    registry = CollectorRegistry()
    async with running(fast_scraper(inventory, registry=registry)):
        await until(lambda: view(inventory, first.url).metrics is not None)
        assert second.hits["/metrics"] == 0
        inventory.set_endpoints([Endpoint(address(first.url)), Endpoint(address(second.url))])
        await until(lambda: view(inventory, second.url).metrics is not None)
        inventory.set_endpoints([Endpoint(address(second.url), sidecar_url=second.url)])
        await until(lambda: view(inventory, second.url).sidecar_states is not None)
        await asyncio.sleep(0.1)  # the first endpoint's loops are cancelled by now
        hits = first.hits.copy()
        await asyncio.sleep(0.3)
        assert first.hits == hits
        ages = registry.get_sample_value(
            "loractl_picker_data_age_seconds",
            {"endpoint": address(first.url), "source": "metrics"},
        )
    assert ages is None  # forgotten with the endpoint
    assert view(inventory, second.url).sidecar_states == {"food-review-1": "loaded"}


@pytest.mark.asyncio
async def test_the_api_key_goes_to_vllm_not_to_the_sidecar(
    start_simulator: SimulatorFactory, fake_server: FakeFactory
) -> None:
    sim = start_simulator(*FAST, "--api-key", API_KEY)
    sidecar = await fake_server()
    with_key, without_key = Inventory(), Inventory()
    for inventory in (with_key, without_key):
        inventory.set_endpoints([Endpoint(address(sim.url), sidecar_url=sidecar.url)])
    async with (
        running(fast_scraper(with_key, api_key=API_KEY)),
        running(fast_scraper(without_key)),
    ):
        await until(lambda: view(with_key, sim.url).registered is not None)
        await until(lambda: view(with_key, sim.url).sidecar_states is not None)
        await until(lambda: "models" in without_key.errors().get(address(sim.url), {}))
        # The three sources are scraped independently: the refusal can come first.
        await until(lambda: view(without_key, sim.url).metrics is not None)
    assert view(with_key, sim.url).sidecar_states == {"food-review-1": "loaded"}
    refused = without_key.errors()[address(sim.url)]["models"]
    assert refused.endswith(f"HTTP 401 from {sim.url}/v1/models")
    assert "metrics" not in without_key.errors()[address(sim.url)]  # served without a key


@pytest.mark.parametrize(
    ("path", "status", "body", "source", "complaint"),
    [
        ("/metrics", 200, "<html>oops</html>", "metrics", "not a vLLM metrics page"),
        ("/metrics", 503, "busy", "metrics", "HTTP 503"),
        ("/v1/models", 200, "not json", "models", "JSONDecodeError"),
        ("/v1/models", 200, '{"data": [{"parent": "base"}]}', "models", "unexpected body"),
        ("/status", 200, '{"adapters": ["a"]}', "sidecar", "unexpected body"),
        ("/status", 200, "[]", "sidecar", "unexpected body"),
        ("/status", 404, "no such route", "sidecar", "HTTP 404"),
    ],
)
@pytest.mark.asyncio
async def test_unusable_answers_are_errors_that_name_the_problem(
    fake_server: FakeFactory, path: str, status: int, body: str, source: str, complaint: str
) -> None:
    server = await fake_server()
    server.answers[path] = (status, body)
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(address(server.url), sidecar_url=server.url)])
    async with running(fast_scraper(inventory)):
        await until(lambda: source in inventory.errors().get(address(server.url), {}))
    assert complaint in inventory.errors()[address(server.url)][source]
    assert set(inventory.errors()[address(server.url)]) == {source}


@pytest.mark.asyncio
async def test_stop_cancels_every_loop_promptly(hanging_address: str) -> None:
    inventory = Inventory()
    inventory.set_endpoints([Endpoint(hanging_address, sidecar_url=f"http://{hanging_address}")])
    scraper = Scraper(inventory, timeout=30.0)
    task = asyncio.create_task(scraper.run())
    await asyncio.sleep(0.2)  # the metrics request is hanging by now
    began = time.monotonic()
    scraper.stop()
    await asyncio.wait_for(task, 1.0)
    assert time.monotonic() - began < 0.5
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ")]


def test_the_scrapers_metrics_are_named_as_documented() -> None:
    registry = CollectorRegistry()
    Scraper(Inventory(), registry=registry)
    names = {metric.name for metric in registry.collect()}
    assert names == {
        "loractl_picker_scrape_errors",
        "loractl_picker_scrape_duration_seconds",
        "loractl_picker_data_age_seconds",
    }


def test_a_longer_metrics_interval_keeps_figures_known_between_scrapes(
    start_simulator: SimulatorFactory, children: list[ChildProcess], tmp_path: Path
) -> None:
    """The staleness bound follows --metrics-interval: with scrapes 0.8 s apart, one good
    scrape's figures stay known until the next (a fixed 0.5 s bound left them unknown for
    0.3 s of every 0.8)."""
    sim = start_simulator("--served-model-name", "base")
    address = sim.url.removeprefix("http://")
    models = write_models(tmp_path / "models.yaml", [inference_model("base")])
    controller = start_controller(
        children, tmp_path, [address], models, "--metrics-interval", "0.8"
    )
    controller.wait_scraped({address: set()})
    known = []
    deadline = time.monotonic() + 2.5  # three scrapes and more
    while time.monotonic() < deadline:
        [endpoint] = controller.inventory()["endpoints"]
        known.append(endpoint["metrics"] is not None)
        time.sleep(0.05)
    assert all(known), f"unknown in {known.count(False)} of {len(known)} looks"
