"""The vLLM HTTP contract loractl relies on, as a table of request → expected answer.

The table is data: it names adapters by role ({good}, {big}, ...) and never says
which server it runs against, so the same cases run against the simulator
(`tests/simulator/test_contract.py`) and against a real vLLM server
(`tests/real_vllm/test_contract.py`), both started with runtime LoRA updating enabled,
`--max-lora-rank 8` (below the rank of the {big} adapter) and `--max-model-len 512`.
When the two disagree, vLLM is right: the simulator is fixed, never the expectation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from controller.scrape import RESTRICTED_PATH
from controller.vllm_metrics import FAMILIES, RUNNING

Check = Callable[[httpx.Response, "Context"], None]


@dataclass(frozen=True)
class Context:
    """What one case may refer to: a fresh adapter name and adapters by role."""

    name: str
    base: str
    paths: dict[str, str]

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.format(name=self.name, base=self.base, **self.paths)
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value


@dataclass(frozen=True)
class Step:
    method: str
    path: str
    status: int
    body: Any = None
    raw: bytes | None = None
    error_type: str | None = None
    param: str | None = None
    message_contains: str | None = None
    text: str | None = None
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    steps: tuple[Step, ...]
    tags: frozenset[str] = field(default_factory=frozenset)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """vLLM's error body: {"error": {...}} now, a flat {"object": "error", ...} before."""
    data = response.json()
    if isinstance(data.get("error"), dict):
        return dict(data["error"])
    return dict(data)


def run_step(client: httpx.Client, step: Step, ctx: Context) -> httpx.Response:
    if step.raw is not None:
        response = client.request(
            step.method,
            step.path,
            content=step.raw,
            headers={"content-type": "application/json"},
        )
    else:
        response = client.request(step.method, step.path, json=ctx.fill(step.body))
    sent = ctx.fill(step.body) if step.body else step.raw
    where = f"{step.method} {step.path} {str(sent)[:300]}"
    assert response.status_code == step.status, (
        f"{where}: expected {step.status}, got {response.status_code}: {response.text[:500]}"
    )
    if step.error_type is not None or step.param is not None or step.message_contains:
        error = error_of(response)
        if step.error_type is not None:
            assert error.get("type") == step.error_type, f"{where}: error {error}"
        if step.param is not None:
            assert error.get("param") == step.param, f"{where}: error {error}"
        if step.message_contains is not None:
            expected = ctx.fill(step.message_contains)
            assert expected in str(error.get("message")), f"{where}: error {error}"
    if step.text is not None:
        assert response.text == ctx.fill(step.text), f"{where}: body {response.text!r}"
    for check in step.checks:
        check(response, ctx)
    return response


def run_case(client: httpx.Client, case: Case, ctx: Context) -> None:
    for step in case.steps:
        run_step(client, step, ctx)


def check_case(url: str, case: Case, base: str, paths: dict[str, str]) -> None:
    """One case against the server at `url`, with a fresh adapter name of its own."""
    with httpx.Client(base_url=url, timeout=60.0) as client:
        run_case(client, case, Context(name=f"lora-{case.id}", base=base, paths=paths))


def adapter_roles(root: Path, good: str, good2: str, big: str) -> dict[str, str]:
    """Every role the table names: three real adapters, and broken ones made from {good}."""
    paths = {"good": good, "good2": good2, "big": big}
    (root / "empty").mkdir(parents=True)
    (root / "no-weights").mkdir()
    shutil.copy(Path(good) / "adapter_config.json", root / "no-weights")
    (root / "bad-json").mkdir()
    (root / "bad-json" / "adapter_config.json").write_text('{"r": 8,')
    shutil.copytree(good, root / "not-lora")
    config_file = root / "not-lora" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"peft_type": "IA3"}))
    for role in ("empty", "no-weights", "bad-json", "not-lora"):
        paths[role.replace("-", "_")] = str(root / role)
    return paths


# --- shape checks ---------------------------------------------------------------------


def untyped_text(response: httpx.Response, _ctx: Context) -> None:
    # vLLM returns the bare string from its handler: a text body with no content-type.
    assert "content-type" not in response.headers, response.headers


def lists_adapter(role: str) -> Check:
    def check(response: httpx.Response, ctx: Context) -> None:
        cards = {card["id"]: card for card in response.json()["data"]}
        assert ctx.name in cards, f"{ctx.name} not in {list(cards)}"
        assert cards[ctx.name]["root"] == ctx.paths[role]
        assert cards[ctx.name]["parent"] == ctx.base

    return check


def lacks_adapter(response: httpx.Response, ctx: Context) -> None:
    assert ctx.name not in {card["id"] for card in response.json()["data"]}


def base_card_first(response: httpx.Response, ctx: Context) -> None:
    data = response.json()
    assert data["object"] == "list"
    assert data["data"][0]["id"] == ctx.base
    assert data["data"][0]["parent"] is None


def served_by(expected: str) -> Check:
    def check(response: httpx.Response, ctx: Context) -> None:
        assert response.json()["model"] == ctx.fill(expected)

    return check


def completion_shape(response: httpx.Response, _ctx: Context) -> None:
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert isinstance(choice["text"], str)
    assert choice["text"]
    assert choice["finish_reason"] in ("length", "stop")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5


def chat_shape(response: httpx.Response, _ctx: Context) -> None:
    data = response.json()
    assert data["object"] == "chat.completion"
    message = data["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def sse_stream(response: httpx.Response, _ctx: Context) -> None:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks, "no chunks before [DONE]"
    assert chunks[-1]["choices"] == [], "last chunk before [DONE] must carry the usage"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def exports_vllm_metrics(response: httpx.Response, _ctx: Context) -> None:
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in response.text, f"{name} missing from /metrics"
    assert (
        "vllm:kv_cache_usage_perc" in response.text or "vllm:gpu_cache_usage_perc" in response.text
    )


def sample_families(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    }


def only_the_named_families(response: httpx.Response, ctx: Context) -> None:
    """What the picker scrapes: the families it reads, and nothing else."""
    exports_vllm_metrics(response, ctx)
    extra = sample_families(response.text) - set(FAMILIES)
    assert not extra, f"families not asked for: {sorted(extra)[:10]}"


def the_whole_page(response: httpx.Response, ctx: Context) -> None:
    exports_vllm_metrics(response, ctx)
    assert sample_families(response.text) - {RUNNING}, "names ignored: other families too"


# --- the table ------------------------------------------------------------------------

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
LOAD_GOOD = {"lora_name": "{name}", "lora_path": "{good}"}
PROMPT = {"prompt": "The food was", "max_tokens": 5}

CASES: tuple[Case, ...] = (
    Case("health", (Step("GET", "/health", 200),)),
    Case("ping", (Step("GET", "/ping", 200),)),
    Case("version", (Step("GET", "/version", 200, checks=(lambda r, _c: r.json()["version"],)),)),
    Case("models-base-card", (Step("GET", "/v1/models", 200, checks=(base_card_first,)),)),
    Case("metrics", (Step("GET", "/metrics", 200, checks=(exports_vllm_metrics,)),)),
    Case(
        "metrics-restricted",
        (Step("GET", RESTRICTED_PATH, 200, checks=(only_the_named_families,)),),
    ),
    # Why the picker asks /metrics/: at /metrics, vLLM's instrumentator ignores the names.
    Case(
        "metrics-names-ignored-without-the-slash",
        (Step("GET", f"/metrics?name[]={RUNNING}", 200, checks=(the_whole_page,)),),
    ),
    Case(
        "unknown-route",
        (
            Step(
                "GET", "/v1/nope", 404, checks=(lambda r, _c: r.json() == {"detail": "Not Found"},)
            ),
        ),
    ),
    Case(
        "load-serve-unload",
        (
            Step(
                "POST",
                LOAD,
                200,
                body=LOAD_GOOD,
                checks=(untyped_text,),
                text="Success: LoRA adapter '{name}' added successfully.",
            ),
            Step("GET", "/v1/models", 200, checks=(lists_adapter("good"),)),
            Step(
                "POST",
                "/v1/completions",
                200,
                body={"model": "{name}", **PROMPT},
                checks=(completion_shape, served_by("{name}")),
            ),
            Step(
                "POST",
                UNLOAD,
                200,
                body={"lora_name": "{name}"},
                checks=(untyped_text,),
                text="Success: LoRA adapter '{name}' removed successfully.",
            ),
            Step("GET", "/v1/models", 200, checks=(lacks_adapter,)),
            Step(
                "POST",
                "/v1/completions",
                404,
                body={"model": "{name}", **PROMPT},
                error_type="NotFoundError",
                message_contains="The model `{name}` does not exist.",
            ),
        ),
    ),
    Case(
        "duplicate-load",
        (
            Step("POST", LOAD, 200, body=LOAD_GOOD),
            Step(
                "POST",
                LOAD,
                400,
                body=LOAD_GOOD,
                error_type="InvalidUserInput",
                message_contains="has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
            ),
            Step("POST", UNLOAD, 200, body={"lora_name": "{name}"}),
        ),
    ),
    Case(
        "load-inplace-switches-root",
        (
            Step("POST", LOAD, 200, body=LOAD_GOOD),
            Step(
                "POST",
                LOAD,
                200,
                body={"lora_name": "{name}", "lora_path": "{good2}", "load_inplace": True},
            ),
            Step("GET", "/v1/models", 200, checks=(lists_adapter("good2"),)),
            Step("POST", UNLOAD, 200, body={"lora_name": "{name}"}),
        ),
    ),
    Case(
        "load-missing-path",
        (
            Step(
                "POST",
                LOAD,
                404,
                body={"lora_name": "{name}", "lora_path": "no/such/{name}"},
                error_type="NotFoundError",
                message_contains="Loading lora {name} failed: No adapter found for no/such/{name}",
            ),
            Step("GET", "/v1/models", 200, checks=(lacks_adapter,)),
        ),
    ),
    Case(
        # vLLM hides file paths under system roots (/tmp, /home, /var, ...) in every
        # error message: clients cannot rely on seeing the path they sent.
        "load-missing-path-hidden",
        (
            Step(
                "POST",
                LOAD,
                404,
                body={"lora_name": "{name}", "lora_path": "/tmp/no-such-dir/{name}"},
                error_type="NotFoundError",
                message_contains="Loading lora {name} failed: No adapter found for <path>",
            ),
        ),
    ),
    Case(
        "load-dir-without-config",
        (
            Step(
                "POST",
                LOAD,
                404,
                body={"lora_name": "{name}", "lora_path": "{empty}"},
                error_type="NotFoundError",
                message_contains="Loading lora {name} failed: No adapter found for",
            ),
        ),
    ),
    Case(
        "load-config-without-weights",
        (
            Step(
                "POST",
                LOAD,
                500,
                body={"lora_name": "{name}", "lora_path": "{no_weights}"},
                error_type="InternalServerError",
                message_contains="doesn't contain tensors",
            ),
            Step("GET", "/v1/models", 200, checks=(lacks_adapter,)),
        ),
    ),
    Case(
        "load-config-not-json",
        (
            Step(
                "POST",
                LOAD,
                500,
                body={"lora_name": "{name}", "lora_path": "{bad_json}"},
                error_type="InternalServerError",
                message_contains="Call to add_lora method failed: Worker failed with error",
            ),
        ),
    ),
    Case(
        # vLLM does not read peft_type: whoever must refuse other PEFT kinds (the sidecar)
        # has to check for itself.
        "load-ignores-peft-type",
        (
            Step("POST", LOAD, 200, body={"lora_name": "{name}", "lora_path": "{not_lora}"}),
            Step("POST", UNLOAD, 200, body={"lora_name": "{name}"}),
        ),
    ),
    Case(
        "load-rank-too-big",
        (
            Step(
                "POST",
                LOAD,
                500,
                body={"lora_name": "{name}", "lora_path": "{big}"},
                error_type="InternalServerError",
                message_contains="is greater than max_lora_rank",
            ),
            Step("GET", "/v1/models", 200, checks=(lacks_adapter,)),
        ),
    ),
    Case(
        "load-missing-field",
        (
            Step(
                "POST",
                LOAD,
                400,
                body={"lora_name": "{name}"},
                error_type="Bad Request",
                param="body.lora_path",
            ),
        ),
    ),
    Case(
        "load-malformed-json",
        (Step("POST", LOAD, 400, raw=b'{"lora_name": "x", ', error_type="Bad Request"),),
    ),
    Case(
        "unload-unknown",
        (Step("POST", UNLOAD, 404, body={"lora_name": "{name}"}, error_type="NotFoundError"),),
    ),
    Case(
        "unload-missing-field",
        (Step("POST", UNLOAD, 400, body={}, error_type="Bad Request", param="body.lora_name"),),
    ),
    Case(
        "completion-base",
        (
            Step(
                "POST",
                "/v1/completions",
                200,
                body={"model": "{base}", **PROMPT},
                checks=(completion_shape, served_by("{base}")),
            ),
        ),
    ),
    Case(
        "completion-unknown-model",
        (
            Step(
                "POST",
                "/v1/completions",
                404,
                body={"model": "{name}", **PROMPT},
                error_type="NotFoundError",
                param="model",
                message_contains="The model `{name}` does not exist. Valid aliases: {base}.",
            ),
        ),
    ),
    Case(
        "completion-missing-prompt",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}"},
                error_type="BadRequestError",
                param="prompt",
                message_contains="Either prompt or prompt_embeds must be provided and "
                "non-empty. (parameter=prompt)",
            ),
        ),
    ),
    Case(
        "completion-empty-prompt",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}", "prompt": ""},
                error_type="BadRequestError",
                param="prompt",
            ),
        ),
    ),
    Case(
        "completion-max-tokens-zero",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}", "prompt": "x", "max_tokens": 0},
                error_type="BadRequestError",
                param="max_tokens",
                message_contains="max_tokens must be at least 1, got 0. "
                "(parameter=max_tokens, value=0)",
            ),
        ),
    ),
    Case(
        "completion-max-tokens-over-context",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}", "prompt": "x", "max_tokens": 100000},
                error_type="BadRequestError",
                param="max_tokens",
                message_contains="max_tokens=100000 cannot be greater than max_model_len=512.",
            ),
        ),
    ),
    Case(
        "completion-prompt-over-context",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                # Within vLLM's character bound (max chars per token of the tokenizer
                # times 512), so the token count decides.
                body={"model": "{base}", "prompt": "soup " * 600, "max_tokens": 1},
                error_type="BadRequestError",
                param="input_tokens",
                message_contains="This model's maximum context length is 512 tokens. However, "
                "your prompt contains at least 513 input tokens",
            ),
        ),
    ),
    Case(
        "completion-greedy-n",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}", "prompt": "x", "n": 2, "temperature": 0},
                error_type="BadRequestError",
                message_contains="n must be 1 when using greedy sampling, got 2.",
            ),
        ),
    ),
    Case(
        "completion-wrong-type",
        (
            Step(
                "POST",
                "/v1/completions",
                400,
                body={"model": "{base}", "prompt": "x", "max_tokens": "many"},
                error_type="Bad Request",
                param="body.max_tokens",
            ),
        ),
    ),
    Case(
        "completion-malformed-json",
        (Step("POST", "/v1/completions", 400, raw=b"{not json", error_type="Bad Request"),),
    ),
    Case(
        "completion-stream",
        (
            Step(
                "POST",
                "/v1/completions",
                200,
                body={
                    "model": "{base}",
                    **PROMPT,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
                checks=(sse_stream,),
            ),
        ),
    ),
    Case(
        "chat-base",
        (
            Step(
                "POST",
                "/v1/chat/completions",
                200,
                body={
                    "model": "{base}",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "Rate the soup"}],
                },
                checks=(chat_shape, served_by("{base}")),
            ),
        ),
    ),
    Case(
        "chat-stream",
        (
            Step(
                "POST",
                "/v1/chat/completions",
                200,
                body={
                    "model": "{base}",
                    "max_tokens": 5,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "Rate the soup"}],
                },
                checks=(sse_stream,),
            ),
        ),
    ),
    Case(
        "chat-messages-wrong-type",
        (
            Step(
                "POST",
                "/v1/chat/completions",
                400,
                body={"model": "{base}", "messages": "hi"},
                error_type="Bad Request",
                param="body.messages",
            ),
        ),
    ),
    Case(
        "chat-empty-messages",
        (
            Step(
                "POST",
                "/v1/chat/completions",
                400,
                body={"model": "{base}", "messages": []},
                error_type="BadRequestError",
                message_contains="Cannot apply chat template to an empty conversation.",
            ),
        ),
    ),
)
