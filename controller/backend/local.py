"""The local backend: a directory of YAML files stands in for one namespace of a cluster.

The directory holds the same objects a cluster would: AdapterRollouts, InferenceModels and
InferenceModelRewrites, InferencePools (v1 or v1alpha2) and ConfigMaps, in any `*.yaml` or
`*.yml` files (hidden files excepted), several documents to a file if you like. An object
is identified by kind and metadata.name; one whose metadata.namespace names another
namespace is not ours and is ignored; when the same kind and name appear twice, the first
file by name wins (and a warning says so). Everything above the `Backend` interface is the
same code as with Kubernetes, and the document edits are the same pure functions of `base`.

File conventions:

- Endpoints: there are no Pods to select, so an InferencePool lists its serving addresses
  in the annotation `loractl.io/endpoints`: entries separated by commas or new lines, each
  "ip:port" optionally followed by "sidecar=PORT" (the sidecar on the same address), e.g.
  `loractl.io/endpoints: "127.0.0.1:8001 sidecar=9001, 127.0.0.1:8002 sidecar=9002"`. An
  annotation rather than a spec field, so the same file still validates against the
  pool's CRD. `pool_endpoints(name)` reads it; `pool(name)` only asks whether the pool
  exists.
- resourceVersion: the first 16 hex digits of a SHA-256 over the object's canonical JSON,
  leaving out metadata.resourceVersion. It is computed, never stored, so any change at
  all, a hand edit included, gives a new version and a conditional write made against the
  old one raises StaleError. A resourceVersion present in a file (one copied from a
  cluster) is neither trusted nor removed. metadata.generation is stored: 1 on create,
  bumped by `patch_rollout_spec` when the spec changes (hand edits do not bump it).
- events.log: `emit_event` appends one JSON object per line (time, type, reason, message,
  involvedObject) to `events.log` in the directory, and logs `local_event`. Every emission
  is a line: a file is read by people, who can count repeats with grep.

Reads come from an in-memory index rebuilt from every file whenever the directory changes
(inotify, through `sidecar.watch.ConfigFileWatcher`, debounced) and right after each of our
own writes. A file that cannot be read or parsed is logged once per content and its last
good objects are kept: a half-typed edit must not make a rollout's world disappear.
Callbacks are notified after a reload that changed some object, and once after start.

Writes go to the file holding the object, under an advisory lock (`.loractl.lock`, so a
CLI command and the controller do not interleave): the file is read fresh, the object
edited as the Kubernetes backend edits it, and only that document re-serialised; the
other documents keep their text, comments included (the edited one loses its comments:
PyYAML keeps none). The result goes to a temporary file in the same directory, is
fsynced and renamed over the original (`os.replace`, atomic), so a crash leaves the old
file or the new one, never a truncated one. Editors do not take the lock; just before the
rename the file is compared with what was read, and a difference counts as a conflict:
StaleError for the conditional writes, a fresh attempt (at most CONFLICT_ATTEMPTS) for
ensure_adapters and set_weights, as with the API server's 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
import yaml

from controller.backend.base import (
    ROLLOUT_API_VERSION,
    ROLLOUT_KIND,
    AlreadyExistsError,
    BackendError,
    EventType,
    NotFoundError,
    ObjectRef,
    StaleError,
    StoredRollout,
    TrafficSplit,
    edit_adapter_config,
    retry_on_conflict,
    routing_patch,
    traffic_split,
)
from controller.endpoints import parse_endpoint_list
from controller.inventory import Endpoint
from controller.models import INFERENCE_MODEL, INFERENCE_MODEL_REWRITE
from loractl.objectdir import (
    DOCUMENT_START,
    Located,
    ObjectDirectory,
    locate,
    resource_version,
    split_documents,
)
from sidecar.config import ConfigError
from sidecar.watch import ConfigFileWatcher

log = structlog.get_logger("controller")

ENDPOINTS_ANNOTATION = "loractl.io/endpoints"
EVENTS_FILE = "events.log"
LOCK_FILE = ".loractl.lock"
ROLLOUT_FILE_SUFFIX = ".adapterrollout.yaml"
POOL_KIND = "InferencePool"
CONFIGMAP_KIND = "ConfigMap"
KINDS = frozenset(
    {ROLLOUT_KIND, INFERENCE_MODEL, INFERENCE_MODEL_REWRITE, POOL_KIND, CONFIGMAP_KIND}
)
# A DNS-1123 subdomain, as Kubernetes requires of names; it also makes a safe file name.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

T = TypeVar("T")


class LocalBackend:
    """The `Backend` over a directory of YAML files; see the module docstring."""

    def __init__(
        self, directory: Path, namespace: str = "default", *, debounce: float = 0.05
    ) -> None:
        self.directory = directory
        self.namespace = namespace
        self._debounce = debounce
        self._callbacks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: ConfigFileWatcher | None = None
        self._stopped = False
        self._index = ObjectDirectory(directory, namespace, KINDS)
        self._write_lock = threading.Lock()  # our own writes, one at a time

    # ---- watching ----

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        # Watch first, load second: a change in between is then reloaded, not missed.
        self._watcher = ConfigFileWatcher(
            self.directory / EVENTS_FILE,
            self._reload,
            self._loop,
            self._debounce,
            whole_directory=True,
        )
        self._watcher.start()
        self._reload(notify=False)
        self._loop.call_soon(self._notify)
        log.info("backend_synced", directory=str(self.directory), rollouts=len(self.rollouts()))

    async def stop(self) -> None:
        self._stopped = True
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _notify(self) -> None:
        if self._stopped:
            return
        for callback in list(self._callbacks):
            callback()

    def _reload(self, notify: bool = True) -> None:
        """On the loop: re-reads every file and rebuilds the index."""
        if self._index.reload() and notify and self._loop is not None:
            self._loop.call_soon(self._notify)

    # ---- reads, from the cache ----

    def rollouts(self) -> list[StoredRollout]:
        return [
            self._stored(located)
            for (kind, _), located in sorted(self._index.objects.items())
            if kind == ROLLOUT_KIND
        ]

    def rollout(self, name: str) -> StoredRollout | None:
        located = self._index.objects.get((ROLLOUT_KIND, name))
        return None if located is None else self._stored(located)

    def inference_model(self, model_name: str, pool: str | None = None) -> TrafficSplit | None:
        objects = self._index.objects
        for wanted in (INFERENCE_MODEL, INFERENCE_MODEL_REWRITE):
            for (kind, _), located in sorted(objects.items()):
                if kind != wanted:
                    continue
                split = traffic_split(located.obj, model_name)
                if split is not None and pool in (None, split.pool):
                    return _in_namespace(split, self.namespace)
        return None

    def pool(self, name: str) -> bool:
        return (POOL_KIND, name) in self._index.objects

    def pool_endpoints(self, name: str) -> list[Endpoint] | None:
        """The pool's `loractl.io/endpoints` entries; None without the pool. Entries that
        cannot be read are logged and left out."""
        located = self._index.get(POOL_KIND, name)
        if located is None:
            return None
        endpoints, errors = annotated_endpoints(located.obj)
        for error in errors:
            log.warning("local_endpoint_invalid", pool=name, error=error)
        return endpoints

    def model_objects(self) -> list[dict[str, Any]]:
        """Every InferenceModel and InferenceModelRewrite, as the picker's model table reads
        them."""
        return [
            copy.deepcopy(located.obj)
            for kind in (INFERENCE_MODEL, INFERENCE_MODEL_REWRITE)
            for located in self._index.of_kind(kind)
        ]

    def configmap(self, name: str) -> dict[str, str] | None:
        located = self._index.objects.get((CONFIGMAP_KIND, name))
        if located is None:
            return None
        data = located.obj.get("data") or {}
        # The API server allows only strings here; so do we, rather than guess a rendering.
        return {str(key): value for key, value in data.items() if isinstance(value, str)}

    def _stored(self, located: Located) -> StoredRollout:
        obj = copy.deepcopy(located.obj)  # a caller that edits the dicts must not edit the cache
        metadata = obj["metadata"]
        ref = ObjectRef(ROLLOUT_API_VERSION, ROLLOUT_KIND, self.namespace, str(metadata["name"]))
        return StoredRollout(
            ref, obj.get("spec") or {}, obj.get("status") or {}, located.version,
            _generation(metadata),
        )  # fmt: skip

    # ---- writes ----

    async def ensure_adapters(
        self, configmap: str, key: str, listed: Mapping[str, str], removed: Collection[str]
    ) -> bool:
        what = f"ConfigMap {self.namespace}/{configmap}"

        def edit(obj: dict[str, Any], version: str) -> dict[str, Any] | None:
            text = (obj.get("data") or {}).get(key)
            if not isinstance(text, str):
                raise BackendError(f"{what} has no key {key!r} holding the adapter document")
            try:
                edited = edit_adapter_config(text, listed, removed)
            except ConfigError as error:
                raise BackendError(f"{what}, key {key}: {error}; fix it first") from error
            if edited is None:
                return None
            obj["data"][key] = edited
            return obj

        written = await self._compare_and_swap(what, CONFIGMAP_KIND, configmap, edit)
        if written:
            log.info("adapters_written", configmap=configmap, key=key,
                     listed=sorted(listed), removed=sorted(removed))  # fmt: skip
        return written

    async def set_weights(
        self,
        model_name: str,
        weights: Mapping[str, int],
        pool: str | None = None,
        sticky: str | None = None,
    ) -> bool:
        split = self.inference_model(model_name, pool)
        if split is None:
            for_pool = "" if pool is None else f" for pool {pool}"
            raise NotFoundError(
                f"no InferenceModel or InferenceModelRewrite in {self.directory} routes "
                f"model {model_name!r}{for_pool}"
            )
        kind, name = split.ref.kind, split.ref.name
        what = f"{kind} {self.namespace}/{name}"

        def edit(obj: dict[str, Any], version: str) -> dict[str, Any] | None:
            patch = routing_patch(obj, model_name, weights, sticky)
            return None if patch is None else _merge(obj, patch)  # as kube merges it

        written = await self._compare_and_swap(what, kind, name, edit)
        if written:
            log.info("weights_written", model=model_name, object=what, weights=dict(weights),
                     sticky_header=sticky)  # fmt: skip
        return written

    async def update_rollout_status(
        self, name: str, status: Mapping[str, Any], expected_resource_version: str
    ) -> str:
        what = f"{ROLLOUT_KIND} {self.namespace}/{name}"

        def edit(obj: dict[str, Any], version: str) -> dict[str, Any] | None:
            _expect(what, version, expected_resource_version, "status not written")
            new_status = _without_nones(status)
            if new_status == (obj.get("status") or {}):
                return None
            obj["status"] = new_status
            return obj

        return await self._write(what, ROLLOUT_KIND, name, edit)

    async def patch_rollout_spec(
        self, name: str, patch: Mapping[str, Any], expected_resource_version: str | None = None
    ) -> str:
        what = f"{ROLLOUT_KIND} {self.namespace}/{name}"

        def edit(obj: dict[str, Any], version: str) -> dict[str, Any] | None:
            if expected_resource_version is not None:
                _expect(what, version, expected_resource_version, "spec not patched")
            spec = _merge(obj.get("spec") or {}, patch)
            if spec == (obj.get("spec") or {}):
                return None
            obj["spec"] = spec
            metadata = obj.setdefault("metadata", {})
            metadata["generation"] = _generation(metadata) + 1  # as the API server counts
            return obj

        return await self._write(what, ROLLOUT_KIND, name, edit)

    async def create_rollout(self, obj: Mapping[str, Any]) -> StoredRollout:
        body = copy.deepcopy(dict(obj))
        metadata = body.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            raise ValueError(f"an {ROLLOUT_KIND} needs metadata.name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{ROLLOUT_KIND} name {name!r} is not a DNS-1123 subdomain")
        body.update(apiVersion=ROLLOUT_API_VERSION, kind=ROLLOUT_KIND)
        metadata.update(namespace=self.namespace, generation=1)
        body.pop("status", None)  # as the API server does: status is the controller's
        metadata.pop("resourceVersion", None)
        what = f"{ROLLOUT_KIND} {self.namespace}/{name}"
        path = self.directory / f"{name}{ROLLOUT_FILE_SUFFIX}"

        def create() -> None:
            with self._locked():
                if self._find(ROLLOUT_KIND, name) is not None:
                    raise AlreadyExistsError(f"{what} already exists")
                _write_file(path, _dump(body), exclusive=True)

        await self._thread(what, create)
        self._reload()
        return self._stored(locate(path, body))

    async def emit_event(
        self, involved: ObjectRef, event_type: EventType, reason: str, message: str
    ) -> None:
        record = {
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "type": event_type,
            "reason": reason,
            "message": message,
            "involvedObject": {
                "apiVersion": involved.api_version,
                "kind": involved.kind,
                "namespace": involved.namespace or self.namespace,
                "name": involved.name,
            },
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"

        def append() -> None:
            # One write of one line to a file opened for appending: lines never interleave.
            with (self.directory / EVENTS_FILE).open("a", encoding="utf-8") as file:
                file.write(line)

        try:
            await asyncio.to_thread(append)
        except OSError as error:
            log.warning("event_not_recorded", reason=reason,
                        error=f"{EVENTS_FILE}: {type(error).__name__}: {error}")  # fmt: skip
            return
        log.info("local_event", type=event_type, reason=reason, message=message,
                 object=f"{involved.kind}/{involved.name}")  # fmt: skip

    # ---- write plumbing ----

    async def _compare_and_swap(
        self,
        what: str,
        kind: str,
        name: str,
        edit: Callable[[dict[str, Any], str], dict[str, Any] | None],
    ) -> bool:
        """Writes until no concurrent change refuses it; True when something was written."""

        async def attempt() -> bool:
            written, _ = await self._transaction(what, kind, name, edit)
            return written

        return await retry_on_conflict(what, attempt)

    async def _write(
        self,
        what: str,
        kind: str,
        name: str,
        edit: Callable[[dict[str, Any], str], dict[str, Any] | None],
    ) -> str:
        _, version = await self._transaction(what, kind, name, edit)
        return version

    async def _transaction(
        self,
        what: str,
        kind: str,
        name: str,
        edit: Callable[[dict[str, Any], str], dict[str, Any] | None],
    ) -> tuple[bool, str]:
        """Read fresh, edit, write atomically (in a worker thread: it fsyncs and may wait
        for the lock); then reload, so that our own write reads back at once."""

        def transact() -> tuple[bool, str]:
            with self._locked():
                found = self._find(kind, name)
                if found is None:
                    raise NotFoundError(f"{what} not found in {self.directory}")
                path, text, chunks, index = found
                obj = _parse_chunk(chunks[index])
                version = resource_version(obj)
                edited = edit(copy.deepcopy(obj), version)
                if edited is None:
                    return False, version
                chunks[index] = _replace_chunk(chunks[index], edited)
                _write_file(path, "".join(chunks), expected=text)
                return True, resource_version(edited)

        result = await self._thread(what, transact)
        if result[0]:
            self._reload()
        return result

    async def _thread(self, what: str, function: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(function)
        except OSError as error:
            raise BackendError(f"{what}: {type(error).__name__}: {error}") from error

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._write_lock, (self.directory / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield

    def _find(self, kind: str, name: str) -> tuple[Path, str, list[str], int] | None:
        """The object's file, read now: path, text, document chunks, the object's chunk.
        The cached place is tried first; the object may have moved, so then every file."""
        cached = self._index.objects.get((kind, name))
        candidates = self._index.yaml_files()
        if cached is not None:
            candidates = [cached.path, *(p for p in candidates if p != cached.path)]
        for path in candidates:
            try:
                text = path.read_text(encoding="utf-8")
                documents = split_documents(text)
            except FileNotFoundError:
                continue
            except (ValueError, yaml.YAMLError) as error:
                if cached is not None and path == cached.path:
                    raise BackendError(
                        f"{kind} {name}: {path.name} does not parse ({error}); fix it first"
                    ) from error
                continue
            for index, (_, obj) in enumerate(documents):
                if obj is not None and self._index.key(obj) == (kind, name):
                    return path, text, [chunk for chunk, _ in documents], index
        return None


def annotated_endpoints(pool: Mapping[str, Any]) -> tuple[list[Endpoint], list[str]]:
    """A pool object's `loractl.io/endpoints` entries, and a message per unreadable one."""
    annotations = (pool.get("metadata") or {}).get("annotations") or {}
    return parse_endpoint_list(str(annotations.get(ENDPOINTS_ANNOTATION) or ""))


# ---- files ----


def _parse_chunk(chunk: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(chunk)
    return obj


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the adapter document in a ConfigMap) as literal blocks, so the
    file stays readable with `cat`; the emitter falls back to quoting where a block cannot
    hold the string exactly."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(obj: Mapping[str, Any]) -> str:
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _replace_chunk(chunk: str, obj: Mapping[str, Any]) -> str:
    """The document's new text: its `---` marker and leading comments kept, the rest
    re-serialised."""
    marker, body = "", chunk
    if DOCUMENT_START.match(chunk):
        marker, _, body = chunk.partition("\n")
        marker = "---\n"  # whatever followed the marker on its line is in the new content
    lines = body.splitlines(keepends=True)
    head = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        head.append(line)
    return marker + "".join(head) + _dump(obj)


def _write_file(
    path: Path, text: str, expected: str | None = None, exclusive: bool = False
) -> None:
    """Writes text to a temporary file beside path, fsyncs it, and renames it over path;
    with `expected`, only while path still holds that text (else StaleError); `exclusive`:
    only when path does not exist (else AlreadyExistsError)."""
    target = path.resolve()  # a symlinked file stays a link; its target is replaced
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if exclusive:
            os.chmod(temporary, 0o644)  # mkstemp makes it 0600; others may read a rollout
            try:
                os.link(temporary, target)  # fails when it exists: no check-then-act race
            except FileExistsError:
                raise AlreadyExistsError(f"{target.name} already exists") from None
        else:
            os.chmod(temporary, target.stat().st_mode & 0o7777)  # mkstemp makes it 0600
            if target.read_text(encoding="utf-8") != expected:
                raise StaleError(f"{target.name} was changed by another writer meanwhile")
            os.replace(temporary, target)
        _fsync_directory(target.parent)  # the rename itself must survive a power loss
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- helpers ----


def _generation(metadata: Mapping[str, Any]) -> int:
    generation = metadata.get("generation")
    # A hand-written rollout has none; the API server would have given it 1.
    return generation if isinstance(generation, int) and generation > 0 else 1


def _expect(what: str, version: str, expected: str, consequence: str) -> None:
    if version != expected:
        raise StaleError(f"{what} is at version {version}, not {expected}: {consequence}")


def _without_nones(value: Mapping[str, Any]) -> dict[str, Any]:
    """None means absent, as in the merge patch the Kubernetes backend sends."""
    return {
        key: _without_nones(item) if isinstance(item, Mapping) else item
        for key, item in value.items()
        if item is not None
    }


def _merge(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) applied: None deletes, mappings merge, the rest replaces."""
    merged = copy.deepcopy(dict(target))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            before = merged.get(key)
            merged[key] = _merge(before if isinstance(before, Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _in_namespace(split: TrafficSplit, namespace: str) -> TrafficSplit:
    """A file need not name the namespace; the reference should, as the cluster's does."""
    if split.ref.namespace:
        return split
    ref = ObjectRef(split.ref.api_version, split.ref.kind, namespace, split.ref.name)
    return dataclasses.replace(split, ref=ref)
