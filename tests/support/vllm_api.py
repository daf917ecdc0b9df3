"""The few vLLM calls tests make directly, the same against the simulator and real vLLM."""

from __future__ import annotations

import httpx

PROMPT = "How was the soup?"


def registered(url: str) -> dict[str, str]:
    """Adapters the server has registered: name → root (the path it was loaded from)."""
    cards = httpx.get(f"{url}/v1/models", timeout=10.0).json()["data"]
    return {c["id"]: c["root"] for c in cards if c["parent"]}


def unload_all(url: str) -> None:
    for name in registered(url):
        httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30.0)


def completion_text(url: str, model: str, max_tokens: int = 10) -> str:
    """Greedy, so the same weights always give the same text and a test can tell which
    adapter answered."""
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0},
        timeout=30.0,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])
