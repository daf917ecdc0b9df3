"""Where the picker learns model → target weights: a file of InferenceModel /
InferenceModelRewrite documents (local mode, tests) or the cluster's objects."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import yaml
from kubernetes.client import ApiClient, CustomObjectsApi

from controller.models import INFERENCE_MODEL, INFERENCE_MODEL_REWRITE, ModelTable
from loractl.kube import STOP_WAIT, Informer
from sidecar.watch import ConfigFileWatcher

log = structlog.get_logger("picker")
MODEL_GROUP = "inference.networking.x-k8s.io"
MODEL_VERSION = "v1alpha2"
PLURALS = {INFERENCE_MODEL: "inferencemodels", INFERENCE_MODEL_REWRITE: "inferencemodelrewrites"}


class FileModels:
    """Reloads when the file changes; a broken file keeps the last good table in force."""

    def __init__(
        self, path: Path, loop: asyncio.AbstractEventLoop, pool: str | None = None
    ) -> None:
        self.path = path
        self.pool = pool
        self.table = ModelTable()
        self.error: str | None = None
        self._watcher = ConfigFileWatcher(path, self.reload, loop)

    def current(self) -> ModelTable:
        return self.table

    def synced(self) -> bool:
        return True  # read synchronously at start

    def start(self) -> None:
        self.reload()
        self._watcher.start()

    def stop(self) -> None:
        self._watcher.stop()

    def reload(self) -> None:
        try:
            documents = [d for d in yaml.safe_load_all(self.path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            self.error = f"cannot read models from {self.path}: {exc}"
            log.error("models_rejected", error=self.error, kept=len(self.table.routes()))
            return
        if not all(isinstance(d, dict) for d in documents):
            self.error = f"{self.path}: every YAML document must be an InferenceModel or Rewrite"
            log.error("models_rejected", error=self.error, kept=len(self.table.routes()))
            return
        table = ModelTable.from_objects(documents, pool=self.pool)
        for error in table.errors:
            log.error("model_object_rejected", error=error)
        self.table = table
        self.error = "; ".join(table.errors) or None
        log.info("models_loaded", models=sorted(r.model for r in table.routes()))


class ClusterModels:
    """The namespace's InferenceModels and InferenceModelRewrites for one pool, watched.

    Either kind may be absent (its CRD not installed): it then contributes nothing. Objects
    that cannot be used are logged and skipped; the others keep serving.
    """

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        pool: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pool = pool
        self.table = ModelTable()
        self._loop = loop
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # two informer threads report here
        self._objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in PLURALS}
        self._heard_from: set[str] = set()
        self._synced = False
        custom = CustomObjectsApi(api_client)
        self._informers = [
            Informer(
                f"{plural} {namespace}",
                custom.list_namespaced_custom_object,
                (MODEL_GROUP, MODEL_VERSION, namespace, plural),
                {},
                _with_kind(kind),
                self._listener(kind),
                self._stopping,
                unavailable_is_absent=True,
            )
            for kind, plural in PLURALS.items()
        ]

    def current(self) -> ModelTable:
        return self.table

    def synced(self) -> bool:
        """Whether both kinds were listed once: until then an unknown model may be unknown
        only to us."""
        return self._synced

    def start(self) -> None:
        for informer in self._informers:
            informer.start()

    def stop(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + STOP_WAIT
        for informer in self._informers:
            informer.join(deadline)

    def _listener(self, kind: str) -> Callable[[dict[str, dict[str, Any]] | None], None]:
        def on_state(objects: dict[str, dict[str, Any]] | None) -> None:
            with self._lock:
                self._objects[kind] = objects or {}
                self._heard_from.add(kind)
                synced = self._heard_from == PLURALS.keys()
                everything = [o for by_name in self._objects.values() for o in by_name.values()]
            table = ModelTable.from_objects(everything, pool=self.pool)
            for error in table.errors:
                log.error("model_object_rejected", error=error)
            try:
                self._loop.call_soon_threadsafe(self._install, table, synced)
            except RuntimeError:  # the loop is closed: nobody is left to deliver to
                self._stopping.set()

        return on_state

    def _install(self, table: ModelTable, synced: bool) -> None:
        if table.routes() != self.table.routes():
            log.info("models_loaded", models=sorted(r.model for r in table.routes()))
        self.table = table
        self._synced = self._synced or synced


def _with_kind(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    # List items of custom resources may come without their kind; the route builder needs it.
    def convert(obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "kind": kind}

    return convert
