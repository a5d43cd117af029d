"""Notice that tollway.yaml changed and tell the server, which rebuilds and swaps.

The file is polled rather than watched with inotify: polling works on every
filesystem (NFS, overlay, FUSE), and in containers inotify events are lost on bind
mounts and when an editor or a ConfigMap replaces the file by an atomic rename.
One stat per interval costs nothing next to the traffic the gateway carries.

A change is acted on only once the file's (mtime_ns, size, inode) has been seen
unchanged on two consecutive polls, so that a file still being written is less
likely to be read; the loader's validation rejects the rest. SIGHUP acts at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """(mtime_ns, size, inode), or None while the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigWatcher:
    """Calls `on_change()` once per settled change of `path`, and on every SIGHUP.

    `on_change` runs on the loop, synchronously; whatever it raises is logged and
    swallowed so that a bad reload never takes the loop down. `interval` 0 turns
    polling off (SIGHUP still works).
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None],
        *,
        interval: float = 1.0,
        handle_sighup: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._want_sighup = handle_sighup
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._acted: Signature | None = None
        self._pending: Signature | None = None
        self._sighup_installed = False
        self._running = False
        self.polls = 0
        self.changes = 0

    @property
    def handles_sighup(self) -> bool:
        return self._sighup_installed

    def start(self) -> None:
        """Take the file as it is now as the baseline and begin watching."""
        if self._running:
            return
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        self._running = True
        self._acted = file_signature(self.path)
        self._pending = None
        if self._want_sighup:
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup_installed = True
            except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
                # Windows, or a loop outside the main thread: polling still works.
                log.warning("config reload on SIGHUP unavailable: %s", exc)
        self._schedule()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sighup_installed and self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._sighup_installed = False

    def _schedule(self) -> None:
        if self._running and self.interval > 0 and self._loop is not None:
            self._timer = self._loop.call_later(self.interval, self._poll)

    def _poll(self) -> None:
        try:
            self.polls += 1
            current = file_signature(self.path)
            if current is None or current == self._acted:
                # A missing file is mid-replace or gone: nothing to load yet.
                self._pending = None
            elif current == self._pending:
                self._acted = current
                self._pending = None
                self._fire("file changed")
            else:
                self._pending = current
        except Exception:  # the loop must outlive any failure here
            log.exception("config watcher poll failed")
        finally:
            self._schedule()

    def _on_sighup(self) -> None:
        self._acted = file_signature(self.path)
        self._pending = None
        self._fire("SIGHUP")

    def _fire(self, reason: str) -> None:
        self.changes += 1
        log.info("config reload requested (%s): %s", reason, self.path)
        try:
            self._on_change()
        except Exception:  # a failed reload keeps the old config serving
            log.exception("config reload callback failed")
