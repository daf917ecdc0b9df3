"""Hugging Face hub downloads, in a short-lived child process (`python -m sidecar.hub`).

Why a child: the hub client (and the HTTP stack it brings) would add more memory
to the sidecar than the rest of it together, for something it does once per
adapter version; and a download stuck in a thread cannot be stopped, while a
child is killed when its time is up. The child classifies its own failures
(it alone holds the exception objects) and answers with one JSON line.

The token travels in the environment (HF_TOKEN), never on the command line,
where any process on the node could read it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.failures import AdapterFailure, FailureReason

if TYPE_CHECKING:
    from huggingface_hub.errors import HfHubHTTPError

TOKEN_ENV = "HF_TOKEN"


def download_in_child(
    repo_id: str, revision: str | None, patterns: list[str], token: str | None, timeout: float
) -> Path:
    """The snapshot folder in the hub cache (named after the resolved commit sha)."""
    argv = [sys.executable, "-m", "sidecar.hub", "--repo", repo_id]
    if revision is not None:
        argv += ["--revision", revision]
    for pattern in patterns:
        argv += ["--pattern", pattern]
    env = dict(os.environ)
    if token:
        env[TOKEN_ENV] = token
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AdapterFailure(
            FailureReason.TRANSIENT,
            f"the download did not finish within {timeout:.0f}s (--download-timeout); will retry",
        ) from exc
    answer = _last_json_line(done.stdout)
    if answer is not None and "snapshot" in answer:
        return Path(answer["snapshot"])
    if answer is not None and "reason" in answer:
        raise AdapterFailure(FailureReason(answer["reason"]), str(answer["message"]))
    tail = _redact((done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"], token)
    raise AdapterFailure(
        FailureReason.TRANSIENT,
        f"the download process failed (exit {done.returncode}: {tail}); will retry",
    )


def _last_json_line(text: str) -> dict[str, str] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _redact(lines: list[str], token: str | None) -> str:
    text = " ".join(lines)
    for secret in (token, os.environ.get(TOKEN_ENV)):
        if secret:
            text = text.replace(secret, "***")
    return text


def download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """In the child: run the hub client; raise AdapterFailure with the operator's fix."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=os.environ.get(TOKEN_ENV)
        )
    # The hub client raises its own errors and, depending on its version, those of its
    # HTTP library; anything it raises means this fetch failed, and how is sorted below.
    except Exception as exc:
        reason, problem = _explain_hub_error(exc)
        raise AdapterFailure(reason, _redact([problem], None)) from exc
    return Path(folder)


def _explain_hub_error(exc: BaseException) -> tuple[FailureReason, str]:
    """Sort a hub failure by what the operator must do about it.

    `snapshot_download` falls back to its cache on most errors and, when that fails too,
    raises a `LocalEntryNotFoundError` whose cause is the original error; hence the walk.
    """
    error = exc
    while True:
        explained = _explain_one(error)
        if explained is not None:
            return explained
        if error.__cause__ is None:
            break
        error = error.__cause__
    return (
        FailureReason.TRANSIENT,
        f"the hub could not be reached and the local hub cache does not have it "
        f"({type(error).__name__}: {_first_line(error)}); will retry",
    )


def _explain_one(error: BaseException) -> tuple[FailureReason, str] | None:
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return FailureReason.CONFIGURATION, (
            "the repository is gated; request access on the hub with an account and give the "
            "sidecar that account's token in HF_TOKEN"
        )
    if isinstance(error, RepositoryNotFoundError):
        return FailureReason.BAD_ARTIFACT, (
            "no such repository on the hub; fix the source, or if the repository is private, "
            "give the sidecar a token with access in HF_TOKEN"
        )
    if isinstance(error, RevisionNotFoundError):
        return FailureReason.BAD_ARTIFACT, (
            "the revision does not exist in the repository; fix the revision"
        )
    if isinstance(error, DisabledRepoError):
        return FailureReason.BAD_ARTIFACT, (
            "the repository has been disabled on the hub; choose another source"
        )
    if isinstance(error, HfHubHTTPError):
        return _explain_status(error.response.status_code, error)
    if isinstance(error, OfflineModeIsEnabled):
        return FailureReason.TRANSIENT, (
            "not in the local hub cache (HF_HUB_CACHE), and HF_HUB_OFFLINE forbids downloading "
            "it; will retry; put it in the cache or unset HF_HUB_OFFLINE"
        )
    return None


def _explain_status(status: int, error: HfHubHTTPError) -> tuple[FailureReason, str]:
    if status in (401, 403):
        return FailureReason.CONFIGURATION, (
            f"the hub refused access (HTTP {status}); set HF_TOKEN to a valid token that can "
            "read this repository"
        )
    if status in (400, 404, 410):
        return FailureReason.BAD_ARTIFACT, (
            f"the hub answered HTTP {status} ({_first_line(error)}); fix the source"
        )
    return FailureReason.TRANSIENT, f"the hub answered HTTP {status}; will retry"


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.hub")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--pattern", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        folder = download(args.repo, args.revision, args.pattern)
    except AdapterFailure as failure:
        print(json.dumps({"reason": failure.reason.value, "message": failure.message}))
        return 0
    print(json.dumps({"snapshot": str(folder)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
