"""The sidecar as a real process beside a real simulator, configured like in a Pod."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import httpx

from simulator.adapter_files import write_adapter
from tests.conftest import SidecarFactory, SimulatorFactory
from tests.support.hub_cache import cache_snapshot
from tests.support.metrics import value
from tests.support.sidecar_scenarios import (
    bad_adapters_fail_with_reasons,
    incomplete_copy,
    initial_sync_then_kubelet_style_edits,
    server_restart_is_noticed_and_adapters_come_back,
    source_change_reloads_in_place,
)
from tests.support.sidecars import adapter_config
from tests.support.vllm_api import registered

FAST = ("--time-scale", "0")


def test_initial_sync_then_kubelet_style_edits(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    a, b, c, d = adapters("a"), adapters("b"), adapters("c"), adapters("d")
    initial_sync_then_kubelet_style_edits(sim.url, start_sidecar, a, b, c, d)


def test_source_change_reloads_so_the_name_never_serves_stale_weights(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    source_change_reloads_in_place(
        sim.url, start_sidecar, adapters("review-v1"), adapters("review-v2")
    )


def test_vllm_restart_is_noticed_and_adapters_come_back(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
) -> None:
    sim = start_simulator(*FAST)
    server_restart_is_noticed_and_adapters_come_back(
        sim.url,
        start_sidecar,
        adapters("a"),
        adapters("b"),
        go_down=lambda: httpx.post(f"{sim.url}/sim/restart", json={"downtime_seconds": 1.5}),
        come_back=lambda: sim.process.wait_http_ok(f"{sim.url}/health", timeout=10),
    )


def test_bad_adapters_fail_with_reasons_while_good_ones_load(
    start_simulator: SimulatorFactory,
    start_sidecar: SidecarFactory,
    adapters: Callable[..., str],
    tmp_path: Path,
) -> None:
    sim = start_simulator(*FAST, "--max-lora-rank", "8")
    good = adapters("good")
    incomplete = incomplete_copy(good, tmp_path / "incomplete")
    bad_adapters_fail_with_reasons(
        sim.url, start_sidecar, good, adapters("big", rank=16), incomplete
    )


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
