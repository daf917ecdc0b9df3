"""Reading a LoRA adapter directory the way vLLM 0.32's loader sees it.

The checks and their order follow vLLM's PEFTHelper and LoRAModel: a missing directory
or `adapter_config.json` is "not found" (404); anything wrong after that is the worker
refusing the adapter (500), with vLLM's own wording. Like vLLM, `peft_type` is not read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loractl.peft import CONFIG_FILE

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
FINGERPRINT_BYTES = 1 << 20


class AdapterNotFound(Exception):
    """The path is not a directory holding an adapter config (vLLM answers 404)."""


class AdapterInvalid(Exception):
    """vLLM's worker refuses the adapter (vLLM answers 500 with this message inside)."""


@dataclass(frozen=True)
class AdapterArtifact:
    path: str
    rank: int
    peft_type: str
    base_model: str | None
    fingerprint: str
    """Stands for the weights: same files, same completions; new files, new completions."""


def read_adapter(path: str, max_lora_rank: int) -> AdapterArtifact:
    directory = Path(path)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterNotFound(f"No adapter found for {path}")
    raw = config_file.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise AdapterInvalid(str(exc)) from exc
    if not isinstance(config, dict):
        raise AdapterInvalid(f"'{type(config).__name__}' object does not support item assignment")
    missing = {name for name in REQUIRED_FIELDS if name not in config}
    if missing:
        raise AdapterInvalid(f"Missing required configuration fields: {missing}")
    rank = config["r"]
    _check_legal(config, rank, max_lora_rank)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise AdapterInvalid(f"{os.path.abspath(path)} doesn't contain tensors")
    digest = hashlib.sha256(raw)
    for name in WEIGHT_FILES:
        weights = directory / name
        if weights.is_file():
            with weights.open("rb") as handle:
                digest.update(handle.read(FINGERPRINT_BYTES))
    base = config.get("base_model_name_or_path")
    return AdapterArtifact(
        path=path,
        rank=int(rank),
        peft_type=str(config.get("peft_type", "LORA")),
        base_model=None if base is None else str(base),
        fingerprint=digest.hexdigest()[:16],
    )


def _check_legal(config: dict[str, Any], rank: Any, max_lora_rank: int) -> None:
    try:
        # The same comparisons as vLLM, so a rank that is not a number fails with the
        # same TypeError text.
        if rank <= 0:
            raise AdapterInvalid(f"LoRA rank `r` must be a positive integer, got {rank}.")
        too_big = rank > max_lora_rank
    except TypeError as exc:
        raise AdapterInvalid(str(exc)) from exc
    problems = []
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        problems.append("vLLM does not support LoRA bias (lora_bias).")
    if too_big:
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        problems.append("Adapter bias is not supported.")
    if problems:
        raise AdapterInvalid(" ".join(problems))
