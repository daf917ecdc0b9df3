"""Adapter config parsing: the upstream schema unchanged, per-adapter problems isolated."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_config, parse_config
from sidecar.sources import HuggingFaceSource, LocalSource

UPSTREAM = Path(__file__).parent / "upstream_configs"


@pytest.mark.parametrize("path", sorted(UPSTREAM.glob("*.yaml")), ids=lambda p: p.stem)
def test_upstream_configs_parse_unchanged(path: Path) -> None:
    desired = load_config(path)
    assert desired.ensure_exist
    assert all(isinstance(s.source, HuggingFaceSource) for s in desired.ensure_exist.values())
    assert desired.host == "localhost"
    assert desired.port == 8000


def test_upstream_unit_test_config_semantics() -> None:
    desired = load_config(UPSTREAM / "unit_test_config.yaml")
    assert sorted(desired.ensure_exist) == ["already_exists", "uncensored-lora-v1"]
    assert desired.ensure_not_exist == {"uncensored-lora-v2", "to_remove"}
    assert "uncensored-lora-v3" in desired.problems, "in both lists: reported, not applied"
    assert "ensureExist and ensureNotExist" in desired.problems["uncensored-lora-v3"]
    assert desired.ensure_exist["already_exists"].base_model == "Qwen/Qwen3-32B"


def test_default_base_model_and_overrides() -> None:
    desired = parse_config(
        """
vLLMLoRAConfig:
  host: vllm.local
  port: 9000
  defaultBaseModel: base/a
  ensureExist:
    models:
    - {id: one, source: org/one}
    - {id: two, source: /adapters/two, base-model: base/b}
    - {id: three, source: "hf://org/three@v2/sub", revision: v2, pinned: true}
"""
    )
    assert desired.vllm_url == "http://vllm.local:9000"
    assert desired.ensure_exist["one"].base_model == "base/a"
    assert desired.ensure_exist["two"].base_model == "base/b"
    assert desired.ensure_exist["two"].source == LocalSource("/adapters/two")
    assert desired.ensure_exist["three"].source == HuggingFaceSource("org/three", "v2", "sub")


def test_empty_sections_are_fine() -> None:
    desired = parse_config("vLLMLoRAConfig:\n  ensureExist:\n    models:\n  ensureNotExist:\n")
    assert desired.ensure_exist == {}
    assert desired.ensure_not_exist == frozenset()


@pytest.mark.parametrize(
    ("adapter_id", "fragment"),
    [("../x", "not a safe adapter name"), ("a/b", "not a safe adapter name"),
     (".hidden", "not a safe adapter name"), ("x" * 129, "not a safe adapter name")],
)  # fmt: skip
def test_unsafe_ids_are_per_adapter_problems(adapter_id: str, fragment: str) -> None:
    desired = parse_config(
        f"""
vLLMLoRAConfig:
  ensureExist:
    models:
    - {{id: "{adapter_id}", source: org/bad}}
    - {{id: good, source: org/good}}
  ensureNotExist:
    models:
    - {{id: "{adapter_id}", source: org/bad}}
"""
    )
    assert list(desired.ensure_exist) == ["good"]
    assert fragment in desired.problems[adapter_id]
    assert adapter_id not in desired.ensure_not_exist


def test_bad_source_form_is_a_per_adapter_problem() -> None:
    desired = parse_config(
        """
vLLMLoRAConfig:
  ensureExist:
    models:
    - {id: bad, source: "s3://bucket/key"}
    - {id: good, source: org/good}
"""
    )
    assert list(desired.ensure_exist) == ["good"]
    assert "'bad'" in desired.problems["bad"]


def test_same_id_twice_with_different_sources() -> None:
    desired = parse_config(
        """
vLLMLoRAConfig:
  ensureExist:
    models:
    - {id: twice, source: org/one}
    - {id: twice, source: org/two}
    - {id: same, source: org/s}
    - {id: same, source: org/s}
"""
    )
    assert "listed twice" in desired.problems["twice"]
    assert list(desired.ensure_exist) == ["same"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("vLLMLoRAConfig: [unclosed", "not valid YAML"),
        ("just a string", "missing the top-level 'vLLMLoRAConfig' key"),
        ("other: {}", "missing the top-level 'vLLMLoRAConfig' key"),
        ("vLLMLoRAConfig:\n  port: http\n", "vLLMLoRAConfig.port"),
        ("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: x}\n",
         "vLLMLoRAConfig.ensureExist.models.0.source: Field required"),
        ("vLLMLoRAConfig:\n  ensureExist:\n    models: {id: x}\n", "ensureExist.models"),
    ],
)  # fmt: skip
def test_broken_documents_are_rejected_whole_with_the_location(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert fragment in str(caught.value)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
