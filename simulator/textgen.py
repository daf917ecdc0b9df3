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


class Completion:
    """The tokens one (weights, prompt) pair produces, up to the model's natural stop."""

    def __init__(self, weights_identity: str, prompt: str, seed_index: int = 0) -> None:
        digest = hashlib.sha256(f"{weights_identity}\x00{seed_index}\x00{prompt}".encode())
        rng = random.Random(digest.digest())
        natural = rng.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
        self.natural_tokens = [" " + rng.choice(VOCABULARY) for _ in range(natural)]

    def tokens(self, max_tokens: int) -> tuple[list[str], str]:
        """The tokens emitted under `max_tokens` and vLLM's finish_reason for them."""
        if max_tokens < len(self.natural_tokens):
            return self.natural_tokens[:max_tokens], "length"
        return self.natural_tokens, "stop"
