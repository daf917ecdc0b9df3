"""Bad input gets a vLLM-shaped 400 naming the problem, and the server keeps serving."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import SimulatorFactory
from tests.support.simulators import loractl_argv

FAST = ("--time-scale", "0")

BAD_REQUESTS = [
    ("/v1/completions", b"", "body"),
    ("/v1/completions", b"[1, 2", "body.5"),  # FastAPI: the position of the JSON error
    ("/v1/completions", b'"just a string"', None),
    ("/v1/completions", b'{"prompt": 42}', "body.prompt"),
    ("/v1/completions", b'{"prompt": "x", "n": "two"}', "body.n"),
    ("/v1/completions", b'{"prompt": "x", "stream": "sometimes"}', "body.stream"),
    # vLLM names the union member too (body.messages.0.ChatCompletionDeveloperMessageParam.role)
    ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', "body.messages.0.role"),
    ("/v1/chat/completions", b"{}", "body.messages"),
    ("/v1/load_lora_adapter", b'{"lora_name": 3, "lora_path": "/x"}', "body.lora_name"),
    ("/v1/load_lora_adapter", b'{"lora_path": "/x"}', "body.lora_name"),
    ("/v1/load_lora_adapter", b'{"lora_name": "a", "lora_path": "/x", "load_inplace": "maybe"}',
     "body.load_inplace"),
    ("/v1/unload_lora_adapter", b"nonsense", "body.0"),
    ("/sim/error-rate", b'{"model": "m", "rate": 2}', "body.rate"),
    ("/sim/restart", b'{"downtime_seconds": -1}', "body.downtime_seconds"),
]  # fmt: skip


def cards(client: httpx.Client) -> list[tuple[str, str, str | None]]:
    # Not the whole listing: vLLM draws new permission ids on every call.
    return [(c["id"], c["root"], c["parent"]) for c in client.get("/v1/models").json()["data"]]


@pytest.mark.parametrize(("path", "raw", "param"), BAD_REQUESTS)
def test_malformed_body_is_a_400_and_nothing_is_lost(
    start_simulator: SimulatorFactory, path: str, raw: bytes, param: str | None, tmp_path: Path
) -> None:
    sim = start_simulator(*FAST, "--served-model-name", "base")
    with sim.client() as client:
        before = cards(client)
        answer = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "Bad Request"
        assert error["code"] == 400
        assert error["message"]
        if param is not None:
            assert error["param"] == param
        assert cards(client) == before
        ok = client.post("/v1/completions", json={"model": "base", "prompt": "still there?"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("{not json", "Expecting property name enclosed in double quotes"),
        ('{"peft_type": "LORA"}', "Missing required configuration fields: {"),
        ('{"r": "8", "lora_alpha": 16, "target_modules": []}', "'<=' not supported between"),
        ('{"r": 0, "lora_alpha": 16, "target_modules": []}', "LoRA rank `r` must be a positive"),
        ('{"r": 8, "lora_alpha": 8, "target_modules": [], "use_dora": true}', "support DoRA"),
        ('{"r": 8, "lora_alpha": 8, "target_modules": []}', "doesn't contain tensors"),
    ],
)
def test_broken_adapter_config_is_refused_by_the_worker_like_vllm(
    start_simulator: SimulatorFactory, tmp_path: Path, config: str, fragment: str
) -> None:
    adapter = tmp_path / "broken"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    sim = start_simulator(*FAST)
    with sim.client() as client:
        answer = client.post(
            "/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(adapter)}
        )
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["type"] == "InternalServerError"
        assert error["message"].startswith("Call to add_lora method failed: Worker failed")
        assert fragment in error["message"]
        assert "broken" not in {c["id"] for c in client.get("/v1/models").json()["data"]}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-lora-rank", "7"], "--max-lora-rank 7 is not one of"),
        (
            ["--max-loras", "4", "--max-cpu-loras", "2"],
            "--max-cpu-loras (2) must be >= --max-loras (4)",
        ),
        (["--lora-modules", "no-equals-sign"], "expected name=path"),
        (["--lora-modules", "a=/does/not/exist"], "No adapter found for /does/not/exist"),
        (["--max-loras", "0"], "--max-loras must be at least 1; got 0"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1; got 0"),
        (["--kv-cache-tokens", "0"], "--kv-cache-tokens must be at least 1; got 0"),
        (["--max-model-len", "-1"], "--max-model-len must be at least 1; got -1"),
        (["--inter-token-ms", "-5"], "--inter-token-ms must be 0 or more; got -5.0"),
        (["--disk-load-ms", "nan"], "--disk-load-ms must be 0 or more; got nan"),
        (["--time-scale", "-1"], "--time-scale must be 0 or more; got -1.0"),
    ],
)
def test_bad_flags_exit_with_a_clear_error(flags: list[str], message: str) -> None:
    result = subprocess.run(
        loractl_argv("sim", "--port", "0", *flags), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr
