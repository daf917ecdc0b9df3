"""The sidecar's Kubernetes API side: a fast path for ConfigMap edits, and a Pod annotation.

The kubelet copies a ConfigMap edit into the mounted volume only on its next sync of the
pod, a minute or more later; watching the ConfigMap through the API sees the edit within
milliseconds. The official client is synchronous, so its calls always run off the loop:
the watch in one dedicated thread for its whole life, single patches in asyncio's default
executor. Results come back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any, cast

import structlog
from kubernetes import config, watch
from kubernetes.client import ApiClient, Configuration, CoreV1Api
from kubernetes.client.exceptions import ApiException

log = structlog.get_logger("sidecar")

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = (CONNECT_TIMEOUT, 10.0)
# The server ends each watch after this long; the next one resumes from the last
# resourceVersion seen. Short, so that a stuck connection is replaced soon.
WATCH_SECONDS = 30
# The read timeout catches connections that died silently and servers that ignore
# timeoutSeconds: the stream would otherwise block forever.
WATCH_REQUEST_TIMEOUT = (CONNECT_TIMEOUT, WATCH_SECONDS + 5.0)
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 15.0
STOP_WAIT = 1.0
MERGE_PATCH = "application/merge-patch+json"


class KubeConfigError(RuntimeError):
    """No usable credentials for the Kubernetes API."""


def kube_api_client() -> ApiClient:
    """In-cluster config if KUBERNETES_SERVICE_HOST is set, else the kubeconfig."""
    configuration = Configuration()
    # Read at call time: the client's own default path is frozen when it is imported.
    path = os.environ.get("KUBECONFIG", "~/.kube/config")
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            config.load_incluster_config(configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(path, client_configuration=configuration)  # type: ignore[no-untyped-call]
    # Broad on purpose: a malformed kubeconfig surfaces as YAML, type or key errors.
    except Exception as error:
        tried = (
            "the in-cluster service account (KUBERNETES_SERVICE_HOST is set)"
            if in_cluster
            else f"kubeconfig {path} (KUBERNETES_SERVICE_HOST is not set: not in a cluster)"
        )
        raise KubeConfigError(f"no Kubernetes API credentials: tried {tried}: {error}") from error
    return ApiClient(configuration)


def _describe(error: Exception) -> str:
    """An error for the log: status and reason only, since API errors carry the response
    headers and body, which are no business of a log line."""
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


_NOTHING = object()


class ConfigMapWatcher:
    """Watches one ConfigMap through the API and calls on_data(text) on the loop with the
    content of one key, well under a second after a change.

    Lists first (delivering the current content, None when the ConfigMap or the key is
    absent), then watches from the list's resourceVersion. Expired watches relist;
    failures reconnect with capped backoff. Identical content is never delivered twice in
    a row. Needs RBAC `list` and `watch` on the ConfigMap (resourceNames may name it: the
    requests carry a metadata.name field selector).
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
        self._namespace = namespace
        self._name = name
        self._key = key
        self._on_data = on_data
        self._loop = loop
        self._core = CoreV1Api(api_client)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None
        self._delivered: object = _NOTHING

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"configmap-watch-{self._name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Returns within STOP_WAIT. A thread still connecting then may outlive it (it is a
        daemon) but delivers nothing more."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        deadline = time.monotonic() + STOP_WAIT
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop() shuts the socket down under the blocked read. Repeated: a watch
            # that is still connecting has no socket yet.
            current = self._watch
            if current is not None:
                current.stop()  # type: ignore[no-untyped-call]
            thread.join(0.05)

    def _run(self) -> None:
        failures = _FailureStreak(namespace=self._namespace, configmap=self._name)
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch_from(resource_version, failures)
            except Exception as error:  # the thread must outlive any failure of the API
                if self._stopping.is_set():
                    return  # most likely our own stop() cutting the connection
                resource_version = None
                if isinstance(error, ApiException) and error.status == HTTPStatus.GONE:
                    log.info("configmap watch expired; relisting", configmap=self._name)
                else:
                    self._stopping.wait(failures.record(error))

    def _list(self) -> str:
        listing = self._core.list_namespaced_config_map(
            self._namespace,
            field_selector=f"metadata.name={self._name}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        # Filtered again: not every server honours field selectors (emulators often do not).
        found = [
            item for item in listing.items if item.metadata and item.metadata.name == self._name
        ]
        self._deliver((found[0].data or {}).get(self._key) if found else None)
        # An empty version starts the watch with the current state: still correct.
        return (listing.metadata and listing.metadata.resource_version) or ""

    def _watch_from(self, resource_version: str, failures: _FailureStreak) -> str:
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        for event in self._events(self._watch, resource_version):
            failures.reset()
            obj = event["raw_object"]
            metadata = obj.get("metadata") or {}
            resource_version = metadata.get("resourceVersion") or resource_version
            if event["type"] != "BOOKMARK" and metadata.get("name") == self._name:
                deleted = event["type"] == "DELETED"
                self._deliver(None if deleted else (obj.get("data") or {}).get(self._key))
            if self._stopping.is_set():
                break
        failures.reset()
        return resource_version

    def _events(self, stream: watch.Watch, resource_version: str) -> Iterator[dict[str, Any]]:
        return cast(
            Iterator[dict[str, Any]],
            stream.stream(  # type: ignore[no-untyped-call]
                self._core.list_namespaced_config_map,
                self._namespace,
                field_selector=f"metadata.name={self._name}",
                resource_version=resource_version,
                # Bookmarks keep our version recent while the ConfigMap sits unchanged, so
                # the next watch resumes instead of expiring into a relist.
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=WATCH_REQUEST_TIMEOUT,
            ),
        )

    def _deliver(self, text: str | None) -> None:
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


class _FailureStreak:
    """Capped exponential backoff that logs once when failures start and once when they end."""

    def __init__(self, **context: str) -> None:
        self._context = context
        self._count = 0

    def record(self, error: Exception) -> float:
        if self._count == 0:
            log.warning("configmap watch failing; retrying with backoff",
                        error=_describe(error), **self._context)  # fmt: skip
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**self._count)
        self._count += 1
        return delay

    def reset(self) -> None:
        if self._count:
            log.info("configmap watch recovered", failures=self._count, **self._context)
            self._count = 0


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
                log.warning("pod annotation not published", namespace=self._namespace,
                            pod=self._pod_name, error=_describe(error))  # fmt: skip
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
