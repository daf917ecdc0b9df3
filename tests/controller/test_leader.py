"""LeaderElector: two candidates for one Lease.

Handing over, crashes and partitions run against kmock. kmock keeps the Lease but no
resourceVersions (the Lease is created here with one, which it keeps), and it never
refuses a stale write: races and refused renewals run against StrictApi, which does.
Durations are short: a 1 s lease, renewed every 0.2 s, given up after 0.6 s without a
renewal; followers try every 0.1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes.client import ApiClient, CustomObjectsApi

from controller.leader import LeaderElector, leader_identity
from tests.controller.strict_api import StrictApi
from tests.support.kube import CuttableProxy, call, use_kubeconfig

NAMESPACE = "serving"
LEASE = "loractl-controller"
LEASES = "coordination.k8s.io/v1/leases"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"
DURATION = 1
RENEW = 0.2
DEADLINE = 0.6
RETRY = 0.1
WAIT = 5.0
History = list[tuple[str, str, float]]  # (identity, "start" | "stop", monotonic time)


class Candidate:
    """One elector, its run task, and what its callbacks said, in a shared history."""

    def __init__(self, api: ApiClient, identity: str, history: History) -> None:
        self.identity = identity
        self._history = history
        self.elector = LeaderElector(
            api,
            NAMESPACE,
            LEASE,
            identity,
            lambda: self._record("start"),
            lambda: self._record("stop"),
            lease_duration=DURATION,
            renew_interval=RENEW,
            renew_deadline=DEADLINE,
            retry_interval=RETRY,
        )
        self.task: asyncio.Task[None] | None = None

    def _record(self, what: str) -> None:
        self._history.append((self.identity, what, time.monotonic()))

    def start(self) -> Candidate:
        self.task = asyncio.create_task(self.elector.run())
        return self

    async def stop(self) -> None:
        await self.elector.stop()
        if self.task is not None:
            await self.task

    async def crash(self) -> None:
        """Gone without a word, like a killed process: no release."""
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    def last(self, what: str) -> float:
        return [t for identity, w, t in self._history if (identity, w) == (self.identity, what)][-1]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def assert_one_leader_at_a_time(history: History) -> None:
    leading: set[str] = set()
    for identity, what, _ in history:
        if what == "start":
            assert not leading, f"{identity} started leading while {leading} led: {history}"
            leading.add(identity)
        else:
            leading.discard(identity)


@pytest.fixture
def history() -> Iterator[History]:
    events: History = []
    yield events
    assert_one_leader_at_a_time(events)


@pytest_asyncio.fixture
async def candidates() -> AsyncIterator[list[Candidate]]:
    """Every candidate a test starts goes in here and is stopped after the test."""
    started: list[Candidate] = []
    yield started
    for candidate in started:
        if candidate.task is not None and not candidate.task.done():
            await candidate.stop()


# ---- against kmock ----


@pytest_asyncio.fixture
async def api(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ApiClient]:
    kmock.resources[LEASES] = ResourceInfo(namespaced=True, kind="Lease")
    client = use_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    metadata = {"name": LEASE, "namespace": NAMESPACE, "resourceVersion": "1"}
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata}
    create = CustomObjectsApi(client).create_namespaced_custom_object
    await call(create, "coordination.k8s.io", "v1", NAMESPACE, "leases", lease)
    yield client
    client.close()  # type: ignore[no-untyped-call]


def lease_spec(kmock: KubernetesEmulator) -> dict[str, Any]:
    return dict(kmock.objects[LEASES, NAMESPACE, LEASE]["spec"])


@pytest.mark.asyncio
async def test_one_leads_and_a_release_hands_over_at_once(
    kmock: KubernetesEmulator, api: ApiClient, history: History, candidates: list[Candidate]
) -> None:
    a = Candidate(api, "a", history).start()
    candidates.append(a)
    await until(lambda: a.elector.is_leader)
    b = Candidate(api, "b", history).start()
    candidates.append(b)
    await asyncio.sleep(1.5 * DURATION)  # a renews all along: b must not take over
    assert (a.elector.is_leader, b.elector.is_leader) == (True, False)
    spec = lease_spec(kmock)
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"]) == ("a", DURATION)
    assert spec["renewTime"].endswith("Z")

    stopped = time.monotonic()
    await a.stop()
    assert not a.elector.is_leader
    await until(lambda: b.elector.is_leader)
    assert time.monotonic() - stopped < DURATION / 2  # released, not expired
    spec = lease_spec(kmock)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 2)
    assert [(identity, what) for identity, what, _ in history] == [
        ("a", "start"),
        ("a", "stop"),
        ("b", "start"),
    ]


@pytest.mark.asyncio
async def test_a_crashed_leader_is_replaced_once_its_lease_has_not_changed_for_its_duration(
    kmock: KubernetesEmulator, api: ApiClient, history: History, candidates: list[Candidate]
) -> None:
    a = Candidate(api, "a", history).start()
    candidates.append(a)
    await until(lambda: a.elector.is_leader)
    b = Candidate(api, "b", history).start()
    candidates.append(b)
    await asyncio.sleep(0.3)
    crashed = time.monotonic()
    await a.crash()
    await until(lambda: b.elector.is_leader)
    # a renewed at most RENEW before the crash; b waits DURATION after seeing that renewal.
    assert DURATION - RENEW - 0.05 <= time.monotonic() - crashed <= DURATION + 0.6
    assert lease_spec(kmock)["holderIdentity"] == "b"


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
async def test_a_cut_off_leader_steps_down_before_another_takes_over(
    api: ApiClient,
    proxy: tuple[CuttableProxy, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    history: History,
    candidates: list[Candidate],
) -> None:
    cuttable, url = proxy
    through_proxy = use_kubeconfig(url, tmp_path / "kubeconfig-proxy", monkeypatch)
    a = Candidate(through_proxy, "a", history).start()
    candidates.append(a)
    await until(lambda: a.elector.is_leader)
    b = Candidate(api, "b", history).start()
    candidates.append(b)
    await asyncio.sleep(0.3)
    cut = time.monotonic()
    cuttable.cut()
    await until(lambda: b.elector.is_leader)
    assert not a.elector.is_leader
    assert a.last("stop") - cut <= DEADLINE + 0.1  # its deadline, from its last renewal
    assert a.last("stop") < b.last("start")  # also checked by the history fixture
    await a.stop()
    through_proxy.close()  # type: ignore[no-untyped-call]


# ---- against a server that refuses stale writes ----


@pytest_asyncio.fixture
async def strict() -> AsyncIterator[StrictApi]:
    server = StrictApi()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def strict_api(
    strict: StrictApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiClient]:
    client = use_kubeconfig(strict.url, tmp_path / "kubeconfig", monkeypatch)
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.mark.asyncio
@pytest.mark.parametrize("lease", ["absent", "released"])
async def test_candidates_racing_for_a_free_lease_make_one_leader(
    strict: StrictApi,
    strict_api: ApiClient,
    history: History,
    candidates: list[Candidate],
    lease: str,
) -> None:
    if lease == "released":
        strict.add(LEASE_PATH, {"metadata": {"name": LEASE, "namespace": NAMESPACE},
                                "spec": {"holderIdentity": "", "leaseTransitions": 4}})  # fmt: skip
    racers = [Candidate(strict_api, name, history).start() for name in ("a", "b", "c")]
    candidates.extend(racers)
    await until(lambda: any(r.elector.is_leader for r in racers))
    await asyncio.sleep(1.5 * DURATION)
    leaders = [r.identity for r in racers if r.elector.is_leader]
    assert len(leaders) == 1
    assert [what for _, what, _ in history] == ["start"]
    assert strict.objects[LEASE_PATH]["spec"]["holderIdentity"] == leaders[0]
    assert all(conditional for _, _, conditional in strict.patches)


@pytest.mark.asyncio
async def test_a_refused_renewal_steps_down_at_once(
    strict: StrictApi, strict_api: ApiClient, history: History, candidates: list[Candidate]
) -> None:
    a = Candidate(strict_api, "a", history).start()
    candidates.append(a)
    await until(lambda: a.elector.is_leader)

    def taken_by_an_intruder(lease: dict[str, Any]) -> None:
        lease["spec"]["holderIdentity"] = "intruder"

    strict.meddle(taken_by_an_intruder)
    meddled = time.monotonic()
    await until(lambda: not a.elector.is_leader)
    assert a.last("stop") - meddled <= RENEW + 0.1  # the next renewal, not the deadline
    assert strict.conflicts() == 1
    assert strict.objects[LEASE_PATH]["spec"]["holderIdentity"] == "intruder"
    # The intruder never renews: once its Lease has not changed for its duration, a is back.
    await until(lambda: a.elector.is_leader)
    assert a.last("start") - a.last("stop") >= DURATION


def test_timings_must_leave_the_deadline_inside_the_lease() -> None:
    with pytest.raises(ValueError, match="renew_interval < renew_deadline < lease_duration"):
        LeaderElector(ApiClient(), NAMESPACE, LEASE, "a", print, print, renew_deadline=20.0)


def test_the_identity_is_the_pod_name_and_a_fresh_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "controller-7d9f-x2")
    first, second = leader_identity(), leader_identity()
    assert first.startswith("controller-7d9f-x2-")
    assert first != second
