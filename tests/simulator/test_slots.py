"""LoRA slot behaviour over HTTP, observed the way the picker will observe it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import SimulatorFactory
from tests.support.metrics import samples, value


def load(client: httpx.Client, name: str, path: str) -> None:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert response.status_code == 200, response.text


def complete(url: str, model: str, max_tokens: int = 5) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": "How was the soup?", "max_tokens": max_tokens},
        timeout=30.0,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_three_adapters_on_two_slots_swap_and_wait(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator("--max-loras", "2", "--max-cpu-loras", "3", "--inter-token-ms", "150")
    with sim.client() as client:
        for name in ("a", "b", "c"):
            load(client, name, adapters(name))

    def third_is_waiting() -> bool:
        # As in vLLM 0.32, both labels name every adapter with a request in flight.
        return any(
            name == "vllm:lora_requests_info"
            and labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == "a,b,c"
            for name, labels, _ in samples(sim.url)
        )

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(complete, sim.url, name) for name in ("a", "b")]
        wait_for(lambda: value(sim.url, "vllm:num_requests_running") == 2)
        third = pool.submit(complete, sim.url, "c")
        wait_for(third_is_waiting)
        assert value(sim.url, "vllm:num_requests_waiting") == 1
        assert value(sim.url, "vllm:num_requests_waiting_by_reason", reason="deferred") == 1
        answers = [f.result() for f in (*first, third)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["model"] for a in answers] == ["a", "b", "c"]
    assert value(sim.url, "sim:lora_swaps_total") == 3
    # Alternating between three adapters on two slots keeps swapping.
    for name in ("a", "b", "c", "a"):
        assert complete(sim.url, name).status_code == 200
    assert value(sim.url, "sim:lora_swaps_total") >= 6
    info = [s for s in samples(sim.url) if s[0] == "vllm:lora_requests_info"]
    assert {labels["max_lora"] for _, labels, _ in info} == {"2"}
    assert len(info) > 1, "old label sets stay exported, as in vLLM"


def test_adapter_evicted_from_cpu_cache_still_answers_after_a_disk_read(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator("--max-loras", "1", "--max-cpu-loras", "2", "--time-scale", "0")
    with sim.client() as client:
        for name in ("a", "b", "c"):
            load(client, name, adapters(name))
        state = client.get("/sim/state").json()
        assert state["cpu_cache"] == ["b", "c"]
        assert set(state["registered"]) == {"a", "b", "c"}
        models = {card["id"] for card in client.get("/v1/models").json()["data"]}
        assert {"a", "b", "c"} <= models
    answer = complete(sim.url, "a")
    assert answer.status_code == 200
    assert answer.json()["model"] == "a"
    assert value(sim.url, "sim:lora_swaps_total", adapter_name="a", source="disk") == 1
    assert value(sim.url, "sim:lora_swaps_total", adapter_name="b", source="disk") == 0


def test_unregistered_adapter_is_404(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator("--time-scale", "0")
    answer = complete(sim.url, "never-loaded")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == (
        "The model `never-loaded` does not exist. Valid aliases: meta-llama/Llama-3.1-8B-Instruct."
    )


def test_lora_adapter_loaded_metric_shows_residency_when_enabled(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator("--max-loras", "1", "--max-cpu-loras", "2", "--time-scale", "0",
                          "--export-lora-loaded")  # fmt: skip
    with sim.client() as client:
        load(client, "a", adapters("a"))
        load(client, "b", adapters("b"))
    assert complete(sim.url, "a").status_code == 200
    assert value(sim.url, "vllm:lora_adapter_loaded", adapter_name="a", level="gpu") == 1
    assert value(sim.url, "vllm:lora_adapter_loaded", adapter_name="b", level="gpu") == 0
    assert value(sim.url, "vllm:lora_adapter_loaded", adapter_name="b", level="cpu") == 1
