"""Faults injected over `/sim/...`: the failures loractl must survive, on demand."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from pydantic import BaseModel, Field


class UnhealthyRequest(BaseModel):
    seconds: float = Field(gt=0, le=3600)


class ErrorRateRequest(BaseModel):
    model: str = Field(min_length=1)
    rate: float = Field(ge=0, le=1)
    status: int = Field(default=500, ge=400, le=599)


class LatencyRequest(BaseModel):
    extra_ms: float = Field(ge=0, le=600_000)


class RestartRequest(BaseModel):
    downtime_seconds: float = Field(default=0.0, ge=0, le=600)


@dataclass
class Faults:
    rng: random.Random
    unhealthy_until: float = 0.0
    error_rates: dict[str, tuple[float, int]] = field(default_factory=dict)

    def healthy(self) -> bool:
        return time.monotonic() >= self.unhealthy_until

    def make_unhealthy(self, seconds: float) -> None:
        self.unhealthy_until = time.monotonic() + seconds

    def set_error_rate(self, model: str, rate: float, status: int) -> None:
        if rate == 0:
            self.error_rates.pop(model, None)
        else:
            self.error_rates[model] = (rate, status)

    def injected_error(self, model: str) -> HTTPStatus | None:
        """The status to fail this request with, or None to serve it."""
        rate_and_status = self.error_rates.get(model)
        if rate_and_status is None:
            return None
        rate, status = rate_and_status
        return HTTPStatus(status) if self.rng.random() < rate else None

    def clear(self) -> None:
        self.unhealthy_until = 0.0
        self.error_rates.clear()
