"""The `source` of an adapter entry in the ConfigMap: where its weights come from.

Pure parsing, no I/O: whether the repository or directory exists is the
fetcher's business. A source either parses into a canonical value or raises a
`SourceError` that names the bad value and lists the accepted forms, so the
operator can fix the ConfigMap entry from the message alone.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote

ACCEPTED_FORMS = (
    "a Hugging Face repo id 'org/repo', 'hf://org/repo[@revision][/subfolder]', "
    "an absolute local directory '/path/to/adapter' or 'file:///path/to/adapter'"
)

# Hugging Face's own rule for each half of a repo id.
_REPO_PART = re.compile(r"(?![-.])[A-Za-z0-9._-]{1,96}(?<![-.])")
# Git allows more in a ref name; this keeps revisions unambiguous inside an hf:// URL and a key.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
# No glob characters: a subfolder becomes part of the hub's allow_patterns.
_SUBFOLDER_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class HuggingFaceSource:
    repo_id: str
    revision: str | None = None  # None: the repository's default branch
    subfolder: str | None = None

    def key(self) -> str:
        text = f"hf://{self.repo_id}"
        if self.revision is not None:
            # A revision such as refs/pr/1 holds slashes, which would read as a subfolder.
            text += "@" + quote(self.revision, safe="")
        if self.subfolder is not None:
            text += "/" + self.subfolder
        return text


@dataclass(frozen=True)
class LocalSource:
    path: str  # absolute and normalised

    def key(self) -> str:
        return PurePosixPath(self.path).as_uri()


Source = HuggingFaceSource | LocalSource


def parse_source(text: str, revision: str | None = None) -> Source:
    """Parse an entry's `source`; `revision` is the entry's own optional `revision` key."""
    if not text:
        raise _error(text, "the source is empty")
    scheme = _URL_SCHEME.match(text)
    source: Source
    if scheme is not None:
        source = _parse_url(text, scheme.group(1).lower(), text[scheme.end() :])
    elif text.startswith("/"):
        source = _local(text, text)
    else:
        source = HuggingFaceSource(_repo_id(text, text))
    return source if revision is None else _with_revision(text, source, revision)


def _error(text: str, problem: str) -> SourceError:
    return SourceError(f"source {text!r}: {problem}; accepted forms: {ACCEPTED_FORMS}")


def _parse_url(text: str, scheme: str, rest: str) -> Source:
    if scheme == "hf":
        return _parse_hf_url(text, rest)
    if scheme == "file":
        return _parse_file_url(text, rest)
    raise _error(text, f"{scheme}:// sources are not supported yet")


def _parse_hf_url(text: str, rest: str) -> HuggingFaceSource:
    parts = rest.rstrip("/").split("/")
    if len(parts) < 2:
        raise _error(text, "an hf:// source needs a repo id: hf://org/repo")
    name, at, revision = parts[1].partition("@")
    repo_id = _repo_id(text, f"{parts[0]}/{name}")
    if at:
        revision = unquote(revision)
        _check_revision(text, revision)
    subfolder = _subfolder(text, parts[2:])
    return HuggingFaceSource(repo_id, revision if at else None, subfolder)


def _parse_file_url(text: str, rest: str) -> LocalSource:
    # RFC 8089 lets a file URL name the local host explicitly.
    path = rest.removeprefix("localhost")
    if not path.startswith("/"):
        raise _error(text, "a file:// URL needs an absolute path and no host: file:///path")
    return _local(text, unquote(path))


def _local(text: str, path: str) -> LocalSource:
    if "\0" in path:
        raise _error(text, "the path contains a NUL character")
    # normpath keeps a leading '//' (POSIX leaves its meaning open); nothing here wants it.
    return LocalSource("/" + posixpath.normpath(path).lstrip("/"))


def _repo_id(text: str, candidate: str) -> str:
    parts = candidate.split("/")
    if parts[0] in (".", ".."):
        raise _error(text, "relative paths are not accepted, use an absolute path")
    if len(parts) == 1:
        raise _error(
            text, "not an absolute path, and a Hugging Face repo id has the form 'org/repo'"
        )
    if len(parts) > 2:
        raise _error(
            text,
            "a repo id has exactly two parts 'org/repo'; for a folder inside a repository "
            "use hf://org/repo/folder, for a local directory use an absolute path",
        )
    for part in parts:
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part:
            raise _error(
                text,
                f"{part!r} is not valid in a Hugging Face repo id: use letters, digits, "
                "'-', '_' and '.', not at the start or end, with no '--' or '..'",
            )
    return candidate


def _check_revision(text: str, revision: str) -> None:
    if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision:
        raise _error(
            text,
            f"revision {revision!r} is not a valid branch, tag or commit: use letters, digits "
            "and '.', '_', '-', '+', '/', starting with a letter or digit, with no '..' or '//'",
        )
    if revision.endswith(("/", ".")):
        raise _error(text, f"revision {revision!r} must not end with '/' or '.'")


def _subfolder(text: str, segments: list[str]) -> str | None:
    for segment in segments:
        if segment in (".", ".."):
            raise _error(text, f"{segment!r} is not allowed in a subfolder")
        if not _SUBFOLDER_SEGMENT.fullmatch(segment):
            raise _error(
                text,
                f"subfolder part {segment!r} is not accepted: use letters, digits, "
                "'-', '_' and '.', with no empty parts",
            )
    return "/".join(segments) or None


def _with_revision(text: str, source: Source, revision: str) -> HuggingFaceSource:
    if isinstance(source, LocalSource):
        raise _error(
            text, f"revision {revision!r} is given, but only Hugging Face sources have one"
        )
    _check_revision(text, revision)
    if source.revision not in (None, revision):
        raise _error(
            text,
            f"the entry's revision {revision!r} conflicts with @{source.revision} in the source; "
            "give the revision once",
        )
    return dataclasses.replace(source, revision=revision)
