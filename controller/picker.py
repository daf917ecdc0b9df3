"""The endpoint picker: one inference request in, the pods that should serve it out.

Parses the body's `model`, resolves it to a target through the InferenceModel
weights, sheds or rejects what cannot be served, runs the scheduling pipeline on
the inventory, and rewrites the body's `model` to the target. The Envoy
protocol lives in `controller.extproc`; the scheduling rules in
`controller.scheduling`; this module is the policy between them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog

from controller.extproc.router import Reject, Route
from controller.inventory import Inventory
from controller.models import ModelRoute, ModelTable, WeightedTarget
from controller.picker_metrics import PickerMetrics
from controller.scheduling.pipeline import Pipeline
from controller.scheduling.types import SchedulingRequest
from controller.stats import TrafficStats

log = structlog.get_logger("picker")
SHED_RESULT = "shed"


@dataclass(frozen=True)
class PickerSettings:
    passthrough: bool = False
    """Route models no InferenceModel names to themselves instead of answering 404."""
    sticky_header: str | None = None
    """Request header whose value pins a client to one target (e.g. x-user-id), for models
    whose InferenceModel does not name its own (`controller.models`)."""
    base_models: frozenset[str] = frozenset()
    """Names served by the base model itself: no adapter, so no LoRA affinity."""


@dataclass(frozen=True)
class Routed:
    """What on_response needs to attribute the answer."""

    model: str
    target: str
    endpoint: str


class EndpointPicker:
    def __init__(
        self,
        inventory: Inventory,
        pipeline: Pipeline,
        models: Callable[[], ModelTable],
        models_synced: Callable[[], bool],
        settings: PickerSettings,
        stats: TrafficStats,
        metrics: PickerMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.inventory = inventory
        self.pipeline = pipeline
        self._models = models
        self._models_synced = models_synced
        self.settings = settings
        self.stats = stats
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._sticky = settings.sticky_header.lower() if settings.sticky_header else None

    def route(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        started = time.perf_counter()
        try:
            return self._route(headers, body, subset)
        finally:
            self.metrics.scheduling_duration.observe(time.perf_counter() - started)

    def _route(
        self, headers: Mapping[str, str], body: bytes, subset: list[str] | None
    ) -> Route | Reject:
        parsed = _parse_body(body)
        if isinstance(parsed, Reject):
            return self._rejected("", "", "bad_request", parsed)
        document, model = parsed
        model_route = self._models().resolve(model)
        if model_route is None and not self._models_synced():
            return self._rejected(
                model,
                "",
                "starting",
                Reject(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "The picker is starting: the InferenceModels are not read yet; retry.",
                    "ServiceUnavailableError",
                ),
            )
        if model_route is None:
            if not self.settings.passthrough:
                return self._rejected(
                    model,
                    "",
                    "unknown_model",
                    Reject(
                        HTTPStatus.NOT_FOUND,
                        f"The model `{model}` does not exist: no InferenceModel serves it.",
                        "NotFoundError",
                    ),
                )
            model_route = ModelRoute(model, (WeightedTarget(model, 1),))
        sticky = model_route.sticky_header or self._sticky
        sticky_key = headers.get(sticky) if sticky else None
        target = model_route.choose(sticky_key, self._rng)
        request = SchedulingRequest(
            model=model,
            target=target,
            is_adapter=target not in self.settings.base_models,
            criticality=model_route.criticality,
            subset=frozenset(subset) if subset is not None else None,
            headers=headers,
        )
        views = self.inventory.snapshot()
        if self.pipeline.should_shed(request, views):
            self.metrics.sheds.labels(model=model).inc()
            return self._rejected(
                model,
                target,
                SHED_RESULT,
                Reject(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "The pool is saturated and this model's requests are Sheddable; retry later.",
                    "RateLimitError",
                ),
            )
        result = self.pipeline.schedule(request, views)
        if not result.endpoints:
            return self._rejected(
                model,
                target,
                "no_endpoint",
                Reject(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "No ready endpoint can serve this request.",
                    "ServiceUnavailableError",
                ),
            )
        addresses = [view.address for view in result.endpoints]
        self.metrics.requests.labels(model=model, target=target, result="routed").inc()
        self.metrics.affinity.labels(outcome=result.affinity.value).inc()
        new_body = None
        if target != model:
            document["model"] = target
            new_body = json.dumps(document, separators=(",", ":")).encode()
        return Route(addresses, new_body, Routed(model, target, addresses[0]))

    def _rejected(self, model: str, target: str, result: str, reject: Reject) -> Reject:
        self.metrics.requests.labels(model=model, target=target, result=result).inc()
        log.info(
            "request_rejected", model=model, target=target, status=reject.status, reason=result
        )
        return reject

    def on_response(self, context: object, status: int, elapsed_seconds: float) -> None:
        if not isinstance(context, Routed):
            return
        self.stats.record(context.model, context.target, context.endpoint, status, elapsed_seconds)
        self.metrics.responses.labels(
            model=context.model, target=context.target, code=_code_class(status)
        ).inc()
        self.metrics.response_duration.labels(model=context.model, target=context.target).observe(
            elapsed_seconds
        )


def _parse_body(body: bytes) -> tuple[dict[str, Any], str] | Reject:
    if not body:
        return Reject(
            HTTPStatus.BAD_REQUEST,
            "The request has no JSON body with a `model`.",
            "BadRequestError",
        )
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return Reject(
            HTTPStatus.BAD_REQUEST, f"The request body is not valid JSON: {exc}", "BadRequestError"
        )
    if not isinstance(document, dict):
        return Reject(
            HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.", "BadRequestError"
        )
    model = document.get("model")
    if not isinstance(model, str) or not model:
        return Reject(
            HTTPStatus.BAD_REQUEST, "The request body has no `model` string.", "BadRequestError"
        )
    return document, model


def _code_class(status: int) -> str:
    return "none" if status == 0 else f"{status // 100}xx"
