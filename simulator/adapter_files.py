"""Small PEFT-format LoRA adapter directories, made locally for tests and the demo.

Nothing here touches a model hub. The weights are tiny seeded random tensors in
a valid safetensors file: enough for the simulator (which reads the config and
fingerprints the files), not for a real engine with a real base model.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

DEFAULT_BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TINY_HIDDEN = 16


def write_adapter(
    directory: Path,
    *,
    rank: int = 8,
    base_model: str = DEFAULT_BASE_MODEL,
    seed: int = 0,
    peft_type: str = "LORA",
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": peft_type,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = random.Random(seed)
    tensors = {}
    for module in target_modules:
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{prefix}.lora_A.weight"] = ([rank, TINY_HIDDEN], rng)
        tensors[f"{prefix}.lora_B.weight"] = ([TINY_HIDDEN, rank], rng)
    _write_safetensors(directory / "adapter_model.safetensors", tensors)
    return directory


def _write_safetensors(path: Path, tensors: dict[str, tuple[list[int], random.Random]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, (shape, rng) in tensors.items():
        count = shape[0] * shape[1]
        blob = struct.pack(f"<{count}f", *(rng.uniform(-0.01, 0.01) for _ in range(count)))
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
