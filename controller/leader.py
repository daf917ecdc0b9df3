"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Only the leader writes; every replica keeps its watches, so a follower that takes over
starts from warm caches. Each round reads the Lease and, when it is free, expired or
already ours, writes it back (a merge patch conditional on the resourceVersion just read,
so two candidates can never both win the same round: the second gets 409 Conflict).

Clocks. Nothing compares timestamps across machines. renewTime is written for people
(kubectl); expiry is judged on this machine's monotonic clock: a Lease held by another is
expired once it has not CHANGED for its leaseDurationSeconds as observed here. The
leader, for its part, steps down when it has not renewed for renew_deadline (shorter than
the lease duration), measured from when it SENT its last successful renewal: every
observer saw that renewal later than it was sent, so the leader has stopped before any
of them may take over. A renewal refused outright (409, or the Lease names someone else)
steps down at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import structlog
from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease
from kubernetes.client.exceptions import ApiException

from controller.backend.kube import API_ERRORS, raw_json
from loractl.kube import MERGE_PATCH, REQUEST_TIMEOUT, describe

log = structlog.get_logger("controller")

LEASE_DURATION = 15  # seconds; the Lease API holds whole seconds
RENEW_INTERVAL = 5.0
RENEW_DEADLINE = 10.0
RETRY_INTERVAL = 2.0  # followers, and a leader whose renewal failed
RETRY_JITTER = 0.2  # followers spread their attempts by up to this fraction


def leader_identity() -> str:
    """This replica's holder identity: the pod name (POD_NAME, else the host name, which
    is the pod name in a cluster) plus a random suffix, so that a restarted pod does not
    mistake the lease of its previous life for its own."""
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{pod}-{secrets.token_hex(4)}"


class LostLease(Exception):
    """A renewal was refused: someone else holds the Lease, or changed it meanwhile."""


class UnusableLease(Exception):
    """The Lease cannot be written safely (it came without a resourceVersion)."""


class LeaderElector:
    """Campaigns for the Lease until stop(); calls on_start_leading / on_stop_leading on
    the event loop when leadership changes. The callbacks must return promptly and must
    not raise. After stop() (or a lost renewal) writes must stop; `is_leader` says whether
    they may go on, and turns False by itself once renewals have failed for renew_deadline.
    """

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        on_start_leading: Callable[[], None],
        on_stop_leading: Callable[[], None],
        *,
        lease_duration: int = LEASE_DURATION,
        renew_interval: float = RENEW_INTERVAL,
        renew_deadline: float = RENEW_DEADLINE,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        if not 0 < renew_interval < renew_deadline < lease_duration:
            raise ValueError(
                "leader election needs 0 < renew_interval < renew_deadline < lease_duration"
            )
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._api = CoordinationV1Api(api_client)
        self._on_start_leading = on_start_leading
        self._on_stop_leading = on_stop_leading
        self._lease_duration = lease_duration
        self._renew_interval = renew_interval
        self._renew_deadline = renew_deadline
        self._retry_interval = retry_interval
        self._leading = False
        self._renewed_at = 0.0  # monotonic: when the last successful renewal was sent
        self._observed: dict[str, Any] | None = None  # the Lease spec last seen
        self._observed_at = 0.0  # monotonic: when it was first seen like that
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._failures = 0  # consecutive failed rounds, to log a streak once

    @property
    def is_leader(self) -> bool:
        # Bounded by the deadline too: a renewal stuck in flight must not extend our term.
        recent = time.monotonic() - self._renewed_at < self._renew_deadline
        return self._leading and recent

    async def run(self) -> None:
        """Campaigns until stop(); then releases the Lease if it holds it. Cancelled, it
        stops leading without releasing (the Lease then expires), like a crash."""
        self._running = True
        try:
            while not self._stopping.is_set():
                delay = await self._round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            if self._leading:
                self._step_down("stopping", say=log.info)
                await self._release()
        finally:
            self._step_down("stopped")
            self._done.set()

    async def stop(self) -> None:
        """Stops campaigning and releases the Lease so a follower takes over at once."""
        self._stopping.set()
        if self._running:
            await self._done.wait()

    # ---- one round ----

    async def _round(self) -> float:
        """One attempt to acquire or renew; returns the delay before the next."""
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._attempt_budget(sent)):
                held = await self._acquire_or_renew()
        except LostLease as lost:
            self._step_down(str(lost))
            return self._follower_delay()
        except (TimeoutError, UnusableLease, *API_ERRORS) as error:
            return self._after_failure(error)
        if self._failures:
            log.info("lease_attempts_recovered", lease=self.name, failures=self._failures)
            self._failures = 0
        if not held:
            return self._follower_delay()
        self._renewed_at = sent
        if not self._leading:
            self._leading = True
            log.info("leader_elected", lease=self.name, identity=self.identity)
            self._on_start_leading()
        return self._renew_interval

    def _attempt_budget(self, now: float) -> float:
        if self._leading:  # an answer after the deadline is too late to keep leading
            return max(0.0, self._renewed_at + self._renew_deadline - now)
        return float(self._lease_duration)

    def _after_failure(self, error: Exception) -> float:
        self._failures += 1
        if self._failures == 1:
            log.warning("lease_attempts_failing", lease=self.name, error=describe(error),
                        leading=self._leading)  # fmt: skip
        if self._leading and time.monotonic() - self._renewed_at >= self._renew_deadline:
            self._step_down(f"no renewal for {self._renew_deadline:g}s: {describe(error)}")
        return self._retry_interval

    def _follower_delay(self) -> float:
        return self._retry_interval * (1.0 + random.uniform(0.0, RETRY_JITTER))

    def _step_down(self, reason: str, say: Callable[..., Any] = log.warning) -> None:
        if self._leading:
            self._leading = False
            say("leader_stepped_down", lease=self.name, identity=self.identity, reason=reason)
            self._on_stop_leading()

    async def _acquire_or_renew(self) -> bool:
        """True when we hold the Lease after this attempt; raises LostLease when we led and
        a renewal was refused."""
        lease = await asyncio.to_thread(self._read)
        spec = None if lease is None else lease.get("spec") or {}
        if spec is not None:
            self._observe(spec)
            if not self._may_take(spec):
                if self._leading:
                    raise LostLease(f"the Lease is held by {spec.get('holderIdentity')!r}")
                return False
        claim = self._claim(spec)
        try:
            if lease is None:
                await asyncio.to_thread(self._create, claim)
            else:
                await asyncio.to_thread(self._update, claim, _version(lease))
        except ApiException as error:
            if error.status != HTTPStatus.CONFLICT:
                raise
            if self._leading:
                raise LostLease("the Lease changed under our renewal (409 Conflict)") from error
            return False  # another candidate won this round
        self._observe(claim)
        return True

    def _observe(self, spec: dict[str, Any]) -> None:
        if spec != self._observed:
            self._observed = spec
            self._observed_at = time.monotonic()

    def _may_take(self, spec: dict[str, Any]) -> bool:
        holder = spec.get("holderIdentity") or ""
        if holder in ("", self.identity):
            return True
        duration = spec.get("leaseDurationSeconds") or self._lease_duration
        return time.monotonic() - self._observed_at >= duration

    def _claim(self, spec: dict[str, Any] | None) -> dict[str, Any]:
        """The Lease spec saying we hold it from now on."""
        now = _micro_time()
        ours = spec is not None and spec.get("holderIdentity") == self.identity
        transitions = (spec or {}).get("leaseTransitions") or 0
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self._lease_duration,
            "acquireTime": ((spec or {}).get("acquireTime") or now) if ours else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or spec is None else transitions + 1,
        }

    async def _release(self) -> None:
        """Clears holderIdentity (if the Lease is still ours) so that a follower need not
        wait for it to expire. Best effort: the Lease expires anyway."""
        try:
            lease = await asyncio.wait_for(asyncio.to_thread(self._read), self._retry_interval)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            released = {**spec, "holderIdentity": "", "renewTime": _micro_time()}
            await asyncio.wait_for(
                asyncio.to_thread(self._update, released, _version(lease)), self._retry_interval
            )
        except (TimeoutError, UnusableLease, *API_ERRORS) as error:
            log.warning("lease_release_failed", lease=self.name, error=describe(error))
            return
        log.info("lease_released", lease=self.name, identity=self.identity)

    # ---- the API, called in worker threads ----

    def _read(self) -> dict[str, Any] | None:
        try:
            response = self._api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status == HTTPStatus.NOT_FOUND:
                return None
            raise
        return raw_json(response)

    def _create(self, spec: dict[str, Any]) -> None:
        """Creates the Lease; 409 (someone created it first) surfaces as a failed round."""
        lease = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        self._api.create_namespaced_lease(
            self.namespace, V1Lease.model_validate(lease), _request_timeout=REQUEST_TIMEOUT
        )

    def _update(self, spec: dict[str, Any], version: str) -> None:
        self._api.patch_namespaced_lease(
            self.name,
            self.namespace,
            {"metadata": {"resourceVersion": version}, "spec": spec},
            _content_type=MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT,
        )


def _version(lease: dict[str, Any]) -> str:
    version = (lease.get("metadata") or {}).get("resourceVersion")
    if not version:  # no real server omits it; without it the write would be blind
        raise UnusableLease("the Lease came without a resourceVersion")
    return str(version)


def _micro_time() -> str:
    # The Lease's MicroTime format.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
