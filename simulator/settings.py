"""Simulator settings: vLLM's own flags plus the knobs of the latency model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

VALID_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoraModule:
    """One `--lora-modules` entry, registered at start-up like vLLM does."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> LoraModule:
        """Accept vLLM's two spellings: `name=path` and a JSON object."""
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
                return cls(name=str(data["name"]), path=str(data["path"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f'invalid --lora-modules JSON {text!r}: expected {{"name": ..., "path": ...}}'
                ) from exc
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"invalid --lora-modules entry {text!r}: expected name=path")
        return cls(name=name, path=path)


@dataclass(frozen=True)
class LatencyModel:
    """Simulated timings in milliseconds of simulated time.

    Wall time is simulated time multiplied by `time_scale`, so a test can run a
    realistic scenario ten times faster without changing any other figure.
    """

    prefill_ms_per_token: float = 0.1
    inter_token_ms: float = 20.0
    swap_in_ms: float = 30.0
    disk_load_ms: float = 150.0
    time_scale: float = 1.0

    def seconds(self, simulated_ms: float) -> float:
        return simulated_ms * self.time_scale / 1000.0


@dataclass(frozen=True)
class SimSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    served_model_names: tuple[str, ...] = ()
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_num_seqs: int = 256
    max_model_len: int = 2048
    kv_cache_tokens: int = 65536
    lora_modules: tuple[LoraModule, ...] = ()
    api_key: str | None = None
    runtime_lora_updating: bool = False
    force_include_usage: bool = False
    export_lora_loaded: bool = False
    latency: LatencyModel = field(default_factory=LatencyModel)
    seed: int = 0
    vllm_version: str = "0.32.0"

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-loras", self.max_loras),
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-model-len", self.max_model_len),
            ("--kv-cache-tokens", self.kv_cache_tokens),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1; got {value}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})"
            )
        if self.max_lora_rank not in VALID_MAX_LORA_RANKS:
            raise ValueError(
                f"--max-lora-rank {self.max_lora_rank} is not one of {list(VALID_MAX_LORA_RANKS)}"
            )
        latency = self.latency
        for flag, figure in (
            ("--prefill-ms-per-token", latency.prefill_ms_per_token),
            ("--inter-token-ms", latency.inter_token_ms),
            ("--swap-in-ms", latency.swap_in_ms),
            ("--disk-load-ms", latency.disk_load_ms),
            ("--time-scale", latency.time_scale),
        ):
            if not figure >= 0:  # NaN too
                raise ValueError(f"{flag} must be 0 or more; got {figure}")

    @property
    def base_names(self) -> tuple[str, ...]:
        """Names clients may use for the base model; the first one is reported back."""
        return self.served_model_names or (self.model,)

    @property
    def cpu_lora_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


def runtime_lora_updating_from_env(environ: dict[str, str] | None = None) -> bool:
    """vLLM's own reading of the env var: "1" or "true", any case, surrounding space ignored."""
    value = (environ if environ is not None else dict(os.environ)).get(RUNTIME_LORA_ENV, "0")
    return value.strip().lower() in ("1", "true")
