"""Per-adapter records: what the sidecar knows, shown on /status and read by the planner."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from sidecar.failures import FailureReason


class AdapterState(enum.StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"


@dataclass
class LastError:
    reason: FailureReason
    message: str
    at: float


@dataclass
class AdapterRecord:
    id: str
    desired: bool
    state: AdapterState = AdapterState.PENDING
    source: str | None = None
    revision: str | None = None
    loaded_source: str | None = None
    """The source key of what vLLM serves under this name, as far as we loaded or adopted it."""
    loaded_path: str | None = None
    owned_path: bool = False
    """The loaded files live under --adapter-dir: delete them once the adapter is unloaded."""
    attempts: int = 0
    consecutive_failures: int = 0
    retry_at: float = 0.0
    """Monotonic time before which no new attempt is made (backoff)."""
    last_error: LastError | None = None
    warnings: list[str] = field(default_factory=list)
    changed_at: float = field(default_factory=time.time)
    loaded_at: float | None = None

    def as_json(self, now_monotonic: float) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "state": self.state.value,
            "source": self.source,
            "revision": self.revision,
            "path": self.loaded_path,
            "attempts": self.attempts,
            "consecutive_failures": self.consecutive_failures,
            "retry_in_seconds": round(max(0.0, self.retry_at - now_monotonic), 3),
            "last_error": None
            if self.last_error is None
            else {
                "reason": self.last_error.reason.value,
                "message": self.last_error.message,
                "at": _iso(self.last_error.at),
            },
            "warnings": self.warnings,
            "changed_at": _iso(self.changed_at),
            "loaded_at": None if self.loaded_at is None else _iso(self.loaded_at),
        }


def _iso(timestamp: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
        + f".{int(timestamp % 1 * 1000):03d}Z"
    )
