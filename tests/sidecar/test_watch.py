"""ConfigFileWatcher against real files and real inotify events."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar.watch import ConfigFileWatcher
from tests.support.configmap_dir import write_configmap_dir

DEBOUNCE = 0.05
# Longer than watchdog's 0.5 s hold on an unpaired rename, so a late duplicate would show.
QUIET = 0.7
WAIT = 2.0
KEY = "configmap.yaml"


class Calls:
    """The on_change callback: records when each call happened; the test takes them in order."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._taken = 0
        self._called = asyncio.Event()

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        self._called.set()

    async def next(self) -> float:
        async with asyncio.timeout(WAIT):
            while len(self.times) == self._taken:
                self._called.clear()
                await self._called.wait()
        self._taken += 1
        return self.times[self._taken - 1]

    async def none_within(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return len(self.times) == self._taken


@contextmanager
def watching(
    config: Path, calls: Calls, retry_interval: float = 5.0
) -> Iterator[ConfigFileWatcher]:
    watcher = ConfigFileWatcher(
        config, calls, asyncio.get_running_loop(), DEBOUNCE, retry_interval=retry_interval
    )
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


@pytest.mark.asyncio
async def test_each_kubelet_swap_calls_once_soon_after(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    write_configmap_dir(directory, {KEY: "version: 0"})
    calls = Calls()
    with watching(directory / KEY, calls):
        for version in range(1, 4):
            swapped = time.monotonic()
            write_configmap_dir(directory, {KEY: f"version: {version}"})
            latency = await calls.next() - swapped
            assert DEBOUNCE <= latency < DEBOUNCE + 0.4
            assert await calls.none_within(QUIET)
            assert (directory / KEY).read_text() == f"version: {version}"
    assert len(calls.times) == 3


@pytest.mark.asyncio
async def test_a_burst_of_swaps_calls_once(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    write_configmap_dir(directory, {KEY: "version: 0"})
    calls = Calls()
    with watching(directory / KEY, calls):
        for version in range(1, 6):
            write_configmap_dir(directory, {KEY: f"version: {version}", f"extra-{version}": ""})
        await calls.next()
        assert await calls.none_within(QUIET)
    assert len(calls.times) == 1


def edit_in_place(config: Path) -> None:
    with config.open("r+") as file:
        file.write("edited")
        file.truncate()


def replace_by_rename(config: Path) -> None:
    temporary = config.with_name(f".{config.name}.swp")
    temporary.write_text("replaced")
    os.replace(temporary, config)


def move_in_from_elsewhere(config: Path) -> None:
    outside = config.parent.parent / "staging"
    outside.mkdir()
    (outside / config.name).write_text("moved in")
    os.replace(outside / config.name, config)


@pytest.mark.asyncio
@pytest.mark.parametrize("edit", [edit_in_place, replace_by_rename, move_in_from_elsewhere])
async def test_plain_file_edits_call_once(tmp_path: Path, edit: Callable[[Path], None]) -> None:
    config = tmp_path / "config" / KEY
    config.parent.mkdir()
    config.write_text("original")
    calls = Calls()
    with watching(config, calls):
        edit(config)
        await calls.next()
        assert await calls.none_within(QUIET)
    assert len(calls.times) == 1


@pytest.mark.asyncio
async def test_reading_the_config_is_not_a_change(tmp_path: Path) -> None:
    config = tmp_path / "config" / KEY
    config.parent.mkdir()
    config.write_text("original")
    calls = Calls()
    with watching(config, calls):
        for _ in range(3):
            config.read_text()
        assert await calls.none_within(QUIET)


@pytest.mark.asyncio
async def test_a_directory_that_appears_later_is_watched_from_then_on(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    calls = Calls()
    with capture_logs() as logs, watching(directory / KEY, calls, retry_interval=0.05):
        await asyncio.sleep(0.3)  # several retries go by
        write_configmap_dir(directory, {KEY: "version: 1"})
        await calls.next()
        assert await calls.none_within(QUIET)
        write_configmap_dir(directory, {KEY: "version: 2"})
        await calls.next()
    assert len(calls.times) == 2
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["directory"] == str(directory)


@pytest.mark.asyncio
async def test_a_deleted_directory_is_a_change_and_its_replacement_is_watched(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "config"
    write_configmap_dir(directory, {KEY: "version: 0"})
    calls = Calls()
    with watching(directory / KEY, calls, retry_interval=0.05):
        shutil.rmtree(directory)
        await calls.next()
        write_configmap_dir(directory, {KEY: "version: 1"})
        await calls.next()
        write_configmap_dir(directory, {KEY: "version: 2"})
        await calls.next()


@pytest.mark.asyncio
async def test_stop_stops_the_calls(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    write_configmap_dir(directory, {KEY: "version: 0"})
    calls = Calls()
    with watching(directory / KEY, calls) as watcher:
        write_configmap_dir(directory, {KEY: "version: 1"})
        await asyncio.sleep(DEBOUNCE / 2)  # a call is pending when stop() comes
        watcher.stop()
        write_configmap_dir(directory, {KEY: "version: 2"})
        assert await calls.none_within(QUIET)
    assert calls.times == []
