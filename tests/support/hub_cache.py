"""A Hugging Face hub cache laid out on disk by hand, so hub code runs with no network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

Files = dict[str, bytes]


def cache_snapshot(
    cache: Path, repo_id: str, sha: str, files: Files, refs: tuple[str, ...]
) -> Path:
    """Lay a snapshot out the way the hub client does: symlinks from snapshots/ into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot
