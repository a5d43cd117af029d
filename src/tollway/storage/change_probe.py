"""Whether anything was committed to a SQLite database since the last look.

The change feed polls its outbox four times a second so that a revoked key stops
working within a second. On SQLite one poll through the async engine costs about
2 ms of CPU: aiosqlite runs each step (pool pre-ping, BEGIN, SELECT, ROLLBACK) on
its own thread and wakes the event loop for every one. An idle gateway spent 0.75 %
of a core on it, and a busy one lost as much throughput.

`PRAGMA data_version` answers the question for a few microseconds: "the integer
values returned by two invocations ... from the same connection will be different
if changes were committed to the database by any other connection in the
interim" (SQLite's documentation). So the probe keeps one read-only connection of
its own, which never writes, and asks it on the event loop's thread; a poll runs
only when the value moved. The stdlib `sqlite3` module is the right tool here: the
question is one C call, and going through the async engine is what costs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote


class DataVersionProbe:
    """`version()` moves whenever another connection commits to the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def version(self) -> int | None:
        """The file's data version; None when SQLite cannot say at once (poll then)."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            row = self._conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            # Locked for a WAL recovery, the file gone, anything: the caller polls,
            # and the next call opens a fresh connection.
            self.close()
            return None
        return int(row[0]) if row is not None else None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        # Never wait on the event loop's thread: a busy file means "poll".
        conn.execute("PRAGMA busy_timeout=0")
        return conn
