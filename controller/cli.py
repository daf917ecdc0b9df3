"""`loractl controller`: the adapter inventory and the LoRA-aware endpoint picker."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import structlog

from controller.inventory import METRICS_STALE_AFTER, OTHERS_STALE_AFTER
from loractl import logs
from loractl.flags import CannotListen, header_name, port_number

log = structlog.get_logger("controller")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "controller",
        help="run the adapter inventory and the LoRA-aware Envoy endpoint picker",
        description="Scrapes every vLLM pod of a pool into the adapter inventory and serves "
        "the Envoy ext_proc endpoint picker that routes each request to the pod where its "
        "adapter is hot.",
    )
    where = parser.add_argument_group(
        "endpoints and models (one of --pool, --endpoints with --models, or --local)"
    )
    where.add_argument(
        "--endpoints",
        type=endpoint_addresses,
        help="static endpoint list: ip:port,ip:port,...",
    )
    where.add_argument(
        "--pool",
        help="InferencePool name: its ready pods are the endpoints; with --local, the pool "
        "file's loractl.io/endpoints annotation (default: the directory's only pool)",
    )
    where.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="local mode: read pools, InferenceModels, adapter ConfigMaps and rollouts from "
        "the object YAMLs in DIR instead of a cluster, and write rollout state back to them",
    )
    where.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the pool and models (env POD_NAMESPACE)",
    )
    where.add_argument(
        "--models",
        type=Path,
        help="YAML file of InferenceModel / InferenceModelRewrite documents, reloaded when it "
        "changes; default with --pool: the namespace's objects for that pool, watched",
    )
    where.add_argument(
        "--base-model",
        action="append",
        default=[],
        metavar="NAME",
        help="a target served by the base model itself (repeatable)",
    )
    picker = parser.add_argument_group("picker")
    rollouts = parser.add_argument_group("rollouts (with --pool or --local)")
    rollouts.add_argument(
        "--picker-only",
        action="store_true",
        help="serve the picker without running rollouts: for extra replicas that scale the "
        "picker out (rollout gates read the traffic of the leader's own picker)",
    )
    rollouts.add_argument(
        "--lease-name",
        default="loractl-controller",
        help="coordination.k8s.io Lease for leader election: only its holder writes (in "
        "local mode the leader holds a lock file in DIR instead)",
    )
    rollouts.add_argument(
        "--no-leader-election",
        action="store_true",
        help="always act as the leader (one replica only)",
    )
    picker.add_argument(
        "--no-picker",
        action="store_true",
        help="run the inventory and metrics only, without the ext_proc server",
    )
    picker.add_argument(
        "--host",
        default="0.0.0.0",
        help="address the gRPC and HTTP servers listen on (default: all)",
    )
    picker.add_argument("--grpc-port", type=port_number, default=9002, help="ext_proc gRPC port")
    picker.add_argument(
        "--grpc-health-port", type=port_number, default=9003, help="gRPC health port"
    )
    picker.add_argument(
        "--metrics-port",
        type=port_number,
        default=9090,
        help="HTTP port of /metrics, /healthz, /inventory and /models",
    )
    picker.add_argument("--tls-cert", type=Path, help="serve ext_proc over TLS with this cert")
    picker.add_argument("--tls-key", type=Path, help="... and this key")
    picker.add_argument("--profile", type=Path, help="scheduling profile YAML (default: built in)")
    picker.add_argument(
        "--passthrough",
        action="store_true",
        help="route models no InferenceModel names as they are, instead of 404",
    )
    picker.add_argument(
        "--sticky-header",
        type=header_name,
        metavar="HEADER",
        help="request header (e.g. x-user-id) that pins a client to one target, for models "
        "whose InferenceModel has no loractl.io/sticky-header annotation",
    )
    picker.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=10 * 1024 * 1024,
        help="larger request bodies get 413 (default 10 MiB)",
    )
    picker.add_argument("--seed", type=int, help="seed weighted choices and tie-breaks")
    scrape = parser.add_argument_group("inventory scraping")
    scrape.add_argument(
        "--sidecar-port",
        type=port_number,
        default=8080,
        help="port of each pod's loractl sidecar (/status)",
    )
    scrape.add_argument(
        "--metrics-interval",
        type=interval_seconds,
        default=0.05,
        help="seconds between vLLM /metrics scrapes; queue and KV figures count as unknown "
        f"after {METRICS_STALE_AFTER} intervals without a good one",
    )
    scrape.add_argument(
        "--models-interval",
        type=interval_seconds,
        default=1.0,
        help=f"seconds between vLLM /v1/models scrapes; unknown after {OTHERS_STALE_AFTER} "
        "intervals",
    )
    scrape.add_argument(
        "--sidecar-interval",
        type=interval_seconds,
        default=1.0,
        help=f"seconds between sidecar /status scrapes; unknown after {OTHERS_STALE_AFTER} "
        "intervals",
    )
    scrape.add_argument(
        "--vllm-api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="vLLM API key (env VLLM_API_KEY)",
    )
    logs.add_level_option(parser)
    parser.set_defaults(run=run)


MAX_INTERVAL_S = 300.0


def interval_seconds(text: str) -> float:
    """A scrape interval: more than 0 (0 would scrape in a busy loop), at most 5 minutes."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, such as 0.05; got {text!r}") from None
    if not 0 < seconds <= MAX_INTERVAL_S:  # NaN fails both
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_INTERVAL_S:g} seconds; got {text}"
        )
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def endpoint_addresses(text: str) -> list[str]:
    """--endpoints: canonical "ip:port" addresses (the gateway needs IPs, not host names)."""
    from controller.endpoints import parse_address

    try:
        addresses = [parse_address(entry) for entry in text.split(",") if entry.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; give ip:port,ip:port,...") from None
    if not addresses:
        raise argparse.ArgumentTypeError("give at least one ip:port")
    return addresses


def check_sources(args: argparse.Namespace) -> None:
    """Exactly one place to learn endpoints from; in local mode, the pool named or implied."""

    def fail(message: str) -> NoReturn:
        raise SystemExit(f"loractl controller: error: {message}")

    if args.local is not None:
        if args.endpoints or args.models:
            fail("--local reads endpoints and models from DIR; drop --endpoints/--models")
        if not args.local.is_dir():
            fail(f"--local {args.local}: no such directory")
        if args.pool is None:
            args.pool = only_local_pool(args.local, args.namespace, fail)
    elif args.endpoints and args.pool:
        fail("--endpoints and --pool are alternatives: give one")
    elif args.endpoints and args.models is None:
        fail(
            "--endpoints needs --models (a file of InferenceModel documents); only --pool "
            "can read them from the cluster"
        )
    elif not args.endpoints and not args.pool:
        fail("say where the endpoints are: --pool NAME, --endpoints with --models, or --local DIR")


def check_tls(cert: Path, key: Path) -> None:
    """The pair gRPC will serve, read the way any TLS server reads it: gRPC itself only says
    that it could not listen."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SystemExit(
            f"loractl controller: error: --tls-cert {cert} --tls-key {key}: not a PEM "
            f"certificate and its private key ({exc.reason or exc}); give the PEM files of "
            "one certificate and its key"
        ) from exc


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file the controller loads, or None if it can."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory; give the file's path"
    if path.exists():
        return "not a regular file; give the path of a file"
    return "no such file"


def only_local_pool(directory: Path, namespace: str, fail: Callable[[str], NoReturn]) -> str:
    from controller.backend.local import POOL_KIND
    from loractl.objectdir import ObjectDirectory

    objects = ObjectDirectory(directory, namespace, {POOL_KIND})
    objects.reload()
    pools = [located.obj["metadata"]["name"] for located in objects.of_kind(POOL_KIND)]
    if len(pools) != 1:
        found = ", ".join(pools) if pools else "none"
        fail(f"--local {directory}: name the pool with --pool (InferencePools found: {found})")
    return str(pools[0])


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("loractl controller: error: --tls-cert and --tls-key go together")
    check_sources(args)
    for flag, path in (
        ("--models", args.models),
        ("--profile", args.profile),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
    ):
        problem = None if path is None else file_problem(path)
        if problem is not None:
            raise SystemExit(f"loractl controller: error: {flag} {path}: {problem}")
    if args.tls_cert is not None:
        check_tls(args.tls_cert, args.tls_key)
    # Imported here, not at the top: gRPC and the picker cost start-up time and memory that
    # the other subcommands (the sidecar above all) must not pay.
    from controller.app import serve
    from controller.scheduling.profile import ProfileError, load_profile
    from loractl.kube import KubeConfigError

    rng = random.Random(args.seed)
    try:
        pipeline = (
            load_profile(args.profile.read_text(), rng=rng)
            if args.profile
            else load_profile(rng=rng)
        )
    except ProfileError as exc:
        raise SystemExit(f"loractl controller: error: {args.profile}: {exc}") from exc
    try:
        asyncio.run(serve(args, pipeline, rng))
    except (KubeConfigError, CannotListen) as exc:
        raise SystemExit(f"loractl controller: error: {exc}") from exc
    return 0
