"""Simulator behaviours beyond the shared contract table: gates, auth, streams, text."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import SimulatorFactory

FAST = ("--time-scale", "0")


@pytest.mark.parametrize("env_value", [None, "0", "false", "yes"])
def test_load_routes_absent_unless_env_enables_them(
    start_simulator: SimulatorFactory, adapters: Callable[..., str], env_value: str | None
) -> None:
    env = {} if env_value is None else {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": env_value}
    sim = start_simulator(*FAST, env=env)
    with sim.client() as client:
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            answer = client.post(route, json={"lora_name": "a", "lora_path": adapters()})
            assert answer.status_code == 404
            assert answer.json() == {"detail": "Not Found"}


@pytest.mark.parametrize("env_value", ["true", " TRUE ", "1"])
def test_env_spellings_vllm_accepts(
    start_simulator: SimulatorFactory, adapters: Callable[..., str], env_value: str
) -> None:
    sim = start_simulator(*FAST, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": env_value})
    with sim.client() as client:
        answer = client.post(
            "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": adapters()}
        )
        assert answer.status_code == 200


def test_dev_flag_forces_runtime_updating_on(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST, "--allow-runtime-lora-updating", env={})
    with sim.client() as client:
        answer = client.post(
            "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": adapters()}
        )
        assert answer.status_code == 200


def test_api_key_guards_v1_routes_only(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator(*FAST, "--api-key", "s3cret")
    with sim.client() as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models").json() == {"error": "Unauthorized"}
        wrong = {"Authorization": "Bearer nope"}
        assert client.get("/v1/models", headers=wrong).status_code == 401
        assert (
            client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        )
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert "s3cret" not in sim.process.log_path.read_text()


def test_lora_modules_are_registered_at_start(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    first, second = adapters("first"), adapters("second")
    sim = start_simulator(
        *FAST, "--lora-modules", f"first={first}", json.dumps({"name": "second", "path": second})
    )
    with sim.client() as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["first"]["root"] == first
    assert cards["second"]["root"] == second


def test_served_model_name_aliases_answer_with_the_first_name(
    start_simulator: SimulatorFactory,
) -> None:
    sim = start_simulator(*FAST, "--served-model-name", "base", "alias")
    with sim.client() as client:
        answer = client.post("/v1/completions", json={"model": "alias", "prompt": "hi"})
        assert answer.json()["model"] == "base"
        no_model = client.post("/v1/completions", json={"prompt": "hi"})
        assert no_model.json()["model"] == "base"


def test_text_depends_on_the_serving_weights(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    sim = start_simulator(*FAST)
    one, two = adapters("one"), adapters("two")
    body = {"prompt": "Describe the soup", "max_tokens": 20}
    with sim.client() as client:
        client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": one})
        client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": one})
        client.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": two})

        def text(model: str) -> str:
            answer = client.post("/v1/completions", json={"model": model, **body})
            return str(answer.json()["choices"][0]["text"])

        assert text("x") == text("x")
        assert text("x") == text("y"), "same files, same weights, same text"
        assert text("x") != text("z")
        before = text("x")
        reloaded = client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "x", "lora_path": two, "load_inplace": True},
        )
        assert reloaded.status_code == 200
        assert text("x") == text("z"), "in-place reload serves the new weights"
        assert text("x") != before


def sse_chunks(response: httpx.Response) -> list[dict[str, object]]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_chat_stream_deltas_rebuild_the_non_streamed_answer(
    start_simulator: SimulatorFactory,
) -> None:
    sim = start_simulator(*FAST)
    body = {"messages": [{"role": "user", "content": "Rate the noodles"}], "max_tokens": 12}
    with sim.client() as client:
        whole = client.post("/v1/chat/completions", json=body).json()
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = sse_chunks(streamed)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]  # type: ignore[index]
    assert deltas[0] == {"role": "assistant", "content": ""}
    text = "".join(str(d.get("content", "")) for d in deltas)
    assert text == whole["choices"][0]["message"]["content"]
    assert "usage" not in chunks[-1], "vLLM sends usage only when stream_options asks"


def test_force_include_usage_adds_the_usage_chunk(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator(*FAST, "--enable-force-include-usage")
    with sim.client() as client:
        streamed = client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}
        )
    last = sse_chunks(streamed)[-1]
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 3,
        "total_tokens": 4,
    }


def test_batch_prompts_and_n_give_one_choice_each(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator(*FAST)
    with sim.client() as client:
        answer = client.post(
            "/v1/completions", json={"prompt": ["one", "two"], "n": 2, "max_tokens": 4}
        ).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["usage"]["completion_tokens"] == 16


def test_context_length_is_enforced_like_vllm_0_32(start_simulator: SimulatorFactory) -> None:
    sim = start_simulator(*FAST, "--max-model-len", "32")
    with sim.client() as client:
        too_many = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100})
        too_long = client.post("/v1/completions", json={"prompt": "soup " * 40, "max_tokens": 1})
        # A prompt that fits leaves what room it can: max_tokens is clamped, not refused.
        clamped = client.post("/v1/completions", json={"prompt": "soup " * 30, "max_tokens": 9})
    assert too_many.status_code == 400
    assert too_many.json()["error"] == {
        "message": "max_tokens=100 cannot be greater than max_model_len=32. Please request "
        "fewer output tokens. (parameter=max_tokens, value=100)",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "input_tokens"
    assert "your prompt contains at least 33 input tokens" in too_long.json()["error"]["message"]
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["usage"]["total_tokens"] == 32
    assert clamped.json()["choices"][0]["finish_reason"] == "length"


def test_a_page_restricted_to_every_family_is_the_whole_page(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    """Every family the simulator exports is named to its registry, so `name[]` (at
    /metrics/, as in vLLM) leaves none of them out."""
    sim = start_simulator(*FAST, "--export-lora-loaded", "--lora-modules", f"a={adapters()}")
    with sim.client() as client:
        answer = client.post("/v1/completions", json={"model": "a", "prompt": "Hi"})
        assert answer.status_code == 200
        whole = samples(client.get("/metrics").text)
        names = sorted({name for name, _ in whole})
        restricted = client.get("/metrics/", params=[("name[]", name) for name in names])
    assert samples(restricted.text) == whole
    assert "vllm:lora_requests_info" in names
    assert "vllm:lora_adapter_loaded" in names


def samples(page: str) -> set[tuple[str, str]]:
    """(name, labels) of each sample; values and the clock-driven _created ones aside."""
    found = set()
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = rest.rpartition("}")[0] if rest else ""
            name = name.split(" ")[0]
            if not name.endswith("_created"):
                found.add((name, labels))
    return found
