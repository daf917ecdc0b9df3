"""Reading a LoRA adapter directory the way vLLM's loader sees it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from loractl.peft import PeftConfigError, PeftProblem, read_peft_config

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
FINGERPRINT_BYTES = 1 << 20


class AdapterNotFound(Exception):
    """The path is not a directory holding a PEFT adapter (vLLM answers 404)."""


class AdapterInvalid(Exception):
    """The adapter exists but cannot be loaded as a LoRA (vLLM answers 400)."""


@dataclass(frozen=True)
class AdapterArtifact:
    path: str
    rank: int
    peft_type: str
    base_model: str | None
    fingerprint: str
    """Stands for the weights: same files, same completions; new files, new completions."""


def read_adapter(path: str) -> AdapterArtifact:
    directory = Path(path)
    try:
        config = read_peft_config(directory)
    except PeftConfigError as exc:
        if exc.problem is PeftProblem.MISSING:
            raise AdapterNotFound(f"No adapter found for {path}") from exc
        raise AdapterInvalid(str(exc)) from exc
    digest = hashlib.sha256(config.raw)
    for name in WEIGHT_FILES:
        weights = directory / name
        if weights.is_file():
            with weights.open("rb") as handle:
                digest.update(handle.read(FINGERPRINT_BYTES))
    return AdapterArtifact(
        path=path,
        rank=config.rank,
        peft_type=config.peft_type,
        base_model=config.base_model,
        fingerprint=digest.hexdigest()[:16],
    )
