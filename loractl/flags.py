"""Command-line pieces every loractl command shares: port and header flags, and what to say
when a port cannot be listened on. Kept free of heavy imports: every command's parser loads
it."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable


def _port(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number; got {text!r}") from None
    if not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from {lowest} to 65535; got {value}")
    return value


def port_number(text: str) -> int:
    """A port to listen on or to reach: 1 to 65535."""
    return _port(text, lowest=1)


def port_or_zero(text: str) -> int:
    """A port to listen on, where 0 lets the system pick a free one."""
    return _port(text, lowest=0)


HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # what RFC 9110 allows a header name


def header_problem(name: str) -> str | None:
    """Why `name` cannot be an HTTP request header name, or None if it can."""
    if HTTP_TOKEN.fullmatch(name):
        return None
    return f"{name!r} is not an HTTP header name: use letters, digits and '-', e.g. x-user-id"


def header_name(text: str) -> str:
    """A request header to read: an HTTP token; an empty one would silently match nothing."""
    problem = header_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


class CannotListen(Exception):
    """A server could not listen where its flag says; the message names the flag to change."""

    def __init__(self, flag: str, address: str, reason: str) -> None:
        super().__init__(
            f"{flag}: cannot listen on {address} ({reason}); stop what holds the port or "
            f"choose another with {flag}"
        )


async def listen(start: Callable[[], Awaitable[None]], flag: str, host: str, port: int) -> None:
    """Run `start` (an aiohttp site's, say); the system's refusal becomes `CannotListen`."""
    try:
        await start()
    except OSError as exc:
        # asyncio's message repeats the address; the errno's own text is the reason.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CannotListen(flag, f"{host}:{port}", reason) from exc
