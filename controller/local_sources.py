"""Local mode's sources: endpoints, models and leadership read from the local directory.

The same roles InferencePoolEndpoints, ClusterModels and LeaderElector play against a
cluster, over the `LocalBackend`'s files. Both sources follow the backend's change
notifications, so an edit to the pool's endpoint annotation or to an InferenceModel (a
rollout's weight step included) reaches the picker as soon as the file is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import structlog

from controller.backend.local import LocalBackend
from controller.endpoints import EndpointsCallback
from controller.inventory import Endpoint
from controller.models import ModelTable

log = structlog.get_logger("controller")

LEADER_LOCK_FILE = ".loractl.leader"


class LocalPoolEndpoints:
    """The pool's `loractl.io/endpoints` annotation; delivered whenever it changes."""

    def __init__(self, backend: LocalBackend, pool: str, on_change: EndpointsCallback) -> None:
        self._backend = backend
        self._pool = pool
        self._on_change = on_change
        self._delivered: list[Endpoint] | None = None
        self._missing_reported = False
        backend.on_change(self._update)

    def start(self) -> None:
        """Nothing to start: the backend's notifications drive this source."""

    def stop(self) -> None:
        """Nothing runs of its own."""

    def _update(self) -> None:
        endpoints = self._backend.pool_endpoints(self._pool)
        if endpoints is None:
            if not self._missing_reported:
                self._missing_reported = True
                log.error("local_pool_missing", pool=self._pool,
                          directory=str(self._backend.directory),
                          fix="add an InferencePool of that name with a loractl.io/endpoints "
                          "annotation")  # fmt: skip
            endpoints = []  # a deleted pool serves nothing, as in a cluster
        else:
            self._missing_reported = False
        if endpoints != self._delivered:
            self._delivered = endpoints
            log.info("endpoints_changed", pool=self._pool, endpoints=[e.address for e in endpoints])
            self._on_change(list(endpoints))


class LocalModels:
    """The directory's InferenceModels and InferenceModelRewrites for one pool."""

    def __init__(self, backend: LocalBackend, pool: str) -> None:
        self._backend = backend
        self._pool = pool
        self.table = ModelTable()
        self._synced = False
        backend.on_change(self._update)

    def current(self) -> ModelTable:
        return self.table

    def synced(self) -> bool:
        return self._synced

    def start(self) -> None:
        """Nothing to start: the backend's notifications drive this source."""

    def stop(self) -> None:
        """Nothing runs of its own."""

    def _update(self) -> None:
        table = ModelTable.from_objects(self._backend.model_objects(), pool=self._pool)
        for error in table.errors:
            log.error("model_object_rejected", error=error)
        if table.routes() != self.table.routes():
            log.info("models_loaded", models=sorted(r.model for r in table.routes()))
        self.table = table
        self._synced = True


class FileLockElector:
    """Leadership over a local directory: an exclusive `flock` on a file in it.

    The kernel releases the lock when its holder exits, however it exits, so a controller
    restarted after a crash takes over at once; a second controller on the same directory
    waits, retrying every `retry` seconds, as a non-leader replica does with a Lease.
    """

    def __init__(
        self,
        directory: Path,
        on_start_leading: Callable[[], None],
        *,
        retry: float = 1.0,
    ) -> None:
        self.path = directory / LEADER_LOCK_FILE
        self._on_start_leading = on_start_leading
        self._retry = retry
        self._file: IO[str] | None = None

    @property
    def is_leader(self) -> bool:
        return self._file is not None

    async def run(self) -> None:
        # Polled: a blocking flock in a thread could not be cancelled at shutdown.
        while True:
            if self._try_lock():
                self._on_start_leading()
                return
            await asyncio.sleep(self._retry)

    def _try_lock(self) -> bool:
        file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        # Who holds it, for a person wondering why a second controller does nothing.
        file.truncate(0)
        file.write(f"pid {os.getpid()}\n")
        file.flush()
        self._file = file
        return True

    async def stop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # releases the lock
            self._file = None
