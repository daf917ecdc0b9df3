"""Deterministic stand-ins for a tokenizer and a model's output.

The completion depends only on the weights that serve it (the adapter's
fingerprint, or the base model) and the prompt, so a test can tell from the
text which adapter answered, and a reloaded adapter with new files answers
differently under the same name.
"""

from __future__ import annotations

import hashlib
import random
import re

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TEMPLATE_TOKENS = 3
MIN_NATURAL_TOKENS = 8
MAX_NATURAL_TOKENS = 48

VOCABULARY = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "or",
    "for",
    "with",
    "on",
    "at",
    "by",
    "from",
    "as",
    "is",
    "was",
    "be",
    "are",
    "it",
    "this",
    "that",
    "food",
    "review",
    "taste",
    "menu",
    "dish",
    "spicy",
    "sweet",
    "fresh",
    "service",
    "table",
    "order",
    "kitchen",
    "chef",
    "great",
    "good",
    "fine",
    "bad",
    "slow",
    "quick",
    "warm",
    "cold",
    "salt",
    "sauce",
    "bread",
    "soup",
    "salad",
    "rice",
    "noodle",
    "model",
    "adapter",
    "token",
    "batch",
    "slot",
    "cache",
    "queue",
    "prompt",
    "answer",
    "reply",
    "result",
    "value",
    "really",
    "quite",
    "very",
    "rather",
    "somewhat",
    "never",
    "always",
    "often",
    "sometimes",
    "today",
    "tomorrow",
    "price",
    "portion",
    "plate",
    "serve",
    "staff",
    "place",
    "visit",
    "again",
    "friend",
    "family",
    "dinner",
    "lunch",
]


def count_tokens(text: str) -> int:
    return max(1, len(TOKEN_PATTERN.findall(text)))


def chat_prompt_tokens(contents: list[str]) -> int:
    return CHAT_TEMPLATE_TOKENS + sum(
        CHAT_TOKENS_PER_MESSAGE + len(TOKEN_PATTERN.findall(c)) for c in contents
    )


def complete(
    weights_identity: str, prompt: str, max_tokens: int, sample: int = 0
) -> tuple[list[str], str]:
    """The tokens one (weights, prompt, sample) produces under `max_tokens`, and vLLM's
    finish_reason: `stop` at the model's natural end, `length` when cut short."""
    digest = hashlib.sha256(f"{weights_identity}\x00{sample}\x00{prompt}".encode())
    rng = random.Random(digest.digest())
    natural = rng.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
    # Draw only what is emitted: a prefix of the same random sequence, so the same text.
    emitted = min(natural, max_tokens)
    tokens = [" " + rng.choice(VOCABULARY) for _ in range(emitted)]
    return tokens, "length" if emitted < natural else "stop"
