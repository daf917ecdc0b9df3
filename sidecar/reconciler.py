"""The reconcile loop: make vLLM's registered adapters match the ConfigMap.

One pass at a time (triggers that arrive during a pass coalesce into one more
pass): read the config, list what vLLM has registered, plan, and start the
planned operations. Operations (download, load, unload) run as their own
tasks, bounded in number, each adapter at most once at a time, so a slow
download or a failing adapter never holds up the others; each one triggers a
new pass when it ends. A monitor polls vLLM to notice a restart (registered
adapters gone) and re-registers them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from sidecar.config import ConfigError, DesiredState, parse_config
from sidecar.failures import AdapterFailure, FailureReason
from sidecar.fetch import AdapterFetcher, FetchedAdapter
from sidecar.metrics import SidecarMetrics
from sidecar.plan import Action, Adopt, Load, Unload, plan
from sidecar.sources import HuggingFaceSource
from sidecar.status import AdapterRecord, AdapterState, LastError
from sidecar.vllm_client import VLLMClient

log = structlog.get_logger("sidecar")
ReadyWhen = Literal["all", "any", "none"]


@dataclass(frozen=True)
class ReconcilerSettings:
    config_path: Path
    adapter_dir: Path
    vllm_url: str | None = None
    """Overrides the config's host/port."""
    api_key: str | None = None
    prune: bool = False
    ready_when: ReadyWhen = "all"
    resync_interval: float = 30.0
    vllm_poll_interval: float = 1.0
    max_concurrency: int = 4
    request_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0


class Reconciler:
    def __init__(
        self,
        settings: ReconcilerSettings,
        fetcher: AdapterFetcher,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.records: dict[str, AdapterRecord] = {}
        self.metrics = SidecarMetrics(lambda: list(self.records.values()))
        self.desired: DesiredState | None = None
        self.generation = 0
        self.config_error: str | None = None
        self.config_origin = "file"
        self.vllm_reachable = False
        self.last_error: str | None = None
        self.on_change: Callable[[], None] = lambda: None
        """Called after every adapter state change (e.g. to publish a Pod annotation)."""
        self._api_owns_config = False
        self._was_ready = False
        self._seen_digest: str | None = None
        self._client: VLLMClient | None = None
        self._trigger = asyncio.Event()
        self._busy: set[str] = set()
        self._operations: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    # --- inputs -----------------------------------------------------------------------

    def trigger(self) -> None:
        self._trigger.set()

    def accept_config_text(self, text: str | None, origin: str) -> None:
        """Take a config document; a rejected one leaves the last good desired state in force."""
        if origin != "file":
            # The API (or the local directory standing in for it) is ahead of the kubelet's
            # file: from now on the file is not read.
            self._api_owns_config = True
        self.config_origin = origin
        if text is None:
            self._reject(f"the {origin} config is gone (ConfigMap or key deleted)", None)
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._seen_digest:
            return
        try:
            desired = parse_config(text)
        except ConfigError as exc:
            self._reject(str(exc), digest)
            return
        self._seen_digest = digest
        self.desired = desired
        self.generation += 1
        self.config_error = None
        self.metrics.config_generation.set(self.generation)
        self.metrics.config_valid.set(1)
        log.info(
            "config_accepted",
            generation=self.generation,
            origin=origin,
            ensure_exist=sorted(desired.ensure_exist),
            ensure_not_exist=sorted(desired.ensure_not_exist),
            invalid=sorted(desired.problems),
        )
        self.trigger()

    def _reject(self, error: str, digest: str | None) -> None:
        self._seen_digest = digest
        self.config_error = error
        self.last_error = f"config rejected: {error}"
        self.metrics.config_errors.inc()
        self.metrics.config_valid.set(0)
        log.error("config_rejected", error=error, kept_generation=self.generation)

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        monitor = asyncio.create_task(self._monitor_vllm())
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that lands as the trigger fires, and the loop would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.resync_interval):
                        await self._trigger.wait()
                self._trigger.clear()
                await self.reconcile_once()
        finally:
            monitor.cancel()
            for task in self._operations:
                task.cancel()
            if self._client is not None:
                await self._client.aclose()

    async def reconcile_once(self) -> None:
        started = time.perf_counter()
        if not self._api_owns_config:
            self._read_config_file()
        desired = self.desired
        if desired is None:
            return
        client = self._client_for(desired)
        try:
            registered = await client.registered_adapters()
        except AdapterFailure as failure:
            self._set_reachable(False, failure.message)
            return
        self._set_reachable(True)
        self._sync_records(desired, registered)
        actions = plan(
            desired,
            registered,
            self.records,
            self._busy,
            time.monotonic(),
            prune=self.settings.prune,
            adapter_dir=str(self.settings.adapter_dir),
        ).actions
        for action in actions:
            self._start(action, client)
        self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    def _read_config_file(self) -> None:
        try:
            text = self.settings.config_path.read_text()
        except OSError as exc:
            message = f"cannot read {self.settings.config_path}: {exc.strerror or exc}"
            if self.config_error != message:
                self._reject(message, None)
            return
        self.accept_config_text(text, "file")

    def _client_for(self, desired: DesiredState) -> VLLMClient:
        url = self.settings.vllm_url or desired.vllm_url
        if self._client is None or self._client.base_url != url.rstrip("/"):
            if self._client is not None:
                task = asyncio.create_task(self._client.aclose())
                self._operations.add(task)
                task.add_done_callback(self._operations.discard)
            self._client = VLLMClient(
                url, api_key=self.settings.api_key, timeout=self.settings.request_timeout
            )
        return self._client

    def _sync_records(self, desired: DesiredState, registered: dict[str, str]) -> None:
        wanted = desired.ensure_exist
        for adapter_id, spec in wanted.items():
            record = self.records.setdefault(adapter_id, AdapterRecord(adapter_id, desired=True))
            record.desired = True
            if record.source != spec.source_key:
                record.source = spec.source_key
                record.consecutive_failures = 0  # a new source deserves an immediate try
                record.retry_at = 0.0
        for adapter_id in desired.ensure_not_exist:
            record = self.records.setdefault(adapter_id, AdapterRecord(adapter_id, desired=False))
            record.desired = False
            if adapter_id not in registered and adapter_id not in self._busy:
                self._transition(record, AdapterState.UNLOADED)
        for adapter_id, problem in desired.problems.items():
            record = self.records.setdefault(adapter_id, AdapterRecord(adapter_id, desired=False))
            if record.last_error is None or record.last_error.message != problem:
                self._fail(record, AdapterFailure(FailureReason.INVALID_SPEC, problem), retry=False)
        for record in self.records.values():
            lost = record.state is AdapterState.LOADED and record.id not in registered
            if lost and record.id not in self._busy:
                log.warning("adapter_lost", adapter=record.id, hint="vLLM restarted or unloaded it")
                record.loaded_path = None
                self._transition(record, AdapterState.PENDING)
        known = wanted.keys() | desired.ensure_not_exist | desired.problems.keys() | self._busy
        for adapter_id in list(self.records):
            if adapter_id not in known:
                del self.records[adapter_id]

    # --- operations -------------------------------------------------------------------

    def _start(self, action: Action, client: VLLMClient) -> None:
        if isinstance(action, Adopt):
            self._adopt(action)
            return
        self._busy.add(action.id)
        task = asyncio.create_task(self._run_operation(action, client))
        self._operations.add(task)
        task.add_done_callback(self._operation_done(action.id))

    def _operation_done(self, adapter_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._operations.discard(task)
            self._busy.discard(adapter_id)
            self.trigger()

        return done

    def _adopt(self, action: Adopt) -> None:
        record = self.records[action.id]
        record.loaded_source = action.spec.source_key
        record.loaded_path = action.root
        record.owned_path = action.root.startswith(str(self.settings.adapter_dir))
        record.loaded_at = record.loaded_at or time.time()
        self._transition(record, AdapterState.LOADED, reason="already registered")

    async def _run_operation(self, action: Load | Unload, client: VLLMClient) -> None:
        record = self.records.setdefault(action.id, AdapterRecord(action.id, desired=False))
        async with self._slots:
            record.attempts += 1
            try:
                if isinstance(action, Load):
                    await self._load(action, record, client)
                else:
                    await self._unload(action, record, client)
            except AdapterFailure as failure:
                self._fail(record, failure)
            except Exception as exc:  # a bug must cost one adapter one attempt, not the sidecar
                log.exception("operation_crashed", adapter=action.id)
                self._fail(
                    record, AdapterFailure(FailureReason.TRANSIENT, f"internal error: {exc!r}")
                )

    async def _load(self, action: Load, record: AdapterRecord, client: VLLMClient) -> None:
        spec = action.spec
        downloads = isinstance(spec.source, HuggingFaceSource)
        self._transition(
            record,
            AdapterState.DOWNLOADING if downloads else AdapterState.LOADING,
            reason=action.reason,
            source=spec.source_key,
        )
        started = time.perf_counter()
        fetched = await self.fetcher.fetch(spec.id, spec.source)
        self.metrics.download_duration.observe(time.perf_counter() - started)
        record.warnings = self._base_model_warnings(spec.base_model, fetched)
        self._transition(record, AdapterState.LOADING, path=fetched.path)
        started = time.perf_counter()
        try:
            await client.load(spec.id, fetched.path, inplace=action.inplace)
        finally:
            self.metrics.load_duration.observe(time.perf_counter() - started)
        previous_revision = record.revision if record.owned_path else None
        record.loaded_source = spec.source_key
        record.loaded_path = fetched.path
        record.revision = fetched.revision
        record.owned_path = fetched.owned
        record.consecutive_failures = 0
        record.retry_at = 0.0
        record.last_error = None
        record.loaded_at = time.time()
        self._transition(record, AdapterState.LOADED, revision=fetched.revision)
        if fetched.owned and previous_revision and previous_revision != fetched.revision:
            self.fetcher.release(spec.id, keep=fetched.revision)

    async def _unload(self, action: Unload, record: AdapterRecord, client: VLLMClient) -> None:
        self._transition(record, AdapterState.UNLOADING, reason=action.reason)
        started = time.perf_counter()
        try:
            await client.unload(action.id)
        finally:
            self.metrics.unload_duration.observe(time.perf_counter() - started)
        if record.owned_path:
            self.fetcher.release(action.id)  # vLLM re-reads the files only while registered
        record.loaded_source = record.loaded_path = None
        record.owned_path = False
        record.consecutive_failures = 0
        record.retry_at = 0.0
        self._transition(record, AdapterState.UNLOADED)

    def _base_model_warnings(self, expected: str | None, fetched: FetchedAdapter) -> list[str]:
        actual = fetched.config.base_model
        if expected is None or actual is None or actual == expected:
            return []
        warning = (
            f"adapter was trained on {actual!r} but the config names {expected!r} as base model"
        )
        log.warning("base_model_mismatch", path=fetched.path, expected=expected, actual=actual)
        return [warning]

    # --- bookkeeping ------------------------------------------------------------------

    def _fail(self, record: AdapterRecord, failure: AdapterFailure, retry: bool = True) -> None:
        record.consecutive_failures += 1
        record.last_error = LastError(failure.reason, failure.message, time.time())
        self.last_error = f"{record.id}: {failure.message}"
        self.metrics.failures.labels(adapter_name=record.id, reason=failure.reason.value).inc()
        delay = None
        if retry:
            delay = self._backoff(record.consecutive_failures)
            record.retry_at = time.monotonic() + delay
            asyncio.get_running_loop().call_later(delay, self.trigger)
        self._transition(
            record,
            AdapterState.FAILED,
            reason=failure.reason.value,
            error=failure.message,
            retry_in_seconds=None if delay is None else round(delay, 2),
        )

    def _backoff(self, failures: int) -> float:
        base = min(self.settings.backoff_max, self.settings.backoff_initial * 2.0 ** (failures - 1))
        return base * random.uniform(0.8, 1.0)  # jitter keeps a fleet of sidecars apart

    def _transition(self, record: AdapterRecord, state: AdapterState, **details: Any) -> None:
        if record.state is state and state is not AdapterState.FAILED:
            return
        log.info("adapter_state", adapter=record.id, previous=record.state.value, state=state.value,
                 **details)  # fmt: skip
        record.state = state
        record.changed_at = time.time()
        self.readiness()  # latches readiness the moment the last adapter loads
        self.on_change()

    def _set_reachable(self, reachable: bool, error: str | None = None) -> None:
        if reachable != self.vllm_reachable:
            log.info("vllm_reachable" if reachable else "vllm_unreachable", error=error)
        if not reachable:
            self._was_ready = False  # a restarted vLLM must get its adapters back first
        self.vllm_reachable = reachable
        self.metrics.vllm_reachable.set(int(reachable))
        if error:
            self.last_error = error

    async def _monitor_vllm(self) -> None:
        """Notice vLLM (re)starting or losing adapters between resyncs, and react at once."""
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            if self.desired is None or self._client is None:
                continue
            client = self._client
            if not await client.healthy():
                self._set_reachable(False, f"vLLM at {client.base_url} is not healthy")
                delay = min(self.settings.vllm_poll_interval, delay * 2)
                continue
            delay = self.settings.vllm_poll_interval
            was_reachable = self.vllm_reachable
            try:
                registered = await client.registered_adapters()
            except AdapterFailure as failure:
                self._set_reachable(False, failure.message)
                continue
            self._set_reachable(True)
            lost = any(
                r.state is AdapterState.LOADED and r.id not in registered
                for r in self.records.values()
            )
            if lost or not was_reachable:
                self.trigger()

    # --- views ------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready once the adapters are loaded, and from then on while vLLM answers.

        Adapters listed later (a canary's new version, say) do not take the pod back out
        of service: the ConfigMap is shared by every pod of the pool, so waiting on them
        would take the whole pool out at once, and for good if one cannot load. The
        rollout controller watches those through the inventory instead. A vLLM that stops
        answering resets this: after a restart it holds no adapters until they are
        loaded again.
        """
        ready, why = self._adapters_ready()
        if ready:
            self._was_ready = True
        elif self._was_ready and self.vllm_reachable and self.desired is not None:
            return True, f"ready (since startup; {why})"
        return ready, why

    def _adapters_ready(self) -> tuple[bool, str]:
        mode = self.settings.ready_when
        if mode == "none":
            return True, "readiness does not wait for adapters (--ready-when none)"
        if self.desired is None:
            return False, f"no valid config yet: {self.config_error}"
        if not self.vllm_reachable:
            return False, "vLLM is not reachable"
        wanted = sorted(self.desired.ensure_exist)
        missing = [
            i
            for i in wanted
            if self.records.get(i, AdapterRecord(i, True)).state is not AdapterState.LOADED
        ]
        if mode == "all" and missing:
            return False, f"not loaded yet: {', '.join(missing)}"
        if mode == "any" and wanted and len(missing) == len(wanted):
            return False, "no ensureExist adapter is loaded yet"
        return True, "ready"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        ready, why = self.readiness()
        return {
            "ready": ready,
            "ready_reason": why,
            "config": {
                "path": str(self.settings.config_path),
                "origin": self.config_origin,
                "generation": self.generation,
                "error": self.config_error,
            },
            "vllm": {
                "url": None if self._client is None else self._client.base_url,
                "reachable": self.vllm_reachable,
            },
            "last_error": self.last_error,
            "adapters": {i: r.as_json(now) for i, r in sorted(self.records.items())},
        }

    def summary(self) -> str:
        """Compact `id=state` list, for a Pod annotation."""
        return ",".join(f"{i}={r.state.value}" for i, r in sorted(self.records.items()))
