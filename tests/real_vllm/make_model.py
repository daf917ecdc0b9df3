"""Build a tiny random Llama and PEFT LoRA adapters for it, entirely offline.

Runs under the vLLM environment's interpreter (torch, transformers, peft and tokenizers
live there, not in the project's), as
`python make_model.py OUT_DIR '{"adapter-name": {"seed": 1, "rank": 8}, ...}'`, and
writes `OUT_DIR/model` (a Hugging Face model directory with tokenizer files and a chat
template) and `OUT_DIR/adapters/<name>` (PEFT adapter directories).

The model is random but confident: weights are drawn wide enough that greedy decoding
picks tokens by clear margins, so completions are deterministic across batch shapes and
across two servers, and each adapter's non-zero LoRA weights change them visibly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 512
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# vLLM's CPU attention needs a supported head size: 128 / 2 heads = 64 works, 16 does not.
HIDDEN, HEADS, LAYERS = 128, 2, 2
# Wider than Llama's 0.02 so logits differ by whole units, not by rounding noise.
INIT_STD = 0.25
LORA_STD = 0.3
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
SENTENCES = [
    "The soup was warm and the bread was fresh.",
    "How was the soup? It was salty, but the service was quick!",
    "The food was great, the waiter was friendly and the dessert was sweet.",
    "Rate the soup from one to five stars: 1 2 3 4 5 6 7 8 9 0.",
    "We ordered noodles, rice, fish and a green salad for the table (extra jazz).",
    'The kitchen closed early; so the review is about the drinks only - "relax".',
]
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "za", "pe", "qu", "xi", "yo", "bu")


def corpus() -> list[str]:
    """Review-like sentences, both cases of the alphabet, and enough seeded pseudo-words
    that BPE finds merges for the whole vocabulary (every id the model can emit decodes)."""
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [*SENTENCES * 20, letters, letters.upper(), " ".join(words)]


def build_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    # Word pieces with a metaspace (no byte-level alphabet): whatever the random model
    # emits decodes to readable text, which makes a failing comparison easy to read.
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, UNK, BOS, EOS])
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(model_dir)
    return wrapped


def build_model(model_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)


def build_adapter(model_dir: Path, directory: Path, seed: int, rank: int) -> None:
    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        # PEFT starts B at zero (the adapter a no-op); random A and B make every adapter
        # change the completions, differently per seed.
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, LORA_STD)
    peft_model.save_pretrained(directory, safe_serialization=True)


def main(argv: list[str]) -> int:
    out = Path(argv[1])
    adapters: dict[str, dict[str, Any]] = json.loads(argv[2])
    model_dir = out / "model"
    tokenizer = build_tokenizer(model_dir)
    build_model(model_dir, tokenizer)
    for name, spec in adapters.items():
        build_adapter(model_dir, out / "adapters" / name, int(spec["seed"]), int(spec["rank"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
