"""Why an adapter operation failed, in the three classes an operator acts on differently."""

from __future__ import annotations

import enum


class FailureReason(enum.StrEnum):
    CONFIGURATION = "configuration"
    """Fix the deployment: runtime LoRA updating off, wrong API key, missing token."""
    BAD_ARTIFACT = "bad_artifact"
    """Fix the adapter or its source: not found, not a LoRA, rank above the server's maximum."""
    TRANSIENT = "transient"
    """Nothing to fix: server restarting, network, 5xx. Retried with backoff."""
    INVALID_SPEC = "invalid_spec"
    """Fix the ConfigMap entry: unsafe id, unknown source form, id in both lists."""


class AdapterFailure(Exception):
    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
