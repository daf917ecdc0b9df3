"""The adapter ConfigMap: the upstream lora-syncer schema, accepted unchanged.

Parsing has two levels of failure. A document that is not YAML or breaks the
schema is rejected whole (`ConfigError`): the sidecar keeps its last good
desired state. A single bad entry (unsafe id, unknown source form, an id in
both lists) becomes a per-adapter problem: reported, not applied, and never in
the way of the other adapters.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sidecar.sources import Source, SourceError, parse_source

ROOT_KEY = "vLLMLoRAConfig"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """The whole document was rejected; the message says where and how to fix it."""


class _Entry(BaseModel):
    # Extra keys are allowed: upstream configs carry their own, and so may ours.
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    id: str
    source: str
    base_model: str | None = Field(default=None, alias="base-model")
    revision: str | None = None


class _EntryList(BaseModel):
    model_config = ConfigDict(extra="allow")
    models: list[_Entry] | None = None


class _LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    host: str = "localhost"
    port: int = Field(default=8000, ge=1, le=65535)
    default_base_model: str | None = Field(default=None, alias="defaultBaseModel")
    ensure_exist: _EntryList | None = Field(default=None, alias="ensureExist")
    ensure_not_exist: _EntryList | None = Field(default=None, alias="ensureNotExist")


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow")
    config: _LoRAConfig = Field(alias="vLLMLoRAConfig")


@dataclass(frozen=True)
class AdapterSpec:
    id: str
    source: Source
    base_model: str | None

    @property
    def source_key(self) -> str:
        return self.source.key()


@dataclass(frozen=True)
class DesiredState:
    name: str | None
    host: str
    port: int
    default_base_model: str | None
    ensure_exist: dict[str, AdapterSpec]
    ensure_not_exist: frozenset[str]
    problems: dict[str, str] = field(default_factory=dict)
    """Per-adapter errors: these ids are neither loaded nor unloaded."""
    digest: str = ""

    @property
    def vllm_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def id_problem(adapter_id: str) -> str | None:
    if SAFE_ID.match(adapter_id) and ".." not in adapter_id:
        return None
    return (
        f"id {adapter_id!r} is not a safe adapter name: use 1-128 letters, digits, '.', '_' "
        "or '-', starting with a letter or digit, without '..' or '/'"
    )


def parse_config(text: str) -> DesiredState:
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or ROOT_KEY not in document:
        raise ConfigError(
            f"missing the top-level '{ROOT_KEY}' key: the file must start with "
            f"'{ROOT_KEY}:' followed by ensureExist/ensureNotExist lists"
        )
    try:
        config = _Document.model_validate(document).config
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    problems: dict[str, str] = {}
    ensure_exist = _specs(config, problems)
    ensure_not_exist = set()
    for entry in _entries(config.ensure_not_exist):
        problem = id_problem(entry.id)
        if problem:
            problems[entry.id] = problem
        else:
            ensure_not_exist.add(entry.id)
    for adapter_id in ensure_not_exist & ensure_exist.keys():
        problems[adapter_id] = (
            f"{adapter_id!r} is listed in both ensureExist and ensureNotExist: remove it from "
            "one of them"
        )
    return DesiredState(
        name=config.name,
        host=config.host,
        port=config.port,
        default_base_model=config.default_base_model,
        ensure_exist={k: v for k, v in ensure_exist.items() if k not in problems},
        ensure_not_exist=frozenset(ensure_not_exist - problems.keys()),
        problems=problems,
        digest=hashlib.sha256(text.encode()).hexdigest(),
    )


def load_config(path: Path) -> DesiredState:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_config(text)


def _entries(section: _EntryList | None) -> list[_Entry]:
    return [] if section is None or section.models is None else section.models


def _specs(config: _LoRAConfig, problems: dict[str, str]) -> dict[str, AdapterSpec]:
    specs: dict[str, AdapterSpec] = {}
    for entry in _entries(config.ensure_exist):
        problem = id_problem(entry.id)
        if problem is None:
            try:
                source = parse_source(entry.source, entry.revision)
            except SourceError as exc:
                problem = f"{entry.id!r}: {exc}"
        if problem is not None:
            problems[entry.id] = problem
            continue
        spec = AdapterSpec(entry.id, source, entry.base_model or config.default_base_model)
        previous = specs.get(entry.id)
        if previous is not None and previous.source_key != spec.source_key:
            problems[entry.id] = (
                f"{entry.id!r} is listed twice in ensureExist with different sources "
                f"({previous.source_key}, {spec.source_key}): keep one"
            )
        specs[entry.id] = spec
    return specs


def _describe(exc: ValidationError) -> str:
    details = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        details.append(f"{location}: {error['msg']}")
    return "schema violation: " + "; ".join(details)
