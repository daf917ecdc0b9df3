"""ConfigMapWatcher, PodAnnotator and kube_api_client through the official client, over HTTP.

The API server is kmock's KubernetesEmulator (an in-memory API over real HTTP). Its
semantics are simplified: it keeps no resourceVersions, ignores field selectors and
timeoutSeconds, and every watch starts by replaying the current objects as ADDED. Objects
are changed through the official client (that is what publishes watch events); changing
`kmock.objects` directly is a change no watch sees, used here to prove that a relist
happened. Expired watches (410) are kmock reactions; a network drop is a small TCP proxy
that cuts connections, since kmock only closes streams gracefully.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.config.incluster_config import SERVICE_TOKEN_FILENAME
from structlog.testing import capture_logs

from loractl.kube import KubeConfigError, kube_api_client
from sidecar.kube import ConfigMapWatcher, PodAnnotator
from tests.support.kube import CuttableProxy, call, use_kubeconfig

NAMESPACE = "serving"
NAME = "adapters"
KEY = "configmap.yaml"
POD = "vllm-0"
WAIT = 2.0
QUIET = 0.3
CONFIGMAPS = "v1/configmaps"
EXPIRED = {
    "apiVersion": "v1",
    "kind": "Status",
    "status": "Failure",
    "reason": "Expired",
    "message": "too old resource version: 1 (42)",
    "code": 410,
}


@pytest.fixture
def api(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiClient]:
    kmock.resources[CONFIGMAPS] = ResourceInfo(namespaced=True, kind="ConfigMap")
    kmock.resources["v1/pods"] = ResourceInfo(namespaced=True, kind="Pod")
    client = use_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    yield client
    client.close()  # type: ignore[no-untyped-call]


async def create_configmap(api: ApiClient, data: dict[str, str], name: str = NAME) -> None:
    # The namespace in metadata is what a real API server fills in; kmock's watch filter needs it.
    body = {"metadata": {"name": name, "namespace": NAMESPACE}, "data": data}
    await call(CoreV1Api(api).create_namespaced_config_map, NAMESPACE, body)


async def patch_configmap(api: ApiClient, data: dict[str, str | None]) -> None:
    core = CoreV1Api(api)
    await call(core.patch_namespaced_config_map, NAME, NAMESPACE, {"data": data},
               _content_type="application/merge-patch+json")  # fmt: skip


def change_unseen(kmock: KubernetesEmulator, text: str) -> None:
    """Changes the stored ConfigMap without a watch event: only a fresh list can see it."""
    kmock.objects[CONFIGMAPS, NAMESPACE, NAME].patch({"data": {KEY: text}})


class Deliveries:
    """The on_data callback: records each delivered value; the test takes them in order."""

    def __init__(self) -> None:
        self.values: list[str | None] = []
        self._taken = 0
        self._delivered = asyncio.Event()

    def __call__(self, text: str | None) -> None:
        self.values.append(text)
        self._delivered.set()

    async def next(self) -> str | None:
        async with asyncio.timeout(WAIT):
            while len(self.values) == self._taken:
                self._delivered.clear()
                await self._delivered.wait()
        self._taken += 1
        return self.values[self._taken - 1]

    async def none_within(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return len(self.values) == self._taken


async def until(condition: Callable[[], bool]) -> None:
    """Polls: kmock records requests but has no way to announce them."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@contextmanager
def watching(api: ApiClient, deliveries: Deliveries) -> Iterator[ConfigMapWatcher]:
    loop = asyncio.get_running_loop()
    watcher = ConfigMapWatcher(NAMESPACE, NAME, KEY, deliveries, loop, api)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


@pytest.mark.asyncio
async def test_the_current_content_comes_first_and_updates_follow_quickly(
    api: ApiClient,
) -> None:
    await create_configmap(api, {KEY: "version: 1"})
    await create_configmap(api, {KEY: "not ours"}, name="other")  # kmock lists and streams it
    deliveries = Deliveries()
    with watching(api, deliveries):
        assert await deliveries.next() == "version: 1"
        patched = time.monotonic()
        await patch_configmap(api, {KEY: "version: 2"})
        assert await deliveries.next() == "version: 2"
        assert time.monotonic() - patched < 1.0  # a generous functional bound, not a benchmark
        assert await deliveries.none_within(QUIET)
    assert deliveries.values == ["version: 1", "version: 2"]


@pytest.mark.asyncio
async def test_a_missing_configmap_is_none_until_it_is_created(api: ApiClient) -> None:
    deliveries = Deliveries()
    with watching(api, deliveries):
        assert await deliveries.next() is None
        await create_configmap(api, {KEY: "version: 1"})
        assert await deliveries.next() == "version: 1"


@pytest.mark.asyncio
async def test_deleting_the_key_or_the_configmap_delivers_none(api: ApiClient) -> None:
    await create_configmap(api, {KEY: "version: 1", "other": "x"})
    deliveries = Deliveries()
    with watching(api, deliveries):
        assert await deliveries.next() == "version: 1"
        await patch_configmap(api, {KEY: None})
        assert await deliveries.next() is None
        await patch_configmap(api, {KEY: "version: 2"})
        assert await deliveries.next() == "version: 2"
        await call(CoreV1Api(api).delete_namespaced_config_map, NAME, NAMESPACE)
        assert await deliveries.next() is None


@pytest.mark.asyncio
async def test_identical_content_is_not_delivered_again(
    api: ApiClient, kmock: KubernetesEmulator
) -> None:
    await create_configmap(api, {KEY: "version: 1"})
    kmock["watch"][:1] << (b"",)  # the first watch ends at once: the next replays ADDED
    deliveries = Deliveries()
    with watching(api, deliveries):
        assert await deliveries.next() == "version: 1"
        await patch_configmap(api, {"unrelated": "changed"})
        assert await deliveries.none_within(QUIET)
    assert deliveries.values == ["version: 1"]
    assert len(kmock["watch"]) >= 2


def changed_meanwhile(
    kmock: KubernetesEmulator, reply: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """A reply that first changes the ConfigMap unseen, as if while the watch was away."""

    def reply_later() -> dict[str, Any]:
        change_unseen(kmock, "version: 2")
        return reply

    return reply_later


@pytest.mark.asyncio
@pytest.mark.parametrize("as_event", [True, False], ids=["as a watch event", "as an HTTP status"])
async def test_an_expired_watch_relists_and_delivers_what_changed_meanwhile(
    api: ApiClient, kmock: KubernetesEmulator, as_event: bool
) -> None:
    await create_configmap(api, {KEY: "version: 1"})
    if as_event:
        kmock["watch"][:1] << (changed_meanwhile(kmock, {"type": "ERROR", "object": EXPIRED}),)
    else:
        kmock["watch"][:1] << 410 << changed_meanwhile(kmock, EXPIRED)
    deliveries = Deliveries()
    with capture_logs() as logs, watching(api, deliveries):
        assert await deliveries.next() == "version: 1"
        assert await deliveries.next() == "version: 2"
        await patch_configmap(api, {KEY: "version: 3"})
        assert await deliveries.next() == "version: 3"  # and the new watch holds
    assert len(kmock["list"]) == 2
    assert [entry["event"] for entry in logs] == ["kube_watch_expired"]


@pytest.mark.asyncio
async def test_failing_watches_back_off_and_log_once_per_streak(
    api: ApiClient, kmock: KubernetesEmulator
) -> None:
    await create_configmap(api, {KEY: "version: 1"})
    unavailable = {**EXPIRED, "reason": "ServiceUnavailable", "code": 503}
    kmock["watch"][:3] << 503 << changed_meanwhile(kmock, unavailable)
    deliveries = Deliveries()
    with capture_logs() as logs, watching(api, deliveries):
        assert await deliveries.next() == "version: 1"
        assert await deliveries.next() == "version: 2"
        await until(lambda: len(kmock["watch"]) == 4)  # three failed, the fourth holds
        await patch_configmap(api, {KEY: "version: 3"})
        assert await deliveries.next() == "version: 3"
    assert [(entry["log_level"], entry["event"]) for entry in logs] == [
        ("warning", "kube_watch_failing"),
        ("info", "kube_watch_recovered"),
    ]
    assert logs[0]["error"] == "HTTP 503 Service Unavailable"
    assert logs[1]["failures"] == 3


@pytest_asyncio.fixture
async def proxy(kmock: KubernetesEmulator) -> AsyncIterator[tuple[CuttableProxy, str]]:
    cuttable = CuttableProxy(kmock.servers[0].port)
    server = await cuttable.serve()
    port = server.sockets[0].getsockname()[1]
    yield cuttable, f"http://127.0.0.1:{port}"
    cuttable.cut()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_a_dropped_connection_is_survived(
    api: ApiClient,
    kmock: KubernetesEmulator,
    proxy: tuple[CuttableProxy, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuttable, url = proxy
    await create_configmap(api, {KEY: "version: 1"})
    through_proxy = use_kubeconfig(url, tmp_path / "kubeconfig-proxy", monkeypatch)
    deliveries = Deliveries()
    with capture_logs() as logs, watching(through_proxy, deliveries):
        assert await deliveries.next() == "version: 1"
        cuttable.cut()
        change_unseen(kmock, "version: 2")
        await asyncio.sleep(0.5)  # reconnecting fails a few times meanwhile
        watches = len(kmock["watch"])
        cuttable.up = True
        assert await deliveries.next() == "version: 2"
        await until(lambda: len(kmock["watch"]) > watches)
        await patch_configmap(api, {KEY: "version: 3"})
        assert await deliveries.next() == "version: 3"
    through_proxy.close()  # type: ignore[no-untyped-call]
    events = [entry["event"] for entry in logs]
    assert events == ["kube_watch_failing", "kube_watch_recovered"]


@pytest.mark.asyncio
async def test_stop_returns_promptly_and_nothing_is_delivered_after(api: ApiClient) -> None:
    await create_configmap(api, {KEY: "version: 1"})
    deliveries = Deliveries()
    with watching(api, deliveries) as watcher:
        assert await deliveries.next() == "version: 1"
        await asyncio.sleep(0.1)  # the watch is connected and idle
        began = time.monotonic()
        watcher.stop()
        assert time.monotonic() - began < 0.5
        await patch_configmap(api, {KEY: "version: 2"})
        assert await deliveries.none_within(QUIET)
    assert deliveries.values == ["version: 1"]


def pod_annotations(kmock: KubernetesEmulator) -> dict[str, str]:
    return dict(kmock.objects["v1/pods", NAMESPACE, POD]["metadata"]["annotations"])


@pytest.mark.asyncio
async def test_the_annotation_is_patched_only_when_it_changes(
    api: ApiClient, kmock: KubernetesEmulator
) -> None:
    pod = {"metadata": {"name": POD, "namespace": NAMESPACE, "annotations": {"keep": "me"}}}
    await call(CoreV1Api(api).create_namespaced_pod, NAMESPACE, pod)
    annotator = PodAnnotator(NAMESPACE, POD, api)
    await annotator.publish("food-review-1=loaded")
    assert pod_annotations(kmock) == {"keep": "me", PodAnnotator.ANNOTATION: "food-review-1=loaded"}
    await annotator.publish("food-review-1=loaded")
    assert len(kmock["patch"]) == 1
    await annotator.publish("food-review-1=loaded,food-review-2=failed")
    assert len(kmock["patch"]) == 2
    assert (
        pod_annotations(kmock)[PodAnnotator.ANNOTATION]
        == "food-review-1=loaded,food-review-2=failed"
    )


@pytest.mark.asyncio
async def test_annotation_errors_are_logged_not_raised_and_retried_next_time(
    api: ApiClient, kmock: KubernetesEmulator
) -> None:
    annotator = PodAnnotator(NAMESPACE, "no-such-pod", api)
    with capture_logs() as logs:
        await annotator.publish("food-review-1=loaded")
        await annotator.publish("food-review-1=loaded")
    assert len(kmock["patch"]) == 2  # nothing was published, so the same value is tried again
    assert [entry["log_level"] for entry in logs] == ["warning", "warning"]
    assert logs[0]["pod"] == "no-such-pod"
    assert logs[0]["error"].startswith("HTTP 404")


def test_outside_a_cluster_a_missing_kubeconfig_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(KubeConfigError, match=r"kubeconfig .*absent .*not in a cluster"):
        kube_api_client()


def test_inside_a_cluster_the_service_account_is_what_was_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    if Path(SERVICE_TOKEN_FILENAME).exists():
        pytest.skip("this machine does run in a cluster")
    with pytest.raises(KubeConfigError, match="in-cluster service account"):
        kube_api_client()
