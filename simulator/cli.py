"""`loractl sim`: flags mirror vLLM's server; `--sim-*`-style extras drive the latency model."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog

from loractl import logs
from loractl.flags import CannotListen, port_or_zero
from simulator.server import SimServer
from simulator.service import Simulator
from simulator.settings import (
    LatencyModel,
    LoraModule,
    SimSettings,
    runtime_lora_updating_from_env,
)

log = structlog.get_logger("simulator")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sim",
        help="run a vLLM-faithful simulator (same API, errors, metrics, LoRA slots)",
        description="A server a client cannot tell from vLLM for everything loractl touches.",
    )
    vllm = parser.add_argument_group("vLLM flags (same meaning as vLLM's)")
    vllm.add_argument("--host", default="127.0.0.1", help="address to listen on")
    vllm.add_argument("--port", type=port_or_zero, default=8000, help="0 picks a free port")
    vllm.add_argument(
        "--model", default=SimSettings.model, help="base model name (nothing is downloaded)"
    )
    vllm.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="names clients may use for the base model (default: --model)",
    )
    vllm.add_argument("--enable-lora", action="store_true", help="accepted; LoRA is always on")
    vllm.add_argument(
        "--max-loras", type=int, default=1, help="adapters in GPU slots at once (default 1)"
    )
    vllm.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in the CPU cache, at least --max-loras (default: --max-loras)",
    )
    vllm.add_argument(
        "--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (default 16)"
    )
    vllm.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences running at once (default 256)"
    )
    vllm.add_argument(
        "--max-model-len",
        type=int,
        default=2048,
        help="prompt plus completion tokens allowed per request (default 2048)",
    )
    vllm.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help='adapters loaded at start: name=path or {"name": ..., "path": ...}',
    )
    vllm.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (env VLLM_API_KEY)",
    )
    vllm.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="send token usage in every stream, as if each client asked for it",
    )
    sim = parser.add_argument_group("simulator flags")
    sim.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve the load/unload routes even without VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
    )
    sim.add_argument(
        "--export-lora-loaded",
        action="store_true",
        help="export vllm:lora_adapter_loaded{adapter_name,level} (proposed upstream)",
    )
    sim.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=LatencyModel.prefill_ms_per_token,
        help="simulated prefill time per prompt token",
    )
    sim.add_argument(
        "--inter-token-ms",
        type=float,
        default=LatencyModel.inter_token_ms,
        help="simulated time between generated tokens",
    )
    sim.add_argument(
        "--swap-in-ms",
        type=float,
        default=LatencyModel.swap_in_ms,
        help="moving an adapter from the CPU cache into a GPU slot",
    )
    sim.add_argument(
        "--disk-load-ms",
        type=float,
        default=LatencyModel.disk_load_ms,
        help="reading an adapter from disk (load, or use after CPU eviction)",
    )
    sim.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per simulated second; 0 removes all latency",
    )
    sim.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=SimSettings.kv_cache_tokens,
        help="KV-cache capacity in tokens: the base of vllm:kv_cache_usage_perc, and what "
        "makes requests wait when full",
    )
    sim.add_argument(
        "--seed", type=int, default=0, help="seed of the injected faults' random draws"
    )
    logs.add_level_option(sim)
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_names=tuple(args.served_model_name),
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        lora_modules=tuple(LoraModule.parse(text) for text in args.lora_modules),
        api_key=args.api_key or None,
        runtime_lora_updating=args.allow_runtime_lora_updating or runtime_lora_updating_from_env(),
        force_include_usage=args.enable_force_include_usage,
        export_lora_loaded=args.export_lora_loaded,
        latency=LatencyModel(
            prefill_ms_per_token=args.prefill_ms_per_token,
            inter_token_ms=args.inter_token_ms,
            swap_in_ms=args.swap_in_ms,
            disk_load_ms=args.disk_load_ms,
            time_scale=args.time_scale,
        ),
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    try:
        settings = settings_from_args(args)
        simulator = Simulator(settings)
    except ValueError as exc:
        print(f"loractl sim: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(simulator))
    except CannotListen as exc:
        raise SystemExit(f"loractl sim: error: {exc}") from exc
    return 0


async def serve(simulator: Simulator) -> None:
    server = SimServer(simulator)
    await server.start()
    settings = simulator.settings
    log.info(
        "listening",
        host=settings.host,
        port=server.port,
        model=settings.base_names[0],
        max_loras=settings.max_loras,
        runtime_lora_updating=settings.runtime_lora_updating,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop()
