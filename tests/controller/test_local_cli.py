"""Local mode through the real commands: a sidecar following the ConfigMap in a directory,
`loractl adapters ls` and `loractl canary status` reading it, and the flag checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from controller.backend.local import ENDPOINTS_ANNOTATION
from tests.conftest import SidecarFactory, SimulatorFactory
from tests.support.sidecars import adapter_config

POOL = "pool"
CONFIGMAP = "adapters"
KEY = "configmap.yaml"


def loractl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loractl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pool(name: str, endpoints: str) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "annotations": {ENDPOINTS_ANNOTATION: endpoints}},
        "spec": {"selector": {"matchLabels": {"app": name}}, "targetPorts": [{"number": 8000}]},
    }


def configmap(text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIGMAP},
            "data": {KEY: text}}  # fmt: skip


def write(path: Path, *documents: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump_all(documents))


def test_a_sidecar_follows_the_configmap_file_and_adapters_ls_reports_it(
    tmp_path: Path,
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Any,
) -> None:
    first, second, own = adapters("first"), adapters("second"), adapters("own")
    objects = tmp_path / "objects"
    objects.mkdir()
    write(objects / "adapters.yaml", configmap(adapter_config({"first": first})))
    sim = start_simulator("--max-loras", "2")
    # Its own file lists another adapter: the directory's ConfigMap is ahead of it.
    sidecar = start_sidecar(
        sim.url, adapter_config({"own": own}),
        "--local", str(objects), "--watch-configmap", f"default/{CONFIGMAP}",
    )  # fmt: skip
    sidecar.wait_states(first="loaded")
    assert "own" not in sidecar.status()["adapters"]

    write(objects / "adapters.yaml", configmap(adapter_config({"second": second}, ("first",))))
    sidecar.wait_states(second="loaded", first="unloaded")

    sidecar_port = sidecar.url.rsplit(":", 1)[1]
    address = sim.url.removeprefix("http://")
    write(objects / "pool.yaml", pool(POOL, f"{address} sidecar={sidecar_port}"))
    done = loractl(
        "adapters", "ls", "--local", str(objects), "--pool", POOL,
        "--configmap", CONFIGMAP, "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["pods"]
    assert row["name"] == address
    assert row["adapters"]["second"] == "loaded"


def test_canary_status_reads_the_rollout_from_the_files(tmp_path: Path) -> None:
    rollout = {
        "apiVersion": "loractl.io/v1alpha1",
        "kind": "AdapterRollout",
        "metadata": {"name": "food-review-v2", "creationTimestamp": "2026-11-21T10:00:00Z"},
        "spec": {
            "model": "food-review", "pool": POOL,
            "from": {"id": "v1", "source": "/a/v1"}, "to": {"id": "v2", "source": "/a/v2"},
            "configMap": {"name": CONFIGMAP}, "steps": [{"weight": 50}],
        },
        "status": {"phase": "Progressing", "currentStep": 0, "weights": {"v1": 50, "v2": 50}},
    }  # fmt: skip
    write(tmp_path / "rollout.yaml", rollout)
    done = loractl("canary", "status", "food-review", "--local", str(tmp_path), "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"]["phase"] == "Progressing"

    missing = loractl("canary", "status", "chat", "--local", str(tmp_path))
    assert missing.returncode == 2
    assert "chat" in missing.stderr


def test_local_flags_are_checked_before_anything_starts(tmp_path: Path) -> None:
    write(tmp_path / "pools.yaml", pool("a", ""), pool("b", ""))
    several = loractl("controller", "--local", str(tmp_path))
    assert several.returncode != 0
    assert "name the pool with --pool (InferencePools found: a, b)" in several.stderr

    absent = loractl("controller", "--local", str(tmp_path / "nowhere"))
    assert "no such directory" in absent.stderr

    both = loractl("controller", "--local", str(tmp_path), "--endpoints", "127.0.0.1:1")
    assert "drop --endpoints" in both.stderr

    sidecar = loractl("sidecar", "--local", str(tmp_path))
    assert sidecar.returncode != 0
    assert "needs --watch-configmap" in sidecar.stderr

    follow = ("--watch-configmap", f"default/{CONFIGMAP}")
    nowhere = loractl("sidecar", "--local", str(tmp_path / "nowhere"), *follow)
    assert "--local" in nowhere.stderr
    assert "no such directory" in nowhere.stderr
    annotate = loractl("sidecar", "--local", str(tmp_path), *follow, "--annotate-pod")
    assert "--annotate-pod needs a cluster, not --local" in annotate.stderr


def test_the_demo_refuses_a_state_directory_that_holds_files(tmp_path: Path) -> None:
    kept = tmp_path / "notes.txt"
    kept.write_text("mine")
    done = loractl("demo", "--fast", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "is not empty; give a new one" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"], "nothing written there"
    assert kept.read_text() == "mine"
