"""A canary through the whole stack on real vLLM: Envoy → picker → two real vLLM servers,
each with its sidecar, the controller rolling `food-review` from food-review-1 to
food-review-2. Every answer is checked twice: the `model` it names, and its completion
text, which only that adapter's weights produce (greedy decoding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from kmock import KubernetesEmulator

from loractl.processes import ChildProcess
from tests.support.canary_cluster import (
    TRAFFIC_MAX_TOKENS,
    Cluster,
    healthy_canary_promotes,
    open_cluster,
)
from tests.support.metrics import value
from tests.support.real_vllm import BASE, STAGE, TinyModel, VllmServer
from tests.support.vllm_api import completion_text, unload_all

pytestmark = STAGE
ROLLED = ("food-review-1", "food-review-2")


def texts_by_weights(servers: list[VllmServer], adapters: dict[str, str]) -> dict[str, str]:
    """What each adapter (and the base model) answers to the traffic's prompt, asked of
    every server: the same weights must give the same text everywhere."""
    texts: dict[str, set[str]] = {BASE: set()}
    for server in servers:
        for name, path in adapters.items():
            body = {"lora_name": name, "lora_path": path}
            loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=60)
            assert loaded.status_code == 200, loaded.text
        for name in [BASE, *adapters]:
            texts.setdefault(name, set()).add(
                completion_text(server.url, name, max_tokens=TRAFFIC_MAX_TOKENS)
            )
        unload_all(server.url)
    assert all(len(seen) == 1 for seen in texts.values()), f"servers disagree: {texts}"
    unique = {name: seen.pop() for name, seen in texts.items()}
    assert len(set(unique.values())) == len(unique), f"weights not told apart: {unique}"
    return unique


@pytest_asyncio.fixture
async def cluster(
    kmock: KubernetesEmulator,
    tmp_path: Path,
    vllm_servers: list[VllmServer],
    tiny_model: TinyModel,
) -> AsyncIterator[tuple[Cluster, dict[str, str]]]:
    adapters = {name: tiny_model.adapters[name] for name in ROLLED}

    def pods(_work: Path, _children: list[ChildProcess]) -> list[str]:
        for server in vllm_servers:
            if not server.process.alive():
                server.restart_and_wait()
            unload_all(server.url)
        return [server.url for server in vllm_servers]

    expected = texts_by_weights(vllm_servers, adapters)
    async with open_cluster(kmock, tmp_path, adapters, pods) as opened:
        yield opened, expected
    for server in vllm_servers:
        unload_all(server.url)


@pytest.mark.asyncio
async def test_canary_from_adapter_1_to_2_is_served_by_the_right_weights(
    cluster: tuple[Cluster, dict[str, str]],
) -> None:
    stack, expected = cluster
    before = {url: value(url, "vllm:request_success_total") for url in stack.servers}
    traffic = await healthy_canary_promotes(stack)
    served = [answer for answer in traffic.answers if answer.status == 200]
    assert {answer.model for answer in served} == set(ROLLED)
    wrong = [a for a in served if a.text != expected[a.model]]
    assert not wrong, f"{len(wrong)} answers not from the weights they name, e.g. {wrong[:3]}"
    per_server = {
        url: value(url, "vllm:request_success_total") - count for url, count in before.items()
    }
    print(f"answers per target: {Counter(a.model for a in served)}; per server: {per_server}")
    # Which pod serves is the picker's choice: with one request at a time, LoRA affinity may
    # well keep both adapters on one pod. What must hold is that the real servers answered
    # every request, no more and no less.
    assert sum(per_server.values()) == len(served), per_server
