"""Put an adapter on local disk, verified, before vLLM is asked to load it.

Hub adapters go through the ordinary Hugging Face cache (`snapshot_download`,
run in a child process by `sidecar.hub`; it honours HF_TOKEN, HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE), then only
the adapter files are copied to `adapter_dir/<adapter id>/<commit sha>/`. The
copy is what vLLM gets: its `lora_path` must stay on disk while the adapter is
registered, and the hub cache may be pruned independently of that.

Going through the cache rather than `snapshot_download(local_dir=...)` is what
makes offline mode work: offline, the hub client serves a snapshot only from
the cache (a branch resolved through `refs/<branch>`), never into an empty
`local_dir`. Offline it also returns the whole snapshot folder, whatever
`allow_patterns` says, so the copy picks the adapter files itself.

Calls for one adapter id must not overlap; the reconciler runs one operation
per adapter at a time.
"""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loractl.peft import CONFIG_FILE, PeftConfig, PeftConfigError, PeftProblem, read_peft_config
from sidecar import hub
from sidecar.failures import AdapterFailure, FailureReason
from sidecar.sources import HuggingFaceSource, LocalSource, Source

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = (CONFIG_FILE, *WEIGHT_FILES)
STAGING_PREFIX = ".partial-"

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_PEFT_FIXES = {
    PeftProblem.MISSING: (
        "point the source at a PEFT LoRA adapter: adapter_config.json with "
        "adapter_model.safetensors or adapter_model.bin"
    ),
    PeftProblem.UNREADABLE: "fix adapter_config.json: it must be JSON with an integer rank 'r'",
    PeftProblem.NOT_LORA: "use a LoRA adapter; vLLM serves no other PEFT type",
}
# Space may come back as other adapters are released; any other write error needs a fix.
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class FetchedAdapter:
    path: str  # what vLLM gets as lora_path
    revision: str | None  # resolved commit sha of a hub source; None for a local one
    owned: bool  # lives under adapter_dir, removed by release()
    config: PeftConfig


class AdapterFetcher:
    def __init__(
        self, adapter_dir: Path, token: str | None = None, download_timeout: float = 600.0
    ) -> None:
        self._adapter_dir = adapter_dir
        self._token = token
        self._download_timeout = download_timeout

    async def fetch(self, adapter_id: str, source: Source) -> FetchedAdapter:
        """Raises `AdapterFailure` for every way the adapter can be unavailable."""
        if isinstance(source, LocalSource):
            return await asyncio.to_thread(_fetch_local, adapter_id, source)
        try:
            root = self._adapter_root(adapter_id)
        except ValueError as exc:
            raise AdapterFailure(FailureReason.INVALID_SPEC, str(exc)) from exc
        return await asyncio.to_thread(self._fetch_hub, adapter_id, source, root)

    def release(self, adapter_id: str, keep: str | None = None) -> None:
        """Delete the adapter's copies, all of them or all but revision `keep`.

        Local sources are never copied, so their directories are out of reach here.
        """
        root = self._adapter_root(adapter_id)
        if keep is not None and not _is_plain_name(keep):
            raise ValueError(f"revision to keep {keep!r} is not a directory name")
        if not root.is_dir():
            return
        if keep is None:
            shutil.rmtree(root)
            return
        for entry in root.iterdir():
            if entry.name != keep:
                _remove(entry)

    def _adapter_root(self, adapter_id: str) -> Path:
        if not _is_plain_name(adapter_id):
            raise ValueError(
                f"adapter id {adapter_id!r} cannot name a directory of its own under the adapter "
                "directory: it must be non-empty, not '.' or '..', and contain no '/'"
            )
        return self._adapter_dir / adapter_id

    def _fetch_hub(self, adapter_id: str, source: HuggingFaceSource, root: Path) -> FetchedAdapter:
        # A pinned commit needs no hub call when its copy is already here; this also spares the
        # retries the hub client makes (about 20 s) before using its cache when the hub is down.
        if source.revision is not None and _COMMIT_SHA.fullmatch(source.revision):
            kept = _reuse(root / source.revision, source.subfolder)
            if kept is not None:
                return kept
        snapshot = self._download(adapter_id, source)
        kept = _reuse(root / snapshot.name, source.subfolder)
        if kept is not None:
            return kept
        origin = _inside(snapshot, source.subfolder)
        config = _verify(adapter_id, source, origin)
        destination = _inside(root / snapshot.name, source.subfolder)
        try:
            _install(origin, destination, root)
        except OSError as exc:
            raise _disk_failure(adapter_id, source, destination, exc) from exc
        return FetchedAdapter(str(destination), snapshot.name, owned=True, config=config)

    def _download(self, adapter_id: str, source: HuggingFaceSource) -> Path:
        """The snapshot folder in the hub cache; its name is the resolved commit sha."""
        try:
            return hub.download_in_child(
                source.repo_id,
                source.revision,
                [_inside_pattern(source.subfolder, name) for name in ADAPTER_FILES],
                self._token,
                self._download_timeout,
            )
        except AdapterFailure as failure:
            raise AdapterFailure(
                failure.reason, f"adapter {adapter_id!r} from {source.key()}: {failure.message}"
            ) from failure


def _fetch_local(adapter_id: str, source: LocalSource) -> FetchedAdapter:
    config = _verify(adapter_id, source, Path(source.path))
    return FetchedAdapter(source.path, revision=None, owned=False, config=config)


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _inside(directory: Path, subfolder: str | None) -> Path:
    return directory if subfolder is None else directory / subfolder


def _inside_pattern(subfolder: str | None, name: str) -> str:
    return name if subfolder is None else f"{subfolder}/{name}"


def _check_adapter(directory: Path) -> PeftConfig:
    """`read_peft_config`, plus the weights vLLM will look for next to the config."""
    config = read_peft_config(directory)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise PeftConfigError(PeftProblem.MISSING, f"No {' or '.join(WEIGHT_FILES)} in {directory}")
    return config


def _verify(adapter_id: str, source: Source, directory: Path) -> PeftConfig:
    try:
        return _check_adapter(directory)
    except PeftConfigError as exc:
        raise AdapterFailure(
            FailureReason.BAD_ARTIFACT,
            f"adapter {adapter_id!r} from {source.key()}: {exc}; {_PEFT_FIXES[exc.problem]}",
        ) from exc


def _reuse(target: Path, subfolder: str | None) -> FetchedAdapter | None:
    path = _inside(target, subfolder)
    try:
        config = _check_adapter(path)
    except PeftConfigError:
        return None
    return FetchedAdapter(str(path), target.name, owned=True, config=config)


def _install(origin: Path, destination: Path, root: Path) -> None:
    """Copy the adapter files so that `destination` appears complete or not at all."""
    root.mkdir(parents=True, exist_ok=True)
    # Staged inside the adapter's own directory: same filesystem, so the rename is atomic, and
    # release() sweeps up what a crash leaves behind.
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        for name in ADAPTER_FILES:
            if (origin / name).is_file():
                shutil.copyfile(origin / name, staging / name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Whatever is there failed verification, and a rename cannot replace a non-empty dir.
        if destination.exists():
            _remove(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _disk_failure(
    adapter_id: str, source: Source, destination: Path, exc: OSError
) -> AdapterFailure:
    if exc.errno in _OUT_OF_SPACE_ERRNOS:
        reason, fix = FailureReason.TRANSIENT, "will retry; free space in the adapter directory"
    else:
        reason, fix = FailureReason.CONFIGURATION, "make the adapter directory a writable directory"
    return AdapterFailure(
        reason,
        f"adapter {adapter_id!r} from {source.key()}: cannot write {destination}: "
        f"{exc.strerror or exc}; {fix}",
    )
