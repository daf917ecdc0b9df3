"""Noticing that the adapter config file may have changed, however it was changed.

The kubelet updates a ConfigMap volume by writing a new hidden timestamped directory and
renaming a `..data_tmp` symlink over `..data`; the config path is a symlink chain, and the
file it resolves to is never modified. So the config file's DIRECTORY is watched, with
inotify rather than polling because latency matters, and any entry created, deleted,
moved, modified or closed after writing there counts: the caller re-reads the file and
compares. A plain file edited in place or replaced by a rename (editors, `kubectl cp`)
produces the same kinds of events in the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

log = structlog.get_logger("sidecar")

# Opening and closing without writing are left out on purpose: reading the config after a
# change must not look like another change. Attribute-only changes leave the content alone.
CONTENT_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,
    FileClosedEvent,
]


class ConfigFileWatcher:
    """Calls on_change() on the asyncio loop when the config file changed.

    A burst of events (one kubelet update makes several) gives one call, `debounce`
    seconds after the last event; and only when the file the path resolves to is not
    the one last reported (inode, modification time, size), because watchdog may hand
    over a straggler of the same update half a second later. With `whole_directory`,
    any change in the directory counts (for a directory of several files). start() and
    stop() must be called on the loop's thread.
    """

    def __init__(
        self,
        config_path: Path,
        on_change: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        debounce: float = 0.05,
        *,
        retry_interval: float = 5.0,
        whole_directory: bool = False,
    ) -> None:
        self._whole_directory = whole_directory
        self._path = config_path
        self._directory = config_path.parent
        self._reported: tuple[int, int, int] | None = None
        self._on_change = on_change
        self._loop = loop
        self._debounce = debounce
        self._retry_interval = retry_interval
        self._running = False
        self._observer: InotifyObserver | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._warned_missing = False

    def start(self) -> None:
        self._running = True
        self._reported = self._identity()
        self._try_start(announce=False)

    def stop(self) -> None:
        self._running = False
        for handle in (self._pending, self._retry):
            if handle is not None:
                handle.cancel()
        self._pending = self._retry = None
        self._stop_observer()

    def _try_start(self, announce: bool) -> None:
        """Starts watching; `announce` reports a change once it works, because the file
        may have appeared while nothing was watching."""
        self._retry = None
        if not self._running:
            return
        try:
            self._observer = self._start_observer()
        except OSError as error:
            self._wait_for_directory(error)
            return
        log.info("config_watch_started", directory=str(self._directory))
        self._warned_missing = False
        if announce:
            self._arm()

    def _wait_for_directory(self, error: OSError) -> None:
        if not self._warned_missing:
            log.warning(
                "config_watch_waiting",
                directory=str(self._directory),
                error=f"{type(error).__name__}: {error.strerror or error}",
                retry_seconds=self._retry_interval,
            )
            self._warned_missing = True
        self._retry = self._loop.call_later(self._retry_interval, self._try_start, True)

    def _start_observer(self) -> InotifyObserver:
        observer = InotifyObserver()
        observer.schedule(
            _Forward(self._on_event),
            str(self._directory),
            recursive=False,
            event_filter=CONTENT_EVENTS,
        )
        try:
            observer.start()
        except BaseException:
            observer.stop()  # its inotify reader thread already runs from the constructor
            raise
        return observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def _on_event(self, event: FileSystemEvent) -> None:
        """Runs on watchdog's thread: hands the event over to the loop."""
        gone = isinstance(event, DirDeletedEvent) and event.src_path == str(self._directory)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._directory_gone if gone else self._arm)

    def _arm(self) -> None:
        if not self._running:
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self._loop.call_later(self._debounce, self._fire)

    def _fire(self) -> None:
        self._pending = None
        if not self._whole_directory:
            identity = self._identity()
            if identity == self._reported:
                return
            self._reported = identity
        self._on_change()

    def _identity(self) -> tuple[int, int, int] | None:
        """What the path resolves to now (None: nothing); os.stat follows the symlinks."""
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _directory_gone(self) -> None:
        """inotify stops watching a deleted directory; wait for a new one to appear."""
        if not self._running:
            return
        self._stop_observer()
        self._arm()
        self._try_start(announce=True)


class _Forward(FileSystemEventHandler):
    def __init__(self, callback: Callable[[FileSystemEvent], None]) -> None:
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._callback(event)
