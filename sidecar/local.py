"""The adapter ConfigMap read from a local directory of object YAMLs (local mode).

The local counterpart of `sidecar.kube.ConfigMapWatcher`: the controller's local backend
edits the ConfigMap's YAML file where a cluster's API server would hold the object, and
this watcher hands the key's content to the reconciler whenever it changes, in the same
way. A file that does not parse keeps its last good content in force.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loractl.objectdir import ObjectDirectory
from sidecar.watch import ConfigFileWatcher

CONFIGMAP_KIND = "ConfigMap"
_NOTHING = object()


class LocalConfigMapWatcher:
    """Calls on_data(text) on the loop with the content of one key of one ConfigMap in
    `directory`: first the current content (None when the ConfigMap or key is absent),
    then every change; identical content is never delivered twice in a row."""

    def __init__(
        self,
        directory: Path,
        namespace: str,
        name: str,
        key: str,
        on_data: Callable[[str | None], None],
        loop: asyncio.AbstractEventLoop,
        debounce: float = 0.02,
    ) -> None:
        self._objects = ObjectDirectory(directory, namespace, {CONFIGMAP_KIND})
        self._name = name
        self._key = key
        self._on_data = on_data
        self._delivered: object = _NOTHING
        # Any file of the directory may hold the ConfigMap: watch them all. The path only
        # names the directory.
        self._watcher = ConfigFileWatcher(
            directory / ".configmap", self._read, loop, debounce, whole_directory=True
        )

    def start(self) -> None:
        self._watcher.start()
        self._read()

    def stop(self) -> None:
        self._watcher.stop()

    def _read(self) -> None:
        self._objects.reload()
        located = self._objects.get(CONFIGMAP_KIND, self._name)
        data = None if located is None else located.obj.get("data") or {}
        content = None if data is None else data.get(self._key)
        text = content if isinstance(content, str) else None
        if text != self._delivered:
            self._delivered = text
            self._on_data(text)
