"""The config watcher: one callback per settled change, one per SIGHUP, none otherwise."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tollway.config.reload import ConfigWatcher

INTERVAL = 0.01
DEADLINE = 5.0


async def until(condition: Callable[[], bool]) -> None:
    """Poll for a condition with a deadline; the wait is never itself the assertion."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(INTERVAL / 2)


class Calls:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), DEADLINE)
        self.event.clear()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tollway.yaml"
    path.write_text("services: []\n")
    return path


@pytest.fixture
async def watched(config_file: Path) -> AsyncIterator[tuple[ConfigWatcher, Calls]]:
    calls = Calls()
    watcher = ConfigWatcher(config_file, calls, interval=INTERVAL, handle_sighup=False)
    watcher.start()
    yield watcher, calls
    watcher.stop()


async def test_an_unchanged_file_never_fires(watched: tuple[ConfigWatcher, Calls]) -> None:
    watcher, calls = watched
    await until(lambda: watcher.polls >= 10)
    assert calls.count == 0


async def test_each_change_fires_once(
    watched: tuple[ConfigWatcher, Calls], config_file: Path
) -> None:
    watcher, calls = watched

    config_file.write_text("services: []\nroutes: []\n")
    await calls.next()
    polls = watcher.polls
    await until(lambda: watcher.polls >= polls + 5)
    assert calls.count == 1

    config_file.write_text("routes: []\n")
    await calls.next()
    polls = watcher.polls
    await until(lambda: watcher.polls >= polls + 5)
    assert calls.count == 2


async def test_a_replacement_by_rename_is_noticed(
    watched: tuple[ConfigWatcher, Calls], config_file: Path
) -> None:
    # What editors and Kubernetes ConfigMaps do: write elsewhere, rename over.
    _, calls = watched
    fresh = config_file.with_suffix(".tmp")
    fresh.write_text("services: []\n")  # same size as before: the inode tells
    os.replace(fresh, config_file)
    await calls.next()
    assert calls.count == 1


async def test_a_missing_file_waits_for_it_to_come_back(
    watched: tuple[ConfigWatcher, Calls], config_file: Path
) -> None:
    watcher, calls = watched
    config_file.unlink()
    await until(lambda: watcher.polls >= 5)
    assert calls.count == 0

    config_file.write_text("routes: []\n")
    await calls.next()
    assert calls.count == 1


async def test_a_failing_callback_does_not_stop_the_watcher(config_file: Path) -> None:
    attempts: list[int] = []

    def broken() -> None:
        attempts.append(1)
        raise RuntimeError("bad config")

    watcher = ConfigWatcher(config_file, broken, interval=INTERVAL, handle_sighup=False)
    watcher.start()
    try:
        config_file.write_text("a: 1\n")
        await until(lambda: len(attempts) == 1)
        config_file.write_text("a: 22\n")
        await until(lambda: len(attempts) == 2)
    finally:
        watcher.stop()


async def test_sighup_fires_at_once_even_without_a_change(config_file: Path) -> None:
    calls = Calls()
    # Polling off: only the signal can cause the call.
    watcher = ConfigWatcher(config_file, calls, interval=0)
    watcher.start()
    try:
        # Without the handler SIGHUP would end the test process.
        assert watcher.handles_sighup
        os.kill(os.getpid(), signal.SIGHUP)
        await calls.next()
        os.kill(os.getpid(), signal.SIGHUP)
        await calls.next()
        assert calls.count == 2
    finally:
        watcher.stop()


async def test_sighup_takes_the_change_so_the_poll_does_not_repeat_it(
    config_file: Path,
) -> None:
    calls = Calls()
    watcher = ConfigWatcher(config_file, calls, interval=INTERVAL)
    watcher.start()
    try:
        assert watcher.handles_sighup
        config_file.write_text("services: []\nroutes: []\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await calls.next()
        polls = watcher.polls
        await until(lambda: watcher.polls >= polls + 5)
        # The poll needs two sightings of the new file; SIGHUP took it first.
        assert calls.count == 1
    finally:
        watcher.stop()
