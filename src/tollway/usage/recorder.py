"""The usage recorder: a bounded in-memory queue, written to the database in batches.

`record(event)` is what a request's log phase calls. It appends to a deque and
returns: no await, no lock, no I/O, nothing that raises, so a slow or dead
database never slows a request. The queue has a bound (`usage_queue_size`): past
it the OLDEST event is dropped and counted in `dropped`, so memory stays bounded
and the newest activity is what survives an outage.

A background task (started by `start()` on the running loop) takes batches of up
to `usage_batch_size` events: at once when a full batch is waiting, otherwise
every `usage_flush_interval` seconds. Each batch is written by writer.py in one
transaction (raw rows plus rollups). When the database fails or stalls, the batch
is kept and retried with capped exponential backoff (0.1 s doubling to 5 s, with
jitter so that workers do not retry in step) while the queue keeps absorbing new
events up to its bound: nothing is lost silently; everything is either written,
or pending, or counted as dropped.

Timeouts. On PostgreSQL each write attempt is bounded by `write_timeout` (a stalled
network must not hang the writer forever); an abandoned attempt is safe to retry
because the batch keeps its sequence ids (writer.py). A stalled attempt's
connection is closed hard rather than cancelled: asyncpg cancels a query with a
CancelRequest on a new connection, and closes the old one only once that request is
answered, with no bound on the wait. On a network that drops the request the
attempt never ended, and its transaction stayed open on the server, so every retry
of the batch timed out waiting on it (seen in the fault tests: no usage written for
as long as the dead cancel connection stayed open). A hard close reaches the server
as soon as the network does, and the server rolls the transaction back.

On SQLite an attempt is not cancelled: aiosqlite runs it in a thread that would
finish the COMMIT anyway, leaving its outcome unknown; SQLite cannot stall on a
network, and its own busy_timeout (10 s) bounds a wait for the write lock, after
which the attempt fails cleanly and is retried.

A batch the database refuses for its content (a value it cannot store, though
writer.event_row makes that unlikely) is split in halves until the refused event
is alone; that one is dropped, counted and logged, and the rest is written. An
event that is not a usage event at all is dropped the same way when its batch is
prepared.

`stop(grace)` writes everything still queued, without waiting for the interval,
for up to `grace` seconds; whatever is still unwritten then is counted as dropped
(and logged). Records arriving after stop are counted as dropped too.

Memory: at most `usage_queue_size` queued events plus the one batch being written.

Retention (retention.py) runs from here: 60 s after start, then hourly, in every
worker (its chunked deletes are idempotent, so several purgers only repeat a probe).

Counters, read by the metrics flusher through `counters()`: `written`, `dropped`,
`pending` (queued plus in the batch being written), `write_errors` (failed
attempts). After stop, recorded == written + dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from typing import Any

import structlog

from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.usage.events import UsageEvent
from tollway.usage.retention import ROLLUP_RETENTION_DAYS, purge_usage
from tollway.usage.writer import Batch, Row, event_row, is_poison, write_batch

log = structlog.get_logger("tollway.usage")

WRITE_TIMEOUT = 10.0
RETRY_INITIAL = 0.1
RETRY_MAX = 5.0
# While stopping, retries come faster: the grace period is short.
RETRY_MAX_STOPPING = 0.5
PURGE_INTERVAL = 3600.0
PURGE_FIRST_DELAY = 60.0
PURGE_TIMEOUT = 600.0
# After a write attempt timed out and its connection was closed (or, before it had
# one, it was cancelled), how long its cleanup may take before the writer cancels it
# (again) and, after as long once more, stops waiting for it.
CANCEL_GRACE = 5.0


class WriteTimeout(Exception):
    pass


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` up to `seconds`.

    Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives
    as the event is set (stop() does exactly that: set the wake event, and cancel
    when the grace period ends), and the writer would run on past its stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()


def _end_attempt(task: asyncio.Task[bool], connections: list[Any]) -> None:
    """Stop a write attempt: close its connection hard (the module docstring says
    why not a cancellation), or cancel it while it has none yet."""
    if task.done():
        return
    task.add_done_callback(_retrieve)
    if connections:
        for driver in connections:
            driver.terminate()
    else:
        task.cancel()


def _retrieve(task: asyncio.Task[bool]) -> None:
    # The attempt already counted as failed; its own ending error (the connection
    # it was told to drop is closed) is expected and not worth a log line.
    if not task.cancelled():
        task.exception()


class UsageRecorder:
    def __init__(
        self,
        database: Database,
        settings: Settings,
        *,
        write_timeout: float = WRITE_TIMEOUT,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        purge_interval: float | None = PURGE_INTERVAL,
        purge_first_delay: float = PURGE_FIRST_DELAY,
        rollup_retention_days: int = ROLLUP_RETENTION_DAYS,
    ) -> None:
        self.database = database
        self.settings = settings
        self.write_timeout = write_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.purge_interval = purge_interval  # None: no periodic purge
        self.purge_first_delay = purge_first_delay
        self.rollup_retention_days = rollup_retention_days

        self._limit = settings.usage_queue_size
        # A batch can never be larger than the queue, or a full queue would wait
        # for the interval (dropping meanwhile) instead of being written at once.
        self._batch_size = min(settings.usage_batch_size, settings.usage_queue_size)
        self._interval = settings.usage_flush_interval
        self._queue: deque[UsageEvent] = deque()
        # Taken off the queue, not yet written, oldest first (a split makes two).
        self._work: deque[Batch] = deque()

        self.recorded = 0
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self.purged_records = 0
        self.purged_hourly = 0

        self._wake: asyncio.Event | None = None
        self._stop_requested: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._purge_task: asyncio.Task[None] | None = None
        # Cancelled attempts whose cleanup outlived CANCEL_GRACE; kept referenced.
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._closed = False
        self._next_flush = 0.0

    # Hot path -------------------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        """Queue one event. Never blocks, never raises."""
        self.recorded += 1
        if self._closed:
            self.dropped += 1
            return
        queue = self._queue
        if len(queue) >= self._limit:
            queue.popleft()
            self.dropped += 1
        queue.append(event)
        if len(queue) >= self._batch_size and self._wake is not None:
            self._wake.set()

    # Counters -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._queue) + sum(len(batch) for batch in self._work)

    def counters(self) -> dict[str, int]:
        """What the metrics flusher reads: cumulative counts plus the pending gauge."""
        return {
            "written": self.written,
            "dropped": self.dropped,
            "pending": self.pending,
            "write_errors": self.write_errors,
        }

    # Lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer (and the periodic purge) on the running loop."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._task = loop.create_task(self._run(), name="tollway-usage-writer")
        if self.purge_interval is not None:
            self._purge_task = loop.create_task(self._purge_loop(), name="tollway-usage-purge")

    async def stop(self, grace: float) -> None:
        """Write what is queued, for up to `grace` seconds; count the rest as dropped."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._stop_requested is not None:
            self._stop_requested.set()
        if self._purge_task is not None:
            self._purge_task.cancel()
            # A purge stuck on a dead connection must not hold the shutdown.
            await asyncio.wait({self._purge_task}, timeout=CANCEL_GRACE)
            self._purge_task = None
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=max(grace, 0))
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_GRACE)
                if not task.done():
                    # Cannot happen unless something swallows the cancellation; the
                    # writer then sees _closed and ends at its next step.
                    log.error("usage writer did not stop when cancelled")
            elif not task.cancelled() and task.exception() is not None:
                log.error("usage writer failed", error=repr(task.exception()))
            self._task = None
        self._closed = True
        lost = self.pending
        if lost:
            self.dropped += lost
            self._queue.clear()
            self._work.clear()
            log.error(
                "usage records not written before shutdown; counted as dropped",
                dropped=lost,
                grace_s=grace,
            )

    # Writer ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        self._next_flush = loop.time() + self._interval
        failures = 0
        while True:
            try:
                step = await self._step(loop)
            except Exception as exc:  # noqa: BLE001 (a bug here must not stop usage writing)
                log.error("usage writer step failed", error=repr(exc))
                step = False
            if step is None:
                return
            if step:
                failures = 0
            else:
                failures += 1
                await self._backoff(failures)

    async def _step(self, loop: asyncio.AbstractEventLoop) -> bool | None:
        """Wait for work or write one batch: True when progress was made, False on a
        failed attempt (back off), None when stopping and everything is written."""
        assert self._wake is not None
        if self._closed:
            return None
        if not self._work:
            queued = len(self._queue)
            due = loop.time() >= self._next_flush
            if queued >= self._batch_size or (queued and (due or self._stopping)):
                self._take()
                self._next_flush = loop.time() + self._interval
            elif self._stopping:
                return None
            else:
                if due:
                    self._next_flush = loop.time() + self._interval
                self._wake.clear()
                await _wait(self._wake, self._next_flush - loop.time())
                return True
        if not self._work:  # every event of the batch was unusable
            return True
        return await self._write_first()

    def _take(self) -> None:
        """Move up to one batch from the queue into the work list, as insertable rows."""
        queue = self._queue
        rows: list[Row] = []
        for _ in range(min(self._batch_size, len(queue))):
            event = queue.popleft()
            try:
                rows.append(event_row(event))
            except Exception as exc:  # noqa: BLE001 (whatever it is, it cannot be stored)
                self.dropped += 1
                log.error("unusable usage event dropped", usage_event=repr(event)[:500],
                          error=repr(exc))
        if rows:
            self._work.append(Batch(rows))

    async def _write_first(self) -> bool:
        """One attempt at the oldest batch; True when it is done with (written or split)."""
        batch = self._work[0]
        try:
            wrote = await self._attempt(batch)
        except Exception as exc:  # noqa: BLE001 (any failure: keep the batch, retry)
            batch.attempts += 1
            self.write_errors += 1
            if is_poison(exc):
                self._isolate(batch, exc)
                return True
            log.warning(
                "usage batch write failed; kept for retry",
                rows=len(batch),
                attempt=batch.attempts,
                pending=self.pending,
                error=repr(exc),
            )
            return False
        self._work.popleft()
        self.written += len(batch)
        if not wrote:
            log.info("usage batch found written by an earlier attempt", rows=len(batch))
        return True

    def _isolate(self, batch: Batch, exc: BaseException) -> None:
        self._work.popleft()
        if len(batch) > 1:
            left, right = batch.split()
            self._work.appendleft(right)
            self._work.appendleft(left)
            return
        self.dropped += 1
        log.error("usage record refused by the database; dropped",
                  row=repr(batch.rows[0])[:1000], error=repr(exc))

    async def _attempt(self, batch: Batch) -> bool:
        if self.database.is_sqlite:
            return await write_batch(self.database, batch)
        connections: list[Any] = []
        task = asyncio.ensure_future(write_batch(self.database, batch, connections))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.write_timeout)
        except asyncio.CancelledError:
            _end_attempt(task, connections)
            raise
        if done:
            return task.result()
        _end_attempt(task, connections)
        for _ in range(2):
            done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE)
            if done:
                break
            # Still stuck: in a pool pre-ping or a connect, which asyncpg also ends
            # through a CancelRequest. A second cancellation makes SQLAlchemy give
            # up its graceful close and close the connection hard.
            task.cancel()
        else:
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
        raise WriteTimeout(f"usage write took over {self.write_timeout} s")

    async def _backoff(self, failures: int) -> None:
        cap = RETRY_MAX_STOPPING if self._stopping else self.retry_max
        delay = min(cap, self.retry_initial * 2 ** min(failures - 1, 30))
        delay *= random.uniform(0.75, 1.0)  # jitter, not security
        assert self._stop_requested is not None
        if self._stopping:
            await asyncio.sleep(delay)
            return
        # A stop request cuts the wait short: the grace period is for writing.
        await _wait(self._stop_requested, delay)

    # Retention ------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        assert self.purge_interval is not None
        await asyncio.sleep(self.purge_first_delay)
        while True:
            try:
                # Bounded: a purge stuck on a stalled connection would hold a pooled
                # connection for good; the next run starts over (deletes are idempotent).
                async with asyncio.timeout(PURGE_TIMEOUT):
                    result = await purge_usage(
                        self.database,
                        retention_days=self.settings.usage_retention_days,
                        rollup_retention_days=self.rollup_retention_days,
                    )
            except Exception as exc:  # noqa: BLE001 (logged; the next run retries)
                log.warning("usage purge failed; next run at the next interval",
                            error=repr(exc))
            else:
                self.purged_records += result.records
                self.purged_hourly += result.hourly
                if result.records or result.hourly:
                    log.info("usage purged", records=result.records, hourly=result.hourly)
            await asyncio.sleep(self.purge_interval)
