"""Where the picker learns model → target weights: a file of InferenceModel /
InferenceModelRewrite documents (local mode, tests) or the cluster's objects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
import yaml

from controller.models import ModelTable
from sidecar.watch import ConfigFileWatcher

log = structlog.get_logger("picker")


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
        table, errors = ModelTable.from_objects(documents, pool=self.pool)
        for error in errors:
            log.error("model_object_rejected", error=error)
        self.table = table
        self.error = "; ".join(errors) or None
        log.info("models_loaded", models=sorted(r.model for r in table.routes()))
