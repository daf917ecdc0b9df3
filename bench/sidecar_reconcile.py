"""How fast the sidecar turns a ConfigMap edit into vLLM calls, and what it costs.

1. Edit latency: the config is changed the way the kubelet changes a mounted
   ConfigMap (a `..data` symlink swap); the figure is the time from just before
   the swap to the simulator logging the resulting load request. Each edit
   loads one new adapter and unloads the previous one.
2. Reconcile of N adapters: one edit adds N adapters, a second removes them all;
   time from the swap to the simulator logging the last load (or unload).
3. Memory: the sidecar's resident set size (current and peak) at the end.

The simulator runs with `--time-scale 0`, so every figure is the sidecar's own
cost (plus two local HTTP hops). The goal from the sidecar issue: edit p99 <= 100 ms,
RSS <= 60 MB.

    python -m bench.sidecar_reconcile [--edits 60] [--adapters 100] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter
from tests.support.configmap_dir import write_configmap_dir

CONFIG_KEY = "configmap.yaml"
BASE_ADAPTERS = 3
EVENT_TIMEOUT_S = 30.0


def config_text(ensure_exist: dict[str, str], ensure_not_exist: list[str]) -> str:
    return yaml.safe_dump(
        {
            "vLLMLoRAConfig": {
                "ensureExist": {
                    "models": [{"id": i, "source": s} for i, s in ensure_exist.items()]
                },
                "ensureNotExist": {
                    "models": [{"id": i, "source": "org/x"} for i in ensure_not_exist]
                },
            }
        }
    )


class SimulatorLog:
    """Follows the simulator's JSON log: when did each load/unload request arrive."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.seen: dict[tuple[str, str], float] = {}

    def _read(self) -> None:
        with self._path.open() as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete, _, _ = chunk.rpartition("\n")
        self._offset += len(complete) + (1 if complete else 0)
        for line in complete.splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") in ("lora_loaded", "lora_unloaded"):
                stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                self.seen[(event["event"], event["lora_name"])] = stamp.timestamp()

    def wait(self, keys: list[tuple[str, str]]) -> float:
        """Arrival time of the last of `keys`."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while True:
            self._read()
            if all(k in self.seen for k in keys):
                return max(self.seen[k] for k in keys)
            if time.monotonic() > deadline:
                missing = [k for k in keys if k not in self.seen]
                raise TimeoutError(f"simulator never logged {missing[:5]}")
            time.sleep(0.005)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def started(process: ChildProcess, url: str) -> ChildProcess:
    process.start()
    process.wait_http_ok(url)
    return process


def run(work: Path, edits: int, many: int) -> dict[str, Any]:
    adapters = {
        f"a{i}": str(write_adapter(work / "adapters" / f"a{i}", seed=i))
        for i in range(max(edits + 1, many))
    }
    base = {
        f"base{i}": str(write_adapter(work / "adapters" / f"base{i}", seed=10_000 + i))
        for i in range(BASE_ADAPTERS)
    }
    config_dir = work / "config"
    write_configmap_dir(config_dir, {CONFIG_KEY: config_text(base, [])})
    sim_port, sidecar_port = free_port(), free_port()
    sim_log = work / "sim.log"
    sim = ChildProcess(
        "sim",
        [
            sys.executable,
            "-m",
            "loractl",
            "sim",
            "--port",
            str(sim_port),
            "--time-scale",
            "0",
            "--allow-runtime-lora-updating",
            "--max-cpu-loras",
            str(many + 8),
        ],
        sim_log,
    )
    sidecar = ChildProcess(
        "sidecar",
        [
            sys.executable,
            "-m",
            "loractl",
            "sidecar",
            "--host",
            "127.0.0.1",
            "--port",
            str(sidecar_port),
            "--config",
            str(config_dir / CONFIG_KEY),
            "--vllm-url",
            f"http://127.0.0.1:{sim_port}",
            "--adapter-dir",
            str(work / "cache"),
            "--log-level",
            "warning",
        ],
        work / "sidecar.log",
    )
    try:
        started(sim, f"http://127.0.0.1:{sim_port}/health")
        started(sidecar, f"http://127.0.0.1:{sidecar_port}/healthz")
        log = SimulatorLog(sim_log)
        log.wait([("lora_loaded", name) for name in base])
        latencies = list(edit_latencies(config_dir, log, base, adapters, edits))
        add_all = {**base, **{f"a{i}": adapters[f"a{i}"] for i in range(many)}}
        swap = time.time()
        write_configmap_dir(config_dir, {CONFIG_KEY: config_text(add_all, [])})
        load_all = log.wait([("lora_loaded", f"a{i}") for i in range(many)]) - swap
        httpx.get(f"http://127.0.0.1:{sidecar_port}/status", timeout=5).raise_for_status()
        rss, peak = rss_mb(sidecar.pid)
        log.seen.clear()
        swap = time.time()
        write_configmap_dir(
            config_dir, {CONFIG_KEY: config_text(base, [f"a{i}" for i in range(many)])}
        )
        unload_all = log.wait([("lora_unloaded", f"a{i}") for i in range(many)]) - swap
    finally:
        sidecar.stop()
        sim.stop()
    return {
        "benchmark": "sidecar_reconcile",
        "edits": len(latencies),
        "edit_latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "edit_latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "edit_latency_max_ms": round(max(latencies) * 1000, 1),
        "adapters": many,
        "load_all_seconds": round(load_all, 3),
        "unload_all_seconds": round(unload_all, 3),
        "sidecar_rss_mb": round(rss, 1),
        "sidecar_peak_rss_mb": round(peak, 1),
        "python": sys.version.split()[0],
    }


def edit_latencies(
    config_dir: Path, log: SimulatorLog, base: dict[str, str], adapters: dict[str, str], edits: int
) -> Iterator[float]:
    previous: list[str] = []
    for i in range(edits):
        name = f"a{i}"
        text = config_text({**base, name: adapters[name]}, previous)
        swap = time.time()
        write_configmap_dir(config_dir, {CONFIG_KEY: text})
        yield log.wait([("lora_loaded", name)]) - swap
        if previous:
            log.wait([("lora_unloaded", previous[0])])
        previous = [name]
        time.sleep(0.05)  # let the sidecar settle, so edits do not overlap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as work:
        result = run(Path(work), args.edits, args.adapters)
    if not args.json_only:
        print(f"edits (symlink swap -> load request)  {result['edits']}")
        print(
            f"  p50 / p99 / max                      {result['edit_latency_p50_ms']} / "
            f"{result['edit_latency_p99_ms']} / {result['edit_latency_max_ms']} ms"
        )
        print(
            f"{result['adapters']} adapters: load all / unload all   "
            f"{result['load_all_seconds']} s / {result['unload_all_seconds']} s"
        )
        print(
            f"sidecar RSS (peak)                     {result['sidecar_rss_mb']} MB "
            f"({result['sidecar_peak_rss_mb']} MB)"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
