"""`loractl sidecar`: flags, wiring and a clean SIGTERM (which never unloads anything)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import structlog
from aiohttp import web

from loractl import logs
from loractl.flags import CannotListen, listen, port_number
from sidecar.fetch import AdapterFetcher
from sidecar.local import LocalConfigMapWatcher
from sidecar.reconciler import Reconciler, ReconcilerSettings
from sidecar.server import build_app
from sidecar.watch import ConfigFileWatcher

log = structlog.get_logger("sidecar")
CONFIG_ENV = "DYNAMIC_LORA_ROLLOUT_CONFIG"
DEFAULT_CONFIG = "/config/configmap.yaml"
ANNOTATION_DELAY = 1.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="keep a vLLM server's LoRA adapters equal to the adapter ConfigMap",
        description="Reconciles the ConfigMap's ensureExist/ensureNotExist lists against vLLM. "
        "Drop-in for the upstream lora-syncer: same config file, same metric.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)),
        help=f"adapter config file, mounted from a ConfigMap as a directory (env {CONFIG_ENV}; "
        f"default {DEFAULT_CONFIG})",
    )
    parser.add_argument("--vllm-url", help="vLLM base URL; default: the config's host and port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="vLLM API key sent as a bearer token (env VLLM_API_KEY)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address of the sidecar's HTTP server")
    parser.add_argument(
        "--port",
        "--metrics-port",
        type=port_number,
        default=8080,
        help="port of /healthz, /readyz, /status and /metrics",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=Path(os.environ.get("LORACTL_ADAPTER_DIR", "/adapters")),
        help="where downloaded adapters live, as <id>/<revision> (env LORACTL_ADAPTER_DIR)",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also unload registered adapters that neither list mentions",
    )
    parser.add_argument(
        "--ready-when",
        choices=("all", "any", "none"),
        default="all",
        help="/readyz is ready when all (default), any or none of the ensureExist adapters "
        "are loaded; then it stays ready while vLLM answers (adapters listed later do not "
        "take the pod out of service)",
    )
    parser.add_argument(
        "--resync-interval",
        "--reconcile-trigger",
        type=float,
        default=30.0,
        help="seconds between full reconciles when nothing changed",
    )
    parser.add_argument(
        "--debounce",
        type=float,
        default=0.02,
        help="seconds to wait after a config file event for the burst to end",
    )
    parser.add_argument(
        "--vllm-poll-interval",
        type=float,
        default=1.0,
        help="seconds between checks that vLLM is up and still has its adapters",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=4, help="adapter operations running at once"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds allowed for one vLLM call"
    )
    parser.add_argument(
        "--backoff-initial",
        type=float,
        default=1.0,
        help="first retry delay after a failure, doubled each time",
    )
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=600.0,
        help="seconds one hub download may take before it is killed and retried",
    )
    parser.add_argument("--backoff-max", type=float, default=300.0, help="retry delay cap")
    parser.add_argument(
        "--watch-configmap",
        metavar="NAMESPACE/NAME",
        help="also watch the ConfigMap through the Kubernetes API, to react in well under a "
        "second instead of waiting for the kubelet (needs list/watch on it)",
    )
    parser.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="local mode: --watch-configmap reads the ConfigMap from the object YAMLs in DIR "
        "(as `loractl controller --local DIR` edits them) instead of the Kubernetes API",
    )
    parser.add_argument(
        "--annotate-pod",
        action="store_true",
        help="write an adapter summary to this Pod's loractl.io/adapters annotation "
        "(needs env POD_NAME and POD_NAMESPACE, and patch on pods)",
    )
    compat = parser.add_argument_group("accepted for lora-syncer compatibility (no effect)")
    compat.add_argument("--health-check-timeout", type=float, help=argparse.SUPPRESS)
    compat.add_argument("--health-check-interval", type=float, help=argparse.SUPPRESS)
    compat.add_argument("--config-validation", action="store_true", help=argparse.SUPPRESS)
    logs.add_level_option(parser)
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> ReconcilerSettings:
    return ReconcilerSettings(
        config_path=args.config,
        adapter_dir=args.adapter_dir,
        vllm_url=args.vllm_url,
        api_key=args.api_key or None,
        prune=args.prune,
        ready_when=args.ready_when,
        resync_interval=args.resync_interval,
        vllm_poll_interval=args.vllm_poll_interval,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
    )


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    if args.watch_configmap and args.watch_configmap.count("/") != 1:
        raise SystemExit(
            f"loractl sidecar: error: --watch-configmap {args.watch_configmap!r}: "
            "expected NAMESPACE/NAME"
        )
    if args.local is not None and not args.watch_configmap:
        raise SystemExit(
            "loractl sidecar: error: --local DIR needs --watch-configmap NAMESPACE/NAME: "
            "the ConfigMap in DIR to follow"
        )
    if args.local is not None and not args.local.is_dir():
        raise SystemExit(f"loractl sidecar: error: --local {args.local}: no such directory")
    if args.local is not None and args.annotate_pod:
        raise SystemExit("loractl sidecar: error: --annotate-pod needs a cluster, not --local")
    if args.annotate_pod and not (os.environ.get("POD_NAME") and os.environ.get("POD_NAMESPACE")):
        raise SystemExit(
            "loractl sidecar: error: --annotate-pod needs env POD_NAME and POD_NAMESPACE "
            "(set them from the downward API: fieldRef metadata.name / metadata.namespace)"
        )
    try:
        asyncio.run(serve(args))
    except CannotListen as exc:
        raise SystemExit(f"loractl sidecar: error: {exc}") from exc
    return 0


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    settings = settings_from_args(args)
    fetcher = AdapterFetcher(
        settings.adapter_dir,
        token=os.environ.get("HF_TOKEN") or None,
        download_timeout=args.download_timeout,
    )
    reconciler = Reconciler(settings, fetcher)
    runner = web.AppRunner(build_app(reconciler), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await listen(site.start, "--port", args.host, args.port)
    watchers: list[Watcher] = [
        ConfigFileWatcher(settings.config_path, reconciler.trigger, loop, args.debounce)
    ]
    if args.local is not None:
        namespace, name = args.watch_configmap.split("/")
        watchers.append(
            LocalConfigMapWatcher(
                args.local,
                namespace,
                name,
                settings.config_path.name,
                lambda text: reconciler.accept_config_text(text, "local"),
                loop,
                args.debounce,
            )
        )
    elif args.watch_configmap or args.annotate_pod:
        # Imported here: the Kubernetes client costs start-up time and memory nobody else pays.
        from loractl.kube import kube_api_client
        from sidecar.kube import ConfigMapWatcher, PodAnnotator

        api = kube_api_client()
        if args.watch_configmap:
            namespace, name = args.watch_configmap.split("/")
            watchers.append(
                ConfigMapWatcher(
                    namespace,
                    name,
                    settings.config_path.name,
                    lambda text: reconciler.accept_config_text(text, "api"),
                    loop,
                    api,
                )
            )
        if args.annotate_pod:
            annotator = PodAnnotator(os.environ["POD_NAMESPACE"], os.environ["POD_NAME"], api)
            reconciler.on_change = Coalesced(
                ANNOTATION_DELAY, lambda: annotator.publish(reconciler.summary())
            )
    for watcher in watchers:
        watcher.start()
    log.info(
        "started",
        config=str(settings.config_path),
        port=args.port,
        adapter_dir=str(settings.adapter_dir),
        prune=settings.prune,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reconciler.trigger()
    loop_task = asyncio.create_task(reconciler.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loop_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping", note="adapters stay registered in vLLM")
    for watcher in watchers:
        watcher.stop()
    for task in (loop_task, stopper):
        task.cancel()
    results = await asyncio.gather(loop_task, stopper, return_exceptions=True)
    await runner.cleanup()
    crash = results[0]
    if isinstance(crash, Exception):
        raise crash


class Watcher(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Coalesced:
    """Runs `action` once, `delay` seconds after the first of a burst of calls."""

    def __init__(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        self._delay = delay
        self._action = action
        self._pending: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self._delay)
        await self._action()
