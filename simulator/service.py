"""What the simulated server does for each API call, independent of HTTP framing."""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from simulator.artifacts import AdapterInvalid, AdapterNotFound, read_adapter
from simulator.engine import Engine, Sequence
from simulator.faults import Faults
from simulator.metrics import SimMetrics
from simulator.protocol import RequestError, not_found_model, validation_error
from simulator.residency import LoraResidency
from simulator.settings import SimSettings
from simulator.textgen import complete

GREEDY_EPSILON = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it means greedy


@dataclass(frozen=True)
class Target:
    """The weights a request runs on and the name vLLM reports back for them."""

    name: str
    lora: str | None
    weights_identity: str


@dataclass(frozen=True)
class PlannedChoice:
    prompt_index: int
    seq: Sequence
    tokens: list[str]


class Simulator:
    """State of one simulated vLLM process: registry, engine, metrics and faults."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.faults = Faults(random.Random(settings.seed))
        self.residency = LoraResidency(settings.max_loras, settings.cpu_lora_capacity)
        self.metrics = SimMetrics(
            settings.base_names[0], settings.max_loras, settings.export_lora_loaded
        )
        self.engine = Engine(
            self.residency,
            settings.latency,
            settings.max_num_seqs,
            settings.kv_cache_tokens,
            self.metrics,
        )
        self.metrics.attach(self.engine)
        self.created = int(time.time())
        # vLLM's system_fingerprint: the version and a hash of the engine's configuration.
        config_hash = hashlib.sha256(repr(settings).encode()).hexdigest()[:8]
        self.fingerprint = f"vllm-{settings.vllm_version}-{config_hash}"
        self.register_startup_adapters()

    def register_startup_adapters(self) -> None:
        """`--lora-modules` are registered at start, and again after a simulated restart."""
        for module in self.settings.lora_modules:
            try:
                artifact = read_adapter(module.path, self.settings.max_lora_rank)
            except (AdapterNotFound, AdapterInvalid) as exc:
                raise ValueError(f"--lora-modules {module.name}={module.path}: {exc}") from exc
            self.residency.register(module.name, artifact)

    def restart(self) -> None:
        self.engine.reset()
        self.faults.clear()
        self.created = int(time.time())
        self.register_startup_adapters()

    # --- model resolution -------------------------------------------------------------

    def resolve(self, requested: str | None) -> Target:
        base = self.settings.base_names[0]
        if requested is None or requested in self.settings.base_names:
            return Target(name=base, lora=None, weights_identity=f"base:{self.settings.model}")
        artifact = self.residency.registered.get(requested)
        if artifact is None:
            raise not_found_model(requested, self.settings.base_names)
        return Target(name=requested, lora=requested, weights_identity=artifact.fingerprint)

    def check_injected_error(self, requested: str | None) -> None:
        status = self.faults.injected_error(requested or self.settings.base_names[0])
        if status is not None:
            raise RequestError(status, "InternalServerError", "Simulated failure (fault injection)")

    def plan_choices(
        self,
        target: Target,
        prompts: list[tuple[str, int]],
        max_tokens: int | None,
        n: int,
        temperature: float | None = None,
        max_tokens_param: str = "max_tokens",
    ) -> list[PlannedChoice]:
        """One sequence per (prompt, sample); validates the request the way vLLM 0.32 does,
        and like it clamps max_tokens to what the context has left."""
        limit = self.settings.max_model_len
        if n < 1:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "BadRequestError", f"n must be at least 1, got {n}."
            )
        if n > 1 and temperature is not None and temperature < GREEDY_EPSILON:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "BadRequestError",
                f"n must be 1 when using greedy sampling, got {n}.",
            )
        if max_tokens is not None and max_tokens > limit:
            raise validation_error(
                f"{max_tokens_param}={max_tokens} cannot be greater than max_model_len="
                f"{limit}. Please request fewer output tokens.",
                max_tokens_param,
                max_tokens,
            )
        choices = []
        for prompt_index, (text, prompt_tokens) in enumerate(prompts):
            if prompt_tokens > limit:
                # vLLM tokenizes with truncation to one token past the limit.
                seen = min(prompt_tokens, limit + 1)
                at_least = "at least " if seen == limit + 1 else ""
                raise validation_error(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"prompt contains {at_least}{seen} input tokens, which exceeds this limit "
                    "even without any output tokens. Please reduce the length of the input "
                    "prompt.",
                    "input_tokens",
                    seen,
                )
            room = limit - prompt_tokens
            wanted = room if max_tokens is None else min(max_tokens, room)
            if wanted < 1:
                raise validation_error(
                    f"max_tokens must be at least 1, got {wanted}.", "max_tokens", wanted
                )
            for sample in range(n):
                tokens, finish = complete(target.weights_identity, text, wanted, sample)
                seq = Sequence(
                    lora=target.lora,
                    prompt_tokens=prompt_tokens,
                    output_tokens=len(tokens),
                    finish_reason=finish,
                )
                choices.append(PlannedChoice(prompt_index, seq, tokens))
        return choices

    async def run_all(self, choices: list[PlannedChoice]) -> None:
        if len(choices) == 1:  # the common case; gather would cost a task per request
            await self._run_to_end(choices[0].seq)
        else:
            await asyncio.gather(*(self._run_to_end(choice.seq) for choice in choices))

    async def _run_to_end(self, seq: Sequence) -> None:
        async with aclosing(self.engine.generate(seq)) as tokens:
            async for _ in tokens:
                pass

    # --- adapters ---------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str, inplace: bool) -> str:
        if not name or not path:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "InvalidUserInput",
                "Both 'lora_name' and 'lora_path' must be provided.",
            )
        if name in self.residency.registered and not inplace:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "InvalidUserInput",
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
            )
        try:
            artifact = read_adapter(path, self.settings.max_lora_rank)
        except AdapterNotFound as exc:
            raise RequestError(
                HTTPStatus.NOT_FOUND, "NotFoundError", f"Loading lora {name} failed: {exc}"
            ) from exc
        except AdapterInvalid as exc:
            raise RequestError(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "InternalServerError",
                f"Call to add_lora method failed: Worker failed with error '{exc}', please "
                "check the stack trace above for the root cause",
            ) from exc
        await asyncio.sleep(self.settings.latency.seconds(self.settings.latency.disk_load_ms))
        self.residency.register(name, artifact)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, name: str) -> str:
        if not name:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "InvalidUserInput",
                "'lora_name' needs to be provided to unload a LoRA adapter.",
            )
        if name not in self.residency.registered:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                "NotFoundError",
                f"The lora adapter '{name}' cannot be found.",
            )
        self.residency.unregister(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # --- listings ---------------------------------------------------------------------

    def model_cards(self) -> dict[str, Any]:
        base = self.settings.base_names[0]
        cards: list[dict[str, Any]] = [
            self._card(
                name,
                root=self.settings.model,
                parent=None,
                max_model_len=self.settings.max_model_len,
            )
            for name in self.settings.base_names
        ]
        cards += [
            self._card(name, root=artifact.path, parent=base, max_model_len=None)
            for name, artifact in self.residency.registered.items()
        ]
        return {"object": "list", "data": cards}

    def _card(
        self, name: str, root: str, parent: str | None, max_model_len: int | None
    ) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{secrets.token_hex(8)}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    def state(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            "registered": {n: a.path for n, a in self.residency.registered.items()},
            "gpu_slots": self.residency.gpu_resident,
            "cpu_cache": self.residency.cpu_resident,
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": stats.kv_cache_usage,
        }
