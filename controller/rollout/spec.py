"""The AdapterRollout resource (group loractl.io, v1alpha1): what a person asks, where it is.

`spec` is the canary a person (or `loractl canary`) wants: move the traffic of
one model name from adapter `from` to adapter `to` in weighted steps, each
held for a pause and judged by gates. `status` is the controller's progress,
written after every decision, so a restarted controller resumes from it.

The API spells fields in camelCase and Python in snake_case: models accept
either on input and `to_api()` gives the API form. The CRD in
manifests/crds/adapterrollouts.loractl.io.yaml mirrors these models field for
field (a test keeps them in step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from loractl.flags import header_problem
from sidecar.config import id_problem
from sidecar.sources import SourceError, parse_source

GROUP = "loractl.io"
VERSION = "v1alpha1"
KIND = "AdapterRollout"
PLURAL = "adapterrollouts"

# Whole numbers with units, as Go (and so kubectl users) write them: 30s, 5m, 1h30m.
DURATION_PATTERN = r"^([0-9]+(h|m|s))+$"
_DURATION_PART = re.compile(r"([0-9]+)(h|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}

HISTORY_LIMIT = 50
MAX_STEPS = 20


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """'30s', '5m', '1h', '1h30m' → timedelta; anything else raises `DurationError`."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise DurationError(
            f"{text!r} is not a duration: write whole numbers with a unit h, m or s, "
            "e.g. 30s, 5m, 1h or 1h30m"
        )
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


def _checked_duration(text: str) -> str:
    parse_duration(text)
    return text


# Kept as text so the status and `kubectl get -o yaml` show what the person wrote.
Duration = Annotated[str, AfterValidator(_checked_duration)]


class _ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_api(self) -> dict[str, Any]:
        """The API form: camelCase and JSON types. None stays null (the CRD marks such fields
        nullable): left out, `maxP95LatencyRatio` would be defaulted back to 1.5 by the server."""
        return self.model_dump(mode="json", by_alias=True)


class _SpecModel(_ApiModel):
    # Unknown keys are refused: on an API server without our schema (or in the CLI, before
    # applying) a misspelt gate would otherwise silently fall back to its default.
    model_config = ConfigDict(extra="forbid")


class _StatusModel(_ApiModel):
    # Status is ours, but a newer controller may have written fields this one does not know.
    model_config = ConfigDict(extra="ignore")


class AdapterRef(_SpecModel):
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=1024)


class ConfigMapRef(_SpecModel):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="configmap.yaml", min_length=1, max_length=253)


class Step(_SpecModel):
    weight: int = Field(ge=0, le=100)
    """Percent of the model's traffic sent to `to`; `from` gets the rest."""
    pause: Duration | None = None
    """How long to hold this weight before the gates may pass it; None: as soon as they pass."""
    manual: bool = False
    """Hold at this weight until a person approves the step (spec.approvedStep)."""


class Gates(_SpecModel):
    min_ready_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    max_p95_latency_ratio: float | None = Field(default=1.5, gt=0.0)
    """p95 of `to` over p95 of `from` in the same window; None turns the gate off."""
    min_requests: int = Field(default=20, ge=0)
    min_requests_timeout: Duration | None = "30m"
    """How long past a step's pause to wait for min_requests; None: wait for ever."""
    max_consecutive_failures: int = Field(default=2, ge=1)
    load_timeout: Duration = "10m"


class Stickiness(_SpecModel):
    header: str = Field(min_length=1, max_length=256)
    """The request header the picker hashes so a user stays on one target (see
    controller.models): written with the weights, as the model's sticky-header annotation."""


class RolloutSpec(_SpecModel):
    pool: str = Field(min_length=1, max_length=253)
    model: str = Field(min_length=1, max_length=253)
    config_map: ConfigMapRef
    # `from` is a Python keyword: the field is from_, the API name "from".
    from_: AdapterRef = Field(validation_alias="from", serialization_alias="from")
    to: AdapterRef
    steps: tuple[Step, ...] = Field(min_length=1, max_length=MAX_STEPS)
    """Non-decreasing weights. The last need not be 100: passing it promotes, as in Argo
    Rollouts; a final 100 % step bakes full traffic while `from` is still loaded."""
    gates: Gates = Gates()
    stickiness: Stickiness | None = None
    keep_on_abort: bool = False
    drain: Duration = "10s"
    """How long the adapter leaving the traffic (`from` on promotion, `to` on an abort after
    it had some) stays listed once the weights moved off it: requests already routed to it
    finish, and every picker sees the new weights, before its sidecars unload it."""
    # Commands: `loractl canary pause|resume|promote|abort` sets these.
    paused: bool = False
    abort: bool = False
    promote: bool = False
    approved_step: int = Field(default=-1, ge=-1)
    """Manual steps up to this index are approved; `resume` sets it to the current step."""


class Phase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ABORTED = "Aborted"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.PROMOTED, Phase.ABORTED, Phase.FAILED})


class GateEvaluation(_StatusModel):
    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    detail: str = ""


class HistoryEntry(_StatusModel):
    at: AwareDatetime
    phase: Phase
    step: int
    reason: str
    message: str = ""


class RolloutStatus(_StatusModel):
    phase: Phase = Phase.PENDING
    current_step: int = -1
    step_started_at: AwareDatetime | None = None
    """When the current step (or Loading) began: the start of the gates' traffic window."""
    weights: dict[str, int] = Field(default_factory=dict)
    """Percent per target, `from` first; empty until traffic is first shifted."""
    to_weight: int = 0
    last_gates: tuple[GateEvaluation, ...] = ()
    consecutive_gate_failures: int = 0
    unlist_after: AwareDatetime | None = None
    """When the adapter leaving the traffic goes to ensureNotExist (spec.drain after the
    weights moved off it); None once it has, or when nothing waits to go."""
    history: tuple[HistoryEntry, ...] = ()
    message: str = ""
    observed_generation: int = 0


class SpecError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_spec(raw: Mapping[str, Any]) -> RolloutSpec:
    """The API object's `spec` → RolloutSpec, or `SpecError` listing every problem by path."""
    try:
        return RolloutSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([_describe(error) for error in exc.errors(include_url=False)]) from exc


def _describe(error: Any) -> str:
    path = "spec"
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {message}"


def validate_spec(spec: RolloutSpec) -> list[str]:
    """Rules across fields that the schema cannot say; each problem names its fix."""
    problems: list[str] = []
    if spec.from_.id == spec.to.id:
        problems.append(
            f"spec.to.id and spec.from.id are both {spec.to.id!r}: a rollout moves traffic "
            "between two different adapters; give the new weights a new id"
        )
    for field, ref in (("from", spec.from_), ("to", spec.to)):
        problems.extend(_ref_problems(field, ref))
    if spec.stickiness is not None:
        problem = header_problem(spec.stickiness.header)
        if problem is not None:
            problems.append(f"spec.stickiness.header {problem}")
    for index in range(1, len(spec.steps)):
        before, after = spec.steps[index - 1].weight, spec.steps[index].weight
        if after < before:
            problems.append(
                f"spec.steps[{index}].weight {after} is below the step before it ({before}): "
                "weights never go down during a rollout (abort instead)"
            )
    return problems


def _ref_problems(field: str, ref: AdapterRef) -> list[str]:
    problems: list[str] = []
    problem = id_problem(ref.id)
    if problem is not None:
        problems.append(f"spec.{field}.id: {problem}")
    try:
        parse_source(ref.source)
    except SourceError as exc:
        problems.append(f"spec.{field}.source: {exc}")
    return problems
