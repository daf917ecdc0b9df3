"""The vLLM client against a real simulator process: every answer classified."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.failures import AdapterFailure, FailureReason
from sidecar.vllm_client import VLLMClient, VLLMError
from tests.conftest import SimulatorFactory
from tests.support.sidecar_scenarios import incomplete_copy

FAST = ("--time-scale", "0")


@pytest.mark.asyncio
async def test_load_list_reload_unload(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST)
    first, second = adapters(), adapters()
    client = VLLMClient(sim.url)
    try:
        assert await client.healthy()
        assert await client.registered_adapters() == {}
        await client.load("a", first)
        assert await client.registered_adapters() == {"a": first}
        await client.load("a", second, inplace=True)
        assert await client.registered_adapters() == {"a": second}
        assert await client.unload("a") is True
        assert await client.unload("a") is False, "already gone is the desired outcome"
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_already_loaded_name_is_taken_over_in_place(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST)
    theirs, ours = adapters(), adapters()
    client = VLLMClient(sim.url)
    try:
        await client.load("a", theirs)
        await client.load("a", ours)
        assert await client.registered_adapters() == {"a": ours}
    finally:
        await client.aclose()


async def failure_of(client: VLLMClient, name: str, path: str) -> AdapterFailure:
    with pytest.raises(AdapterFailure) as caught:
        await client.load(name, path)
    return caught.value


@pytest.mark.asyncio
async def test_failures_are_classified(
    start_simulator: SimulatorFactory, adapters: Callable[..., str], tmp_path: Path
) -> None:
    sim = start_simulator(*FAST, "--max-lora-rank", "8")
    client = VLLMClient(sim.url)
    try:
        missing = await failure_of(client, "m", "/nowhere")
        assert missing.reason is FailureReason.BAD_ARTIFACT
        assert "/nowhere" in missing.message
        big = await failure_of(client, "big", adapters(rank=16))
        assert big.reason is FailureReason.BAD_ARTIFACT
        assert "--max-lora-rank" in big.message
        # vLLM answers 500 when its worker refuses an adapter: still the artifact's fault.
        refused = await failure_of(client, "half", incomplete_copy(adapters(), tmp_path / "h"))
        assert refused.reason is FailureReason.BAD_ARTIFACT
        assert "Missing required configuration fields" in refused.message
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_runtime_updating_off_is_a_configuration_error(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST, env={})
    client = VLLMClient(sim.url)
    try:
        failure = await failure_of(client, "a", adapters())
        assert failure.reason is FailureReason.CONFIGURATION
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in failure.message
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_api_key(start_simulator: SimulatorFactory, adapters: Callable[..., str]) -> None:
    sim = start_simulator(*FAST, "--api-key", "k3y")
    anonymous, keyed = VLLMClient(sim.url), VLLMClient(sim.url, api_key="k3y")
    try:
        with pytest.raises(AdapterFailure) as caught:
            await anonymous.registered_adapters()
        assert caught.value.reason is FailureReason.CONFIGURATION
        assert "k3y" not in caught.value.message
        await keyed.load("a", adapters())
        assert "a" in await keyed.registered_adapters()
    finally:
        await anonymous.aclose()
        await keyed.aclose()


@pytest.mark.asyncio
async def test_unreachable_server_is_transient() -> None:
    client = VLLMClient("http://127.0.0.1:9", timeout=1.0)
    try:
        assert not await client.healthy()
        with pytest.raises(AdapterFailure) as caught:
            await client.registered_adapters()
        assert caught.value.reason is FailureReason.TRANSIENT
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"detail": "Not Found"}, (404, None, "Not Found")),
        (400, {"error": {"message": "m", "type": "InvalidUserInput", "param": None, "code": 400}},
         (400, "InvalidUserInput", "m")),
        (404, {"object": "error", "message": "old", "type": "NotFoundError", "code": 404},
         (404, "NotFoundError", "old")),
        (502, "<html>bad gateway</html>", (502, None, "<html>bad gateway</html>")),
    ],
)  # fmt: skip
def test_error_bodies_of_every_shape_parse(
    status: int, body: object, expected: tuple[int, str | None, str]
) -> None:
    response = (
        httpx.Response(status, json=body)
        if not isinstance(body, str)
        else httpx.Response(status, text=body)
    )
    error = VLLMError.from_response(response)
    assert (error.status, error.type, error.message) == expected
