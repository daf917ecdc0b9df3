"""Reading a PEFT adapter's `adapter_config.json`: the one file every party checks.

The sidecar reads it to verify an adapter before asking vLLM to load it, and
turns a `PeftConfigError` into its own kind of error. It is stricter than vLLM,
which does not look at `peft_type` (the simulator mirrors vLLM's own checks in
`simulator/artifacts.py`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"


class PeftProblem(enum.Enum):
    MISSING = "missing"  # not a directory, or no adapter_config.json in it
    UNREADABLE = "unreadable"  # not JSON, or no integer rank `r`
    NOT_LORA = "not_lora"  # a PEFT adapter of another kind


class PeftConfigError(ValueError):
    def __init__(self, problem: PeftProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class PeftConfig:
    rank: int
    peft_type: str
    base_model: str | None
    raw: bytes


def read_peft_config(directory: Path) -> PeftConfig:
    config_file = directory / CONFIG_FILE
    if not directory.is_dir() or not config_file.is_file():
        raise PeftConfigError(PeftProblem.MISSING, f"No adapter found for {directory}")
    raw = config_file.read_bytes()
    try:
        config = json.loads(raw)
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PeftConfigError(
            PeftProblem.UNREADABLE, f"{CONFIG_FILE} in {directory} has no integer 'r': {exc}"
        ) from exc
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise PeftConfigError(
            PeftProblem.NOT_LORA, f"Only LoRA adapters are supported, {directory} is {peft_type}"
        )
    base = config.get("base_model_name_or_path")
    return PeftConfig(
        rank=rank, peft_type=peft_type, base_model=None if base is None else str(base), raw=raw
    )
