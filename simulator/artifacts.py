"""Reading a LoRA adapter directory the way vLLM's loader sees it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
FINGERPRINT_BYTES = 1 << 20


class AdapterNotFound(Exception):
    """The path is not a directory holding a PEFT adapter (vLLM answers 404)."""


class AdapterInvalid(Exception):
    """The adapter exists but the engine cannot take it (vLLM answers 500)."""


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
    config_file = directory / "adapter_config.json"
    if not directory.is_dir() or not config_file.is_file():
        raise AdapterNotFound(f"No adapter found for {path}")
    raw = config_file.read_bytes()
    try:
        config = json.loads(raw)
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterInvalid(f"adapter_config.json in {path} has no integer 'r': {exc}") from exc
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise AdapterInvalid(f"Only LoRA adapters are supported, {path} is {peft_type}")
    digest = hashlib.sha256(raw)
    for name in WEIGHT_FILES:
        weights = directory / name
        if weights.is_file():
            with weights.open("rb") as handle:
                digest.update(handle.read(FINGERPRINT_BYTES))
    base = config.get("base_model_name_or_path")
    return AdapterArtifact(
        path=path,
        rank=rank,
        peft_type=peft_type,
        base_model=str(base) if base is not None else None,
        fingerprint=digest.hexdigest()[:16],
    )
