"""The engine's admission and latency model, in-process: no sockets."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from simulator.artifacts import AdapterArtifact
from simulator.engine import Engine, Sequence
from simulator.residency import LoraResidency, SwapKind
from simulator.settings import LatencyModel


class Recorder:
    def __init__(self) -> None:
        self.swaps: list[tuple[str, SwapKind]] = []
        self.ttfts: list[float] = []
        self.activity: list[tuple[list[str], list[str]]] = []

    def on_swap(self, adapter: str, kind: SwapKind) -> None:
        self.swaps.append((adapter, kind))

    def on_first_token(self, seconds: float) -> None:
        self.ttfts.append(seconds)

    def on_finished(self, seconds: float, prompt: int, generated: int, reason: str) -> None:
        pass

    def on_activity(self, running: list[str], waiting: list[str]) -> None:
        self.activity.append((running, waiting))


def make_engine(
    *adapters: str, max_loras: int = 2, max_num_seqs: int = 8, **latency: float
) -> tuple[Engine, Recorder]:
    residency = LoraResidency(max_loras, max(max_loras, len(adapters)))
    for name in adapters:
        residency.register(name, AdapterArtifact(f"/a/{name}", 8, "LORA", None, fingerprint=name))
    recorder = Recorder()
    model = LatencyModel(**{"swap_in_ms": 0, "disk_load_ms": 0, "prefill_ms_per_token": 0,
                            "inter_token_ms": 0, **latency})  # fmt: skip
    return Engine(residency, model, max_num_seqs, 10_000, recorder), recorder


async def run(engine: Engine, seq: Sequence, log: list[str], label: str) -> None:
    async with aclosing(engine.generate(seq)) as tokens:
        async for _ in tokens:
            pass
    log.append(label)


@pytest.mark.asyncio
async def test_third_adapter_waits_for_a_slot_while_others_run() -> None:
    engine, recorder = make_engine("a", "b", "c", max_loras=2, inter_token_ms=20)
    done: list[str] = []
    tasks = [
        asyncio.create_task(run(engine, Sequence(name, 4, output_tokens=3), done, name))
        for name in ("a", "b", "c")
    ]
    await asyncio.sleep(0.01)
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (2, 1)
    assert stats.waiting_adapters == ["c"]
    await asyncio.gather(*tasks)
    assert done[-1] == "c"
    assert [name for name, _ in recorder.swaps] == ["a", "b", "c"]
    assert (["a", "b"], ["c"]) in recorder.activity


@pytest.mark.asyncio
async def test_request_that_fits_overtakes_one_waiting_for_a_slot() -> None:
    engine, _ = make_engine("a", "b", "c", max_loras=2, inter_token_ms=20)
    done: list[str] = []
    first = [
        asyncio.create_task(run(engine, Sequence(n, 4, output_tokens=3), done, n))
        for n in ("a", "b", "c")
    ]
    await asyncio.sleep(0.005)
    # Another request for "a" (already in a slot) must not queue behind "c".
    await run(engine, Sequence("a", 4, output_tokens=1), done, "a-again")
    assert "c" not in done
    await asyncio.gather(*first)


@pytest.mark.asyncio
async def test_queueing_beyond_max_num_seqs() -> None:
    engine, _ = make_engine(max_num_seqs=1, inter_token_ms=20)
    done: list[str] = []
    tasks = [
        asyncio.create_task(run(engine, Sequence(None, 4, output_tokens=2), done, str(i)))
        for i in range(3)
    ]
    await asyncio.sleep(0.005)
    assert (engine.stats().running, engine.stats().waiting) == (1, 2)
    await asyncio.gather(*tasks)
    assert done == ["0", "1", "2"]


@pytest.mark.asyncio
async def test_ttft_adds_swap_and_prefill_scaled_by_time_scale() -> None:
    engine, recorder = make_engine("a", swap_in_ms=400, prefill_ms_per_token=10, time_scale=0.25)
    await run(engine, Sequence("a", 40, output_tokens=1), [], "a")
    # (400 swap + 40 * 10 prefill) simulated ms at a quarter speed = 0.2 s
    assert 0.2 <= recorder.ttfts[0] < 0.4
    await run(engine, Sequence("a", 40, output_tokens=1), [], "a")
    assert 0.1 <= recorder.ttfts[1] < 0.2, "second use is hot: prefill only"


@pytest.mark.asyncio
async def test_cancelled_waiting_request_leaves_the_queue() -> None:
    engine, _ = make_engine(max_num_seqs=1, inter_token_ms=50)
    done: list[str] = []
    running = asyncio.create_task(run(engine, Sequence(None, 4, output_tokens=2), done, "r"))
    queued = asyncio.create_task(run(engine, Sequence(None, 4, output_tokens=2), done, "q"))
    await asyncio.sleep(0.005)
    assert engine.stats().waiting == 1
    queued.cancel()
    await asyncio.sleep(0)
    assert engine.stats().waiting == 0
    await running
    assert engine.stats().running == 0
    assert engine.stats().kv_cache_usage == 0
