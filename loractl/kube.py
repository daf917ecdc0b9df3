"""Kubernetes API plumbing shared by every loractl part: credentials, and one informer.

The official client is synchronous, so an `Informer` runs its list+watch loop in a
dedicated thread for its whole life and hands each new state over through a callback;
users bring it back onto their event loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any, Generic, TypeVar, cast

import structlog
from kubernetes import config, watch
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

log = structlog.get_logger("kube")

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
# A resource that is not served (no CRD) or not allowed (RBAC) is asked again this often,
# so a CRD installed later is found without a restart.
UNAVAILABLE_RETRY = 10.0


class KubeConfigError(RuntimeError):
    """No usable credentials for the Kubernetes API."""


def kube_api_client(kubeconfig: str | None = None) -> ApiClient:
    """The kubeconfig at `kubeconfig` when given (a command line's --kubeconfig wins, as
    kubectl's does); else in-cluster config if KUBERNETES_SERVICE_HOST is set; else the
    kubeconfig at env KUBECONFIG, or ~/.kube/config."""
    configuration = Configuration()
    # Read at call time: the client's own default path is frozen when it is imported.
    path = kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config")
    in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            config.load_incluster_config(configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(path, client_configuration=configuration)  # type: ignore[no-untyped-call]
    # Broad on purpose: a malformed kubeconfig surfaces as YAML, type or key errors.
    except Exception as error:
        if in_cluster:
            tried = "the in-cluster service account (KUBERNETES_SERVICE_HOST is set)"
        elif kubeconfig:
            tried = f"kubeconfig {path}"
        else:
            tried = f"kubeconfig {path} (KUBERNETES_SERVICE_HOST is not set: not in a cluster)"
        raise KubeConfigError(f"no Kubernetes API credentials: tried {tried}: {error}") from error
    return ApiClient(configuration)


def describe(error: Exception) -> str:
    """An error for the log: status and reason only, since API errors carry the response
    headers and body, which are no business of a log line."""
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


class FailureStreak:
    """Capped exponential backoff that logs once when failures start and once when they end."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._count = 0

    def record(self, error: Exception) -> float:
        if self._count == 0:
            log.warning("kube_watch_failing", resource=self._what, error=describe(error),
                        retry="with backoff")  # fmt: skip
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**self._count)
        self._count += 1
        return delay

    def reset(self) -> None:
        if self._count:
            log.info("kube_watch_recovered", resource=self._what, failures=self._count)
            self._count = 0


T = TypeVar("T")


class Informer(Generic[T]):
    """Lists, then watches from the list's resourceVersion, in a thread of its own, keeping
    name → convert(object) for the objects convert keeps (not None). After each change it
    hands a copy to on_state; None there means the API is not served or not allowed (only
    with unavailable_is_absent; otherwise that is a failure like any other). An expired
    watch (410) relists; failures back off, capped, and relist."""

    def __init__(
        self,
        what: str,
        list_function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        convert: Callable[[dict[str, Any]], T | None],
        on_state: Callable[[dict[str, T] | None], None],
        stopping: threading.Event,
        unavailable_is_absent: bool = False,
    ) -> None:
        self._what = what
        self._list_function = list_function
        self._args = args
        self._kwargs = kwargs
        self._convert = convert
        self._on_state = on_state
        self._stopping = stopping
        self._unavailable_is_absent = unavailable_is_absent
        self._store: dict[str, T] = {}
        self._unavailable = False
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, deadline: float) -> None:
        """After `stopping` is set. A thread still connecting may outlive the deadline (it
        is a daemon) but delivers nothing more."""
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop() shuts the socket down under the blocked read. Repeated: a watch
            # that is still connecting has no socket yet.
            current = self._watch
            if current is not None:
                current.stop()  # type: ignore[no-untyped-call]
            self._thread.join(0.05)

    def _run(self) -> None:
        failures = FailureStreak(self._what)
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch_from(resource_version, failures)
            except Exception as error:  # the thread must outlive any failure of the API
                if self._stopping.is_set():
                    return  # most likely stop() cutting the connection
                resource_version = None
                self._stopping.wait(self._after_failure(error, failures))

    def _after_failure(self, error: Exception, failures: FailureStreak) -> float:
        """Handles a failure; returns how long to wait before relisting."""
        status = error.status if isinstance(error, ApiException) else None
        if status == HTTPStatus.GONE:
            log.info("kube_watch_expired", resource=self._what, action="relist")
            return 0.0
        if self._unavailable_is_absent and status in (HTTPStatus.NOT_FOUND, HTTPStatus.FORBIDDEN):
            failures.reset()
            if not self._unavailable:  # once, not every UNAVAILABLE_RETRY
                self._unavailable = True
                # Not served is normal (only one of the pool's API groups may be installed);
                # not allowed is a Role to fix.
                say = log.info if status == HTTPStatus.NOT_FOUND else log.warning
                say(
                    "kube_resource_unavailable",
                    resource=self._what,
                    error=describe(error),
                    retry_seconds=UNAVAILABLE_RETRY,
                )
            self._on_state(None)
            return UNAVAILABLE_RETRY
        return failures.record(error)

    def _list(self) -> str:
        response = self._list_function(
            *self._args, **self._kwargs, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
        listing = json.loads(response.data)
        self._unavailable = False
        self._store = {}
        for obj in listing.get("items") or []:
            self._apply("ADDED", obj)
        self._on_state(dict(self._store))
        # An empty version starts the watch from the current state: still correct.
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, resource_version: str, failures: FailureStreak) -> str:
        self._watch = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
        for event in self._events(self._watch, resource_version):
            if isinstance(event, dict):  # the client yields None for blank lines
                failures.reset()
                resource_version = self._handle(event) or resource_version
            if self._stopping.is_set():
                break
        failures.reset()
        return resource_version

    def _handle(self, event: dict[str, Any]) -> str | None:
        """Applies one event; returns the resourceVersion it carries (bookmarks too)."""
        obj = event["raw_object"]
        if event["type"] in ("ADDED", "MODIFIED", "DELETED") and self._apply(event["type"], obj):
            self._on_state(dict(self._store))
        return cast(str | None, (obj.get("metadata") or {}).get("resourceVersion"))

    def _events(self, stream: watch.Watch, resource_version: str) -> Iterator[Any]:
        return cast(
            Iterator[Any],
            stream.stream(  # type: ignore[no-untyped-call]
                self._list_function,
                *self._args,
                **self._kwargs,
                resource_version=resource_version,
                # Bookmarks keep our version recent while nothing changes, so the next
                # watch resumes instead of expiring into a relist.
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=WATCH_REQUEST_TIMEOUT,
            ),
        )

    def _apply(self, kind: str, obj: dict[str, Any]) -> bool:
        """Applies one event to the store; True when the store changed."""
        name = str((obj.get("metadata") or {}).get("name"))
        record = None if kind == "DELETED" else self._convert(obj)
        if record is None:
            return self._store.pop(name, None) is not None
        changed = self._store.get(name) != record
        self._store[name] = record
        return changed
