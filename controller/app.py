"""Wiring of `loractl controller`: every long-running part, started and stopped in order."""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import signal
from collections.abc import Callable
from typing import Protocol

import structlog
from aiohttp import web
from kubernetes.client import ApiClient
from prometheus_client import CollectorRegistry

from controller.backend.base import Backend
from controller.backend.kube import KubeBackend
from controller.backend.local import LocalBackend
from controller.endpoints import InferencePoolEndpoints, StaticEndpoints
from controller.extproc.server import PortUnavailable, serve_picker
from controller.http_api import HttpState, build_app
from controller.inventory import Endpoint, Inventory, Staleness
from controller.leader import LeaderElector, leader_identity
from controller.local_sources import FileLockElector, LocalModels, LocalPoolEndpoints
from controller.model_sources import ClusterModels, FileModels
from controller.picker import EndpointPicker, PickerSettings
from controller.picker_metrics import OutcomeCollector, PickerMetrics
from controller.rollout.runner import RolloutMetrics, RolloutRunner
from controller.scheduling import compiled
from controller.scheduling.pipeline import Pipeline
from controller.scrape import Scraper
from controller.stats import TrafficStats
from loractl.flags import CannotListen, listen
from loractl.kube import kube_api_client

log = structlog.get_logger("controller")


class Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


async def serve(args: argparse.Namespace, pipeline: Pipeline, rng: random.Random) -> None:
    """Run until SIGTERM or SIGINT: endpoint and model sources, scraper, picker, HTTP."""
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()
    inventory = Inventory(
        Staleness.for_intervals(args.metrics_interval, args.models_interval, args.sidecar_interval)
    )

    def endpoints_changed(endpoints: list[Endpoint]) -> None:
        # An endpoint that leaves (deleted, or no longer ready: restarting, say) comes back
        # with empty GPU slots: whatever we believed was hot there is forgotten.
        gone = {e.address for e in inventory.endpoints()} - {e.address for e in endpoints}
        inventory.set_endpoints(endpoints)
        for address in gone:
            pipeline.residency.forget(address)

    stats = TrafficStats()
    sources: list[Startable] = []
    api = None if args.endpoints or args.local else kube_api_client()
    local = None if args.local is None else LocalBackend(args.local, args.namespace)
    models: FileModels | ClusterModels | LocalModels
    if local is not None:
        sources.append(LocalPoolEndpoints(local, args.pool, endpoints_changed))
        models = LocalModels(local, args.pool)
        await local.start()  # the sources above hear of its first reading
    elif api is None:
        sources.append(StaticEndpoints(args.endpoints, endpoints_changed))
        models = FileModels(args.models, loop, pool=args.pool)
    else:
        sources.append(
            InferencePoolEndpoints(api, args.namespace, args.pool, loop, endpoints_changed)
        )
        models = (
            FileModels(args.models, loop, pool=args.pool)
            if args.models is not None
            else ClusterModels(api, args.namespace, args.pool, loop)
        )
    sources.append(models)
    scraper = Scraper(
        inventory,
        metrics_interval=args.metrics_interval,
        models_interval=args.models_interval,
        sidecar_interval=args.sidecar_interval,
        api_key=args.vllm_api_key or None,
        sidecar_port=args.sidecar_port,
        registry=registry,
    )
    for source in sources:
        source.start()
    runner = web.AppRunner(
        build_app(HttpState(registry, inventory, stats, models.current, models.synced)),
        access_log=None,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.metrics_port)
    await listen(site.start, "--metrics-port", args.host, args.metrics_port)
    picker_server = None
    if not args.no_picker:
        picker = EndpointPicker(
            inventory,
            pipeline,
            models.current,
            models.synced,
            PickerSettings(
                passthrough=args.passthrough,
                sticky_header=args.sticky_header,
                base_models=frozenset(args.base_model),
            ),
            stats,
            PickerMetrics(registry, inventory),
            rng,
        )
        tls = (str(args.tls_cert), str(args.tls_key)) if args.tls_cert else None
        try:
            picker_server = await serve_picker(
                picker, args.host, args.grpc_port, args.grpc_health_port, tls, args.max_body_bytes
            )
        except PortUnavailable as exc:
            flag = "--grpc-port" if exc.port == args.grpc_port else "--grpc-health-port"
            raise CannotListen(flag, exc.address, exc.reason) from exc
        registry.register(OutcomeCollector(picker_server.outcomes))
    log.info(
        "started",
        picker=picker_server is not None,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        endpoints=args.endpoints,
        pool=args.pool,
        local=None if args.local is None else str(args.local),
        scheduling="compiled" if compiled() else "interpreted",
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scraping = asyncio.create_task(scraper.run())
    rollouts = None
    if not args.picker_only and (api is not None or local is not None):
        rollouts = Rollouts.for_args(args, api, local, inventory, stats, registry)
        rollouts.start()
    await stop.wait()
    log.info("stopping")
    if rollouts is not None:
        await rollouts.stop()
    if picker_server is not None:
        await picker_server.stop()
    scraper.stop()
    await asyncio.gather(scraping, return_exceptions=True)
    for source in sources:
        await asyncio.to_thread(source.stop)  # watch threads may take a moment to let go
    if local is not None:
        await local.stop()
    await runner.cleanup()


class Elector(Protocol):
    @property
    def is_leader(self) -> bool: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


class Rollouts:
    """The rollout controller: a backend, leader election and the runner.

    Every replica watches; only the leader writes: the Lease holder in a cluster, the
    holder of the directory's lock file in local mode. Without leader election (one
    replica, or development) this replica always leads.
    """

    def __init__(
        self,
        backend: Backend,
        inventory: Inventory,
        stats: TrafficStats,
        registry: CollectorRegistry,
        elector: Callable[[Callable[[], None]], Elector] | None,
        *,
        owns_backend: bool,
    ) -> None:
        self.backend = backend
        self.runner = RolloutRunner(backend, inventory, stats, RolloutMetrics(registry, backend))
        self.elector = None if elector is None else elector(self._leading)
        self._owns_backend = owns_backend
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def for_args(
        cls,
        args: argparse.Namespace,
        api: ApiClient | None,
        local: LocalBackend | None,
        inventory: Inventory,
        stats: TrafficStats,
        registry: CollectorRegistry,
    ) -> Rollouts:
        """With `local`, over its directory (started and stopped by the caller, who shares
        it with the endpoint and model sources); else over the cluster through `api`."""
        elector: Callable[[Callable[[], None]], Elector] | None = None
        if local is not None:
            if not args.no_leader_election:
                elector = functools.partial(FileLockElector, local.directory)
            return cls(local, inventory, stats, registry, elector, owns_backend=False)
        assert api is not None
        if not args.no_leader_election:
            elector = functools.partial(
                LeaderElector,
                api,
                args.namespace,
                args.lease_name,
                leader_identity(),
                on_stop_leading=lambda: log.warning("leadership_lost", lease=args.lease_name),
            )
        backend = KubeBackend(api, args.namespace)
        return cls(backend, inventory, stats, registry, elector, owns_backend=True)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run()))

    async def _run(self) -> None:
        if self._owns_backend:
            await self.backend.start()
        log.info("rollouts_watching", rollouts=len(self.backend.rollouts()))
        elector = self.elector
        if elector is None:
            await self.runner.run(lambda: True)
            return
        self._tasks.append(asyncio.create_task(elector.run()))
        await self.runner.run(lambda: elector.is_leader)

    def _leading(self) -> None:
        log.info("leadership_acquired")
        self.runner.trigger()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.elector is not None:
            await self.elector.stop()  # releases leadership: a successor takes over at once
        if self._owns_backend:
            await self.backend.stop()
