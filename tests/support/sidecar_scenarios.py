"""Sidecar scenarios that hold against any vLLM-compatible server: run against the
simulator (`tests/sidecar/test_sidecar_e2e.py`) and against real vLLM
(`tests/real_vllm/test_sidecar.py`). Each takes the server's URL and valid adapter
directories; what differs between the two (how adapters are made, how a server is
restarted) comes in as arguments.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from tests.support.metrics import value
from tests.support.sidecars import adapter_config
from tests.support.vllm_api import completion_text, registered

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory


def initial_sync_then_kubelet_style_edits(
    url: str, start_sidecar: SidecarFactory, a: str, b: str, c: str, d: str
) -> None:
    """Four distinct adapter directories; `c` is registered behind the sidecar's back first."""
    loaded = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": c}, timeout=30
    )
    assert loaded.status_code == 200, loaded.text
    sidecar = start_sidecar(url, adapter_config({"a": a, "b": b}, ("c",)))
    status = sidecar.wait_states(a="loaded", b="loaded", c="unloaded")
    assert registered(url) == {"a": a, "b": b}
    assert status["config"]["generation"] == 1
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200
    assert value(sidecar.url, "lora_syncer_adapter_status", adapter_name="a") == 1
    assert (
        value(sidecar.url, "loractl_sidecar_adapter_state", adapter_name="a", state="loaded") == 1
    )

    # An edit arrives as a `..data` symlink swap; resync is 30 s, so only the watch can see it.
    sidecar.publish(adapter_config({"b": b, "d": d}, ("a",)))
    sidecar.wait_states(timeout=5.0, a="unloaded", d="loaded")
    assert registered(url) == {"b": b, "d": d}
    assert sidecar.status()["config"]["generation"] == 2


def source_change_reloads_in_place(
    url: str, start_sidecar: SidecarFactory, v1: str, v2: str
) -> None:
    """`v1` and `v2` hold different weights: after the edit the same name answers as `v2`."""
    sidecar = start_sidecar(url, adapter_config({"review": v1}))
    sidecar.wait_states(review="loaded")
    before = completion_text(url, "review")
    sidecar.publish(adapter_config({"review": v2}))
    sidecar.wait_for(lambda s: s["adapters"]["review"]["path"] == v2, what="reloaded from v2")
    assert registered(url) == {"review": v2}
    assert completion_text(url, "review") != before
    assert sidecar.adapter("review")["state"] == "loaded"


def incomplete_copy(adapter: str, where: Path) -> str:
    """A copy whose config lacks `target_modules`: fine by the sidecar's own checks, refused
    by vLLM's worker."""
    shutil.copytree(adapter, where)
    config = json.loads((where / "adapter_config.json").read_text())
    del config["target_modules"]
    (where / "adapter_config.json").write_text(json.dumps(config))
    return str(where)


def bad_adapters_fail_with_reasons(
    url: str, start_sidecar: SidecarFactory, good: str, big: str, incomplete: str
) -> None:
    """The server runs with `--max-lora-rank 8`; `big` has rank 16; `incomplete` comes
    from `incomplete_copy`."""
    config = adapter_config(
        {"good": good, "big": big, "incomplete": incomplete, "gone": "/nowhere/at/all",
         "bad-form": "s3://bucket/x"}
    )  # fmt: skip
    sidecar = start_sidecar(url, config, "--ready-when", "any")
    sidecar.wait_states(good="loaded", big="failed", gone="failed", incomplete="failed")
    assert sidecar.adapter("bad-form")["state"] == "failed"
    assert registered(url) == {"good": good}
    big_status = sidecar.adapter("big")
    assert big_status["last_error"]["reason"] == "bad_artifact"
    assert "--max-lora-rank" in big_status["last_error"]["message"]
    assert sidecar.adapter("gone")["last_error"]["reason"] == "bad_artifact"
    refused = sidecar.adapter("incomplete")["last_error"]
    assert refused["reason"] == "bad_artifact", refused
    assert "Missing required configuration fields" in refused["message"]
    assert sidecar.adapter("bad-form")["last_error"]["reason"] == "invalid_spec"
    # Backoff: the bad one is retried, later and later, while the good one stays loaded.
    sidecar.wait_for(lambda s: s["adapters"]["big"]["attempts"] >= 3, timeout=10, what="retries")
    assert value(sidecar.url, "loractl_sidecar_failures_total", adapter_name="big",
                 reason="bad_artifact") >= 3  # fmt: skip
    good_status = sidecar.adapter("good")
    assert good_status["attempts"] == 1, good_status  # its last_error tells why, if any
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200, "--ready-when any"


def server_restart_is_noticed_and_adapters_come_back(
    url: str,
    start_sidecar: SidecarFactory,
    a: str,
    b: str,
    go_down: Callable[[], object],
    come_back: Callable[[], object],
    within: float = 2.0,
) -> None:
    """`go_down` makes the server unreachable and forget its adapters, as a restarted vLLM
    does; `come_back` returns once it answers /health again."""
    sidecar = start_sidecar(url, adapter_config({"a": a, "b": b}))
    sidecar.wait_states(a="loaded", b="loaded")
    go_down()
    sidecar.wait_for(lambda s: not s["vllm"]["reachable"], timeout=5, what="vLLM seen down")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 503
    come_back()
    back = time.monotonic()
    while registered(url) != {"a": a, "b": b}:
        assert time.monotonic() - back < within, (
            f"not re-registered {within} s after health returned: {registered(url)}"
        )
        time.sleep(0.02)
    sidecar.wait_states(a="loaded", b="loaded")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200
