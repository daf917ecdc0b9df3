"""Fault injection: the failures the sidecar and the picker must survive, on demand."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import SimulatorFactory

FAST = ("--time-scale", "0")


def test_restart_forgets_runtime_adapters_and_refuses_connections_meanwhile(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    static = adapters("static")
    sim = start_simulator(*FAST, "--lora-modules", f"static={static}")
    with sim.client() as client:
        client.post("/v1/load_lora_adapter", json={"lora_name": "dyn", "lora_path": adapters()})
        assert client.post("/sim/restart", json={"downtime_seconds": 1.0}).status_code == 200
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.url}/health", timeout=1.0)
    sim.process.wait_http_ok(f"{sim.url}/health", timeout=10)
    ids = {card["id"] for card in httpx.get(f"{sim.url}/v1/models").json()["data"]}
    assert "dyn" not in ids
    assert "static" in ids, "--lora-modules come back with the process"


def test_unhealthy_window_then_recovery(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator(*FAST)
    with sim.client() as client:
        client.post("/sim/unhealthy", json={"seconds": 0.5})
        assert client.get("/health").status_code == 503
        time.sleep(0.6)
        assert client.get("/health").status_code == 200


def test_error_rate_per_model(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST, "--seed", "7")
    body = {"prompt": "hi", "max_tokens": 2}
    with sim.client() as client:
        client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": adapters()})
        client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": adapters()})
        client.post("/sim/error-rate", json={"model": "bad", "rate": 0.5, "status": 503})
        bad = [client.post("/v1/completions", json={"model": "bad", **body}) for _ in range(200)]
        good = [client.post("/v1/completions", json={"model": "good", **body}) for _ in range(50)]
        failed = [r for r in bad if r.status_code != 200]
        assert 60 <= len(failed) <= 140
        assert {r.status_code for r in failed} == {503}
        assert failed[0].json()["error"]["type"] == "InternalServerError"
        assert all(r.status_code == 200 for r in good)
        client.delete("/sim/faults")
        assert client.post("/v1/completions", json={"model": "bad", **body}).status_code == 200


def test_extra_latency_delays_the_first_token(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator("--inter-token-ms", "0", "--prefill-ms-per-token", "0")
    with sim.client() as client:
        client.post("/sim/latency", json={"extra_ms": 400})
        started = time.monotonic()
        assert (
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code
            == 200
        )
        assert time.monotonic() - started >= 0.4
