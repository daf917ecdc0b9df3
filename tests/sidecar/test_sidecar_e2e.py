"""The sidecar as a real process beside a real simulator, configured like in a Pod."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from simulator.adapter_files import write_adapter
from tests.conftest import SidecarFactory, SimulatorFactory
from tests.support.hub_cache import cache_snapshot
from tests.support.metrics import value
from tests.support.sidecars import adapter_config

FAST = ("--time-scale", "0")


def registered(sim_url: str) -> dict[str, str]:
    cards = httpx.get(f"{sim_url}/v1/models", timeout=5.0).json()["data"]
    return {c["id"]: c["root"] for c in cards if c["parent"]}


def completion_text(sim_url: str, model: str) -> str:
    answer = httpx.post(
        f"{sim_url}/v1/completions",
        json={"model": model, "prompt": "How was the soup?", "max_tokens": 10},
        timeout=5.0,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def test_initial_sync_then_kubelet_style_edits(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a, b, c, d = adapters("a"), adapters("b"), adapters("c"), adapters("d")
    httpx.post(f"{sim.url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": c})
    sidecar = start_sidecar(sim.url, adapter_config({"a": a, "b": b}, ("c",)))
    status = sidecar.wait_states(a="loaded", b="loaded", c="unloaded")
    assert registered(sim.url) == {"a": a, "b": b}
    assert status["config"]["generation"] == 1
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200
    assert value(sidecar.url, "lora_syncer_adapter_status", adapter_name="a") == 1
    assert (
        value(sidecar.url, "loractl_sidecar_adapter_state", adapter_name="a", state="loaded") == 1
    )

    # An edit arrives as a `..data` symlink swap; resync is 30 s, so only the watch can see it.
    sidecar.publish(adapter_config({"b": b, "d": d}, ("a",)))
    sidecar.wait_states(timeout=5.0, a="unloaded", d="loaded")
    assert registered(sim.url) == {"b": b, "d": d}
    assert sidecar.status()["config"]["generation"] == 2


def test_source_change_reloads_so_the_name_never_serves_stale_weights(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    v1, v2 = adapters("review-v1"), adapters("review-v2")
    sidecar = start_sidecar(sim.url, adapter_config({"review": v1}))
    sidecar.wait_states(review="loaded")
    before = completion_text(sim.url, "review")
    sidecar.publish(adapter_config({"review": v2}))
    sidecar.wait_for(lambda s: s["adapters"]["review"]["path"] == v2, what="reloaded from v2")
    assert registered(sim.url) == {"review": v2}
    assert completion_text(sim.url, "review") != before
    assert sidecar.adapter("review")["state"] == "loaded"


def test_vllm_restart_is_noticed_and_adapters_come_back(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a, b = adapters("a"), adapters("b")
    sidecar = start_sidecar(sim.url, adapter_config({"a": a, "b": b}))
    sidecar.wait_states(a="loaded", b="loaded")
    httpx.post(f"{sim.url}/sim/restart", json={"downtime_seconds": 1.5})
    sidecar.wait_for(lambda s: not s["vllm"]["reachable"], timeout=5, what="vLLM seen down")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 503
    sim.process.wait_http_ok(f"{sim.url}/health", timeout=10)
    back = time.monotonic()
    while registered(sim.url) != {"a": a, "b": b}:
        assert time.monotonic() - back < 2.0, (
            f"not re-registered 2 s after health returned: {registered(sim.url)}"
        )
        time.sleep(0.02)
    sidecar.wait_states(a="loaded", b="loaded")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200


def test_bad_adapters_fail_with_reasons_while_good_ones_load(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST, "--max-lora-rank", "8")
    good, big = adapters("good"), adapters("big", rank=16)
    config = adapter_config(
        {"good": good, "big": big, "gone": "/nowhere/at/all", "bad-form": "s3://bucket/x"}
    )
    sidecar = start_sidecar(sim.url, config, "--ready-when", "any")
    sidecar.wait_states(good="loaded", big="failed", gone="failed")
    assert sidecar.adapter("bad-form")["state"] == "failed"
    assert registered(sim.url) == {"good": good}
    big_status = sidecar.adapter("big")
    assert big_status["last_error"]["reason"] == "bad_artifact"
    assert "--max-lora-rank" in big_status["last_error"]["message"]
    assert sidecar.adapter("gone")["last_error"]["reason"] == "bad_artifact"
    assert sidecar.adapter("bad-form")["last_error"]["reason"] == "invalid_spec"
    # Backoff: the bad one is retried, later and later, while the good one stays loaded.
    sidecar.wait_for(lambda s: s["adapters"]["big"]["attempts"] >= 3, timeout=10, what="retries")
    assert value(sidecar.url, "loractl_sidecar_failures_total", adapter_name="big",
                 reason="bad_artifact") >= 3  # fmt: skip
    assert sidecar.adapter("good")["attempts"] == 1
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200, "--ready-when any"


def test_runtime_updating_disabled_is_reported_as_configuration(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST, env={})
    sidecar = start_sidecar(sim.url, adapter_config({"a": adapters()}))
    sidecar.wait_states(a="failed")
    error = sidecar.adapter("a")["last_error"]
    assert error["reason"] == "configuration"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in error["message"]
    readiness = httpx.get(f"{sidecar.url}/readyz")
    assert readiness.status_code == 503
    assert "not loaded yet: a" in readiness.json()["reason"]


def test_bad_yaml_keeps_the_last_good_state(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a, b = adapters("a"), adapters("b")
    sidecar = start_sidecar(sim.url, adapter_config({"a": a}))
    sidecar.wait_states(a="loaded")
    for broken, fragment in (
        ("vLLMLoRAConfig: {ensureExist: [", "not valid YAML"),
        ("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: x}\n", "Field required"),
    ):
        generation = sidecar.status()["config"]["generation"]
        sidecar.publish(broken)
        status = sidecar.wait_for(lambda s: s["config"]["error"] is not None, what="error shown")
        assert fragment in status["config"]["error"]
        assert status["config"]["generation"] == generation, "a rejected document is no generation"
        assert registered(sim.url) == {"a": a}, "nothing unloaded because of a broken document"
        assert status["adapters"]["a"]["state"] == "loaded"
        assert value(sidecar.url, "loractl_sidecar_config_valid") == 0
        sidecar.publish(adapter_config({"a": a}))
        sidecar.wait_for(lambda s: s["config"]["error"] is None, what="error cleared")
    assert value(sidecar.url, "loractl_sidecar_config_errors_total") == 2
    sidecar.publish(adapter_config({"a": a, "b": b}))
    sidecar.wait_states(b="loaded")
    assert sidecar.process.alive()


def test_missing_config_then_it_appears(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    sidecar = start_sidecar(sim.url, None)
    status = sidecar.wait_for(lambda s: s["config"]["error"] is not None, what="missing file")
    assert "cannot read" in status["config"]["error"]
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 503
    a = adapters()
    sidecar.publish(adapter_config({"a": a}))
    sidecar.wait_states(a="loaded")


def test_unlisted_adapters_are_only_removed_with_prune(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    stranger, a = adapters("stranger"), adapters("a")
    httpx.post(
        f"{sim.url}/v1/load_lora_adapter", json={"lora_name": "stranger", "lora_path": stranger}
    )
    config = adapter_config({"a": a})
    polite = start_sidecar(sim.url, config)
    polite.wait_states(a="loaded")
    assert "stranger" in registered(sim.url)
    polite.process.stop()
    pruning = start_sidecar(sim.url, config, "--prune")
    pruning.wait_for(lambda s: "stranger" not in registered(sim.url), what="pruned")
    assert registered(sim.url) == {"a": a}


def test_sigterm_stops_cleanly_and_never_unloads(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a = adapters()
    sidecar = start_sidecar(sim.url, adapter_config({"a": a}))
    sidecar.wait_states(a="loaded")
    sidecar.process.signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=5) == 0
    assert registered(sim.url) == {"a": a}
    assert '"event": "stopping"' in sidecar.process.log_tail()


def test_api_key_is_used_and_never_logged(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST, "--api-key", "very-secret-key")
    sidecar = start_sidecar(
        sim.url, adapter_config({"a": adapters()}), env={"VLLM_API_KEY": "very-secret-key"}
    )
    sidecar.wait_states(a="loaded")
    assert "very-secret-key" not in sidecar.process.log_path.read_text()
    assert "very-secret-key" not in httpx.get(f"{sidecar.url}/status").text


def test_adopts_what_is_already_registered_after_a_sidecar_restart(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a = adapters()
    config = adapter_config({"a": a})
    first = start_sidecar(sim.url, config)
    first.wait_states(a="loaded")
    first.process.stop()
    second = start_sidecar(sim.url, config)
    second.wait_states(a="loaded")
    assert second.adapter("a")["attempts"] == 0, "adopted, not loaded again"


def test_hugging_face_source_offline_from_a_prepared_cache(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    tmp_path: Path,
) -> None:
    made = write_adapter(tmp_path / "made")
    files = {p.name: p.read_bytes() for p in made.iterdir()}
    files["pytorch_model.bin"] = bytes(4096)  # not an adapter file: must not be copied
    cache = tmp_path / "hub-cache"
    sha = "c" * 40
    cache_snapshot(cache, "org/food-lora", sha, files, refs=("main",))
    hub_env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "hf_never_print_me"}  # fmt: skip
    sim = start_simulator(*FAST)
    sidecar = start_sidecar(sim.url, adapter_config({"food": "org/food-lora"}), env=hub_env)
    status = sidecar.wait_states(food="loaded")
    expected = sidecar.adapter_dir / "food" / sha
    assert status["adapters"]["food"]["revision"] == sha
    assert registered(sim.url) == {"food": str(expected)}
    assert sorted(p.name for p in expected.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors"]
    )
    sidecar.publish(adapter_config({}, ("food",)))
    sidecar.wait_states(food="unloaded")
    assert not (sidecar.adapter_dir / "food").exists(), "cached copy deleted after unload"
    assert "hf_never_print_me" not in sidecar.process.log_path.read_text()


def test_base_model_mismatch_is_a_warning_not_a_failure(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    trained_elsewhere = adapters("elsewhere", base_model="mistralai/Mistral-7B-v0.1")
    matching = adapters("matching", base_model="meta-llama/Llama-3.1-8B-Instruct")
    config = adapter_config(
        {"elsewhere": trained_elsewhere, "matching": matching},
        defaultBaseModel="meta-llama/Llama-3.1-8B-Instruct",
    )
    sidecar = start_sidecar(sim.url, config)
    status = sidecar.wait_states(elsewhere="loaded", matching="loaded")
    [warning] = status["adapters"]["elsewhere"]["warnings"]
    assert "mistralai/Mistral-7B-v0.1" in warning
    assert status["adapters"]["matching"]["warnings"] == []
    assert '"event": "base_model_mismatch"' in sidecar.process.log_path.read_text()


def test_an_adapter_listed_after_startup_does_not_take_the_pod_out_of_service(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    first = adapters("first")
    sidecar = start_sidecar(sim.url, adapter_config({"first": first}))
    sidecar.wait_states(first="loaded")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 200
    # A canary lists its new version in the pool's shared ConfigMap; this one never loads.
    sidecar.publish(adapter_config({"first": first, "broken": "/nowhere/at/all"}))
    sidecar.wait_states(broken="failed")
    readyz = httpx.get(f"{sidecar.url}/readyz")
    assert readyz.status_code == 200, readyz.text
    assert "broken" in sidecar.status()["ready_reason"]

    # vLLM restarting resets it: the pod waits for its adapters again, all of them, as a
    # new pod would (until the rollout controller takes the broken one out of the list).
    httpx.post(f"{sim.url}/sim/restart", json={"downtime_seconds": 1.0}, timeout=5)
    sidecar.wait_for(lambda s: not s["vllm"]["reachable"], timeout=10, what="vLLM down")
    sidecar.wait_for(lambda s: s["vllm"]["reachable"], timeout=15, what="vLLM back")
    sidecar.wait_states(first="loaded")
    assert httpx.get(f"{sidecar.url}/readyz").status_code == 503
    sidecar.publish(adapter_config({"first": first}))
    sidecar.wait_for(lambda s: s["ready"], timeout=10, what="ready without the broken one")
