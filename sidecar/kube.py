"""The sidecar's Kubernetes API side: a fast path for ConfigMap edits, and a Pod annotation.

The kubelet copies a ConfigMap edit into the mounted volume only on its next sync of the
pod, a minute or more later; watching the ConfigMap through the API sees the edit within
milliseconds. Patches run in asyncio's default executor (the client is synchronous).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from kubernetes.client import ApiClient, CoreV1Api

from loractl.kube import MERGE_PATCH, REQUEST_TIMEOUT, STOP_WAIT, Informer, describe

log = structlog.get_logger("sidecar")
_NOTHING = object()


class ConfigMapWatcher:
    """Watches one ConfigMap through the API and calls on_data(text) on the loop with the
    content of one key, well under a second after a change.

    Delivers the current content first (None when the ConfigMap or the key is absent),
    then every change. Expired watches relist; failures reconnect with capped backoff.
    Identical content is never delivered twice in a row. Needs RBAC `list` and `watch` on
    the ConfigMap (resourceNames may name it: requests carry a metadata.name selector).
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        key: str,
        on_data: Callable[[str | None], None],
        loop: asyncio.AbstractEventLoop,
        api_client: ApiClient,
    ) -> None:
        self._name = name
        self._key = key
        self._on_data = on_data
        self._loop = loop
        self._stopping = threading.Event()
        self._delivered: object = _NOTHING
        self._informer: Informer[str] = Informer(
            f"configmap {namespace}/{name}",
            CoreV1Api(api_client).list_namespaced_config_map,
            (namespace,),
            {"field_selector": f"metadata.name={name}"},
            self._content,
            self._on_state,
            self._stopping,
        )

    def start(self) -> None:
        self._informer.start()

    def stop(self) -> None:
        """Returns within STOP_WAIT; nothing is delivered after."""
        self._stopping.set()
        self._informer.join(time.monotonic() + STOP_WAIT)

    def _content(self, obj: dict[str, Any]) -> str | None:
        # Filtered here too: not every server honours field selectors.
        if (obj.get("metadata") or {}).get("name") != self._name:
            return None
        value = (obj.get("data") or {}).get(self._key)
        return value if isinstance(value, str) else None

    def _on_state(self, configmaps: dict[str, str] | None) -> None:
        text = (configmaps or {}).get(self._name)
        if text == self._delivered:
            return
        self._delivered = text
        try:
            self._loop.call_soon_threadsafe(self._hand_over, text)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to
            self._stopping.set()

    def _hand_over(self, text: str | None) -> None:
        if not self._stopping.is_set():
            self._on_data(text)


class PodAnnotator:
    """Publishes a compact adapter summary as an annotation on the sidecar's own Pod."""

    ANNOTATION = "loractl.io/adapters"

    def __init__(self, namespace: str, pod_name: str, api_client: ApiClient) -> None:
        self._namespace = namespace
        self._pod_name = pod_name
        self._core = CoreV1Api(api_client)
        self._published: str | None = None
        self._lock = asyncio.Lock()

    async def publish(self, summary: str) -> None:
        """Patches the annotation when it changed; errors are logged, never raised."""
        # One patch at a time: patches land in call order and the comparison stays true.
        async with self._lock:
            if summary == self._published:
                return
            try:
                await asyncio.to_thread(self._patch, summary)
            except Exception as error:  # the annotation is informational, the sidecar goes on
                log.warning("pod_annotation_failed", namespace=self._namespace,
                            pod=self._pod_name, error=describe(error))  # fmt: skip
                return
            self._published = summary

    def _patch(self, summary: str) -> None:
        self._core.patch_namespaced_pod(
            self._pod_name,
            self._namespace,
            {"metadata": {"annotations": {self.ANNOTATION: summary}}},
            _content_type=MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT,
        )
