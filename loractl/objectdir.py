"""A directory of Kubernetes object YAMLs, read as one namespace of a cluster would be.

Local mode keeps the objects a cluster would hold (AdapterRollouts, InferenceModels,
InferencePools, ConfigMaps) as files: any `*.yaml` or `*.yml` (hidden files excepted),
several documents to a file if you like. An object is identified by kind and
metadata.name; one whose metadata.namespace names another namespace is ignored; when the
same kind and name appear twice, the first file by name wins (and a warning says so).

`reload()` re-reads every file (they are small). A file that cannot be read or parsed is
logged once per problem and its last good objects are kept: a half-typed edit must not
make the world disappear. The controller's local backend writes through this index; the
sidecar reads its ConfigMap from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

log = structlog.get_logger("local")

Key = tuple[str, str]  # kind, name
# A document marker at the start of a line. YAML forbids such a line inside any scalar, so
# splitting on it finds the documents exactly, and each one's text can be kept as it was.
DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)


@dataclass(frozen=True)
class Located:
    """An object as indexed: its file, and its content with metadata.resourceVersion set to
    its computed version."""

    path: Path
    obj: dict[str, Any]
    version: str


class ObjectDirectory:
    """The objects of some kinds in one directory, indexed by (kind, name)."""

    def __init__(self, directory: Path, namespace: str, kinds: Collection[str]) -> None:
        self.directory = directory
        self.namespace = namespace
        self.kinds = frozenset(kinds)
        self.objects: dict[Key, Located] = {}
        self._files: dict[Path, list[dict[str, Any]]] = {}  # last good objects of each file
        self._reported: dict[Path, str] = {}  # the problem last logged for a file
        self._duplicates: set[Key] = set()

    def get(self, kind: str, name: str) -> Located | None:
        return self.objects.get((kind, name))

    def of_kind(self, kind: str) -> list[Located]:
        """Every object of that kind, by name."""
        return [located for (k, _), located in sorted(self.objects.items()) if k == kind]

    def reload(self) -> bool:
        """Re-reads every file and rebuilds the index; True when some object changed."""
        files: dict[Path, list[dict[str, Any]]] = {}
        for path in self.yaml_files():
            try:
                text = path.read_text(encoding="utf-8")
                files[path] = [obj for _, obj in split_documents(text) if obj is not None]
            except FileNotFoundError:
                continue  # deleted since it was listed
            except (OSError, ValueError, yaml.YAMLError) as error:
                self._report(path, error)
                if path in self._files:
                    files[path] = self._files[path]
                continue
            if self._reported.pop(path, None) is not None:
                log.info("local_file_fixed", file=path.name)
        objects = self._index(files)
        changed = objects != self.objects
        self._files, self.objects = files, objects
        return changed

    def yaml_files(self) -> list[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as error:
            log.warning("local_directory_unreadable", directory=str(self.directory),
                        error=f"{type(error).__name__}: {error}")  # fmt: skip
            return list(self._files)  # keep what we had
        return [
            path
            for path in entries
            if path.suffix in (".yaml", ".yml") and not path.name.startswith(".")
        ]

    def key(self, obj: Mapping[str, Any]) -> Key | None:
        """kind and name when obj is of our kinds, in our namespace."""
        metadata = obj.get("metadata")
        kind = obj.get("kind")
        if kind not in self.kinds or not isinstance(metadata, dict):
            return None
        name = metadata.get("name")
        namespace = metadata.get("namespace")
        if not isinstance(name, str) or namespace not in (None, "", self.namespace):
            return None
        return str(kind), name

    def _report(self, path: Path, error: Exception) -> None:
        problem = f"{type(error).__name__}: {error}"
        if self._reported.get(path) != problem:  # once per problem, not once per reload
            self._reported[path] = problem
            log.warning("local_file_invalid", file=path.name, error=problem,
                        kept_objects=len(self._files.get(path, [])))  # fmt: skip

    def _index(self, files: Mapping[Path, list[dict[str, Any]]]) -> dict[Key, Located]:
        objects: dict[Key, Located] = {}
        for path, found in sorted(files.items()):
            for obj in found:
                key = self.key(obj)
                if key is None:
                    continue
                if key in objects:
                    if key not in self._duplicates:
                        self._duplicates.add(key)
                        log.warning("local_object_duplicate", kind=key[0], name=key[1],
                                    used=objects[key].path.name, ignored=path.name)  # fmt: skip
                    continue
                objects[key] = locate(path, obj)
        return objects


def locate(path: Path, obj: Mapping[str, Any]) -> Located:
    version = resource_version(obj)
    metadata = {**(obj.get("metadata") or {}), "resourceVersion": version}
    return Located(path, {**obj, "metadata": metadata}, version)


def split_documents(text: str) -> list[tuple[str, dict[str, Any] | None]]:
    """Each document's text, and its content when that is a mapping (else None). Raises
    yaml.YAMLError when any document does not parse."""
    starts = [0, *(m.start() for m in DOCUMENT_START.finditer(text) if m.start() > 0)]
    chunks = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    parsed = [(chunk, yaml.safe_load(chunk)) for chunk in chunks]
    return [(chunk, obj if isinstance(obj, dict) else None) for chunk, obj in parsed]


def resource_version(obj: Mapping[str, Any]) -> str:
    """The first 16 hex digits of a SHA-256 over the object's canonical JSON, leaving out
    metadata.resourceVersion: any change at all, a hand edit included, gives a new one."""
    content = copy.deepcopy(dict(obj))
    (content.get("metadata") or {}).pop("resourceVersion", None)
    # default=str: YAML reads unquoted timestamps as datetimes, which JSON has no form for.
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
