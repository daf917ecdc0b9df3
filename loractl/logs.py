"""Structured JSON logging shared by every loractl process.

One JSON object per line on stdout, with ISO timestamps and the log level, so
that `kubectl logs` output can be fed to any log pipeline unchanged. Values of
keys that look like credentials are redacted before rendering: a token must
never reach a log line, whoever wrote the log call.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEY_PARTS = ("token", "api_key", "apikey", "authorization", "password", "secret")
REDACTED = "***"
LEVELS = ("debug", "info", "warning", "error", "critical")


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event_dict:
        if any(part in key.lower() for part in SECRET_KEY_PARTS):
            event_dict[key] = REDACTED
    return event_dict


def add_level_option(parser: argparse._ActionsContainer) -> None:
    """`--log-level`, the same on every command: a bad level is refused with the good ones."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default="info",
        help="least severe level logged",
    )


def configure(level: str = "info") -> None:
    """Route structlog (and the stdlib loggers of our dependencies) to JSON on stdout."""
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(
        stream=sys.stdout, level=max(numeric_level, logging.WARNING), format="%(message)s"
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
