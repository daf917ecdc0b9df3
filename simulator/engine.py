"""The simulated engine: admission, LoRA slots, KV cache and the latency model.

A request waits until the batch has room (`--max-num-seqs`), its adapter can
take a GPU slot (`--max-loras` distinct adapters per batch) and the KV cache can
hold its prompt. Time to first token is then queueing + swap-in + prefill; each
further token costs the inter-token latency. Requests that cannot run yet never
block others that can (vLLM skips them in the waiting queue the same way).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

from simulator.residency import LoraResidency, SwapKind
from simulator.settings import LatencyModel


class EngineObserver(Protocol):
    def on_swap(self, adapter: str, kind: SwapKind) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_finished(
        self, seconds: float, prompt_tokens: int, generated: int, finish_reason: str
    ) -> None: ...
    def on_activity(self, running: list[str], waiting: list[str]) -> None: ...


@dataclass(eq=False)
class Sequence:
    lora: str | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str = "length"
    generated: int = 0
    admitted: asyncio.Future[SwapKind] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float
    running_adapters: list[str]
    waiting_adapters: list[str]
    deferred: int = 0
    """Of the waiting, those held back by the LoRA budget (no GPU slot for their adapter)."""


class Engine:
    def __init__(
        self,
        residency: LoraResidency,
        latency: LatencyModel,
        max_num_seqs: int,
        kv_cache_tokens: int,
        observer: EngineObserver,
    ) -> None:
        self.residency = residency
        self.latency = latency
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.extra_latency_ms = 0.0
        self._observer = observer
        self._running: set[Sequence] = set()
        self._waiting: deque[Sequence] = deque()
        self._activity: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._kv_used = 0

    def stats(self) -> EngineStats:
        running_adapters, waiting_adapters = self._activity
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_cache_usage=min(1.0, self._kv_used / self.kv_cache_tokens),
            running_adapters=list(running_adapters),
            waiting_adapters=list(waiting_adapters),
            deferred=sum(
                1
                for seq in self._waiting
                if seq.lora is not None and not self.residency.can_activate(seq.lora)
            ),
        )

    async def generate(self, seq: Sequence) -> AsyncGenerator[int, None]:
        """Yield the index of each output token at the moment it is produced.

        Consume with `contextlib.aclosing` so that a client disconnect frees the
        slot at once rather than when the generator is garbage-collected.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            swap = await self._admit(seq)
            delay_ms = self.extra_latency_ms + self.latency.prefill_ms_per_token * seq.prompt_tokens
            if swap is SwapKind.FROM_CPU:
                delay_ms += self.latency.swap_in_ms
            elif swap is SwapKind.FROM_DISK:
                delay_ms += self.latency.disk_load_ms + self.latency.swap_in_ms
            await self._sleep(delay_ms)
            self._observer.on_first_token(loop.time() - started)
            for index in range(seq.output_tokens):
                if index:
                    await self._sleep(self.latency.inter_token_ms)
                seq.generated += 1
                if seq in self._running:  # not if a simulated restart dropped it
                    self._kv_used += 1
                yield index
        finally:
            self._release(seq)
        self._observer.on_finished(
            loop.time() - started, seq.prompt_tokens, seq.generated, seq.finish_reason
        )

    async def _sleep(self, simulated_ms: float) -> None:
        seconds = self.latency.seconds(simulated_ms)
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _admit(self, seq: Sequence) -> SwapKind:
        if not self._waiting and self._fits(seq):
            return self._start(seq)
        seq.admitted = asyncio.get_running_loop().create_future()
        self._waiting.append(seq)
        self._note_activity()
        return await seq.admitted

    def _fits(self, seq: Sequence) -> bool:
        if len(self._running) >= self.max_num_seqs:
            return False
        if seq.lora is not None and not self.residency.can_activate(seq.lora):
            return False
        return not self._running or self._kv_used + seq.prompt_tokens <= self.kv_cache_tokens

    def _start(self, seq: Sequence) -> SwapKind:
        self._running.add(seq)
        self._kv_used += seq.prompt_tokens
        swap = SwapKind.NONE
        if seq.lora is not None:
            swap = self.residency.activate(seq.lora)
            if swap is not SwapKind.NONE:
                self._observer.on_swap(seq.lora, swap)
        self._note_activity()
        return swap

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.discard(seq)
            self._kv_used -= seq.prompt_tokens + seq.generated
            if seq.lora is not None:
                self.residency.deactivate(seq.lora)
        elif seq in self._waiting:  # cancelled while queued
            self._waiting.remove(seq)
        self._schedule()
        self._note_activity()

    def _schedule(self) -> None:
        for seq in list(self._waiting):
            if len(self._running) >= self.max_num_seqs:
                break
            if self._fits(seq):
                self._waiting.remove(seq)
                assert seq.admitted is not None
                if not seq.admitted.done():
                    seq.admitted.set_result(self._start(seq))

    def _note_activity(self) -> None:
        running = tuple(sorted({s.lora for s in self._running if s.lora is not None}))
        waiting = tuple(sorted({s.lora for s in self._waiting if s.lora is not None}))
        if (running, waiting) != self._activity:
            self._activity = (running, waiting)
            self._observer.on_activity(list(running), list(waiting))

    def reset(self) -> None:
        """Forget everything, like a restarted server; queued requests are dropped."""
        for seq in self._waiting:
            if seq.admitted is not None and not seq.admitted.done():
                seq.admitted.cancel()
        self._waiting.clear()
        self._running.clear()
        self._kv_used = 0
        self.residency.reset()
        self._note_activity()
