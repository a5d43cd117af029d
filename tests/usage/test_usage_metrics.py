"""Usage recorder counters as a scraper sees them on /metrics, in one or many processes."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from usage_helpers import event, until, usage_settings

from support.gateway import free_port
from tollway.observability.metrics import (
    GatewayMetrics,
    render_latest,
    setup_multiprocess,
    worker_exited,
)
from tollway.storage.database import Database
from tollway.usage.recorder import UsageRecorder

WRITTEN = "tollway_usage_records_written_total"
DROPPED = "tollway_usage_records_dropped_total"
ERRORS = "tollway_usage_write_errors_total"
DEPTH = "tollway_usage_queue_depth"


def scrape() -> dict[str, float]:
    body, _ = render_latest()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name.startswith("tollway_usage_")
    }


def test_counters_export_what_changed_since_the_last_flush() -> None:
    # The in-process registry is shared by the whole test run: compare with before.
    before = scrape()
    stats = {"written": 0, "dropped": 0, "pending": 0, "write_errors": 0}
    m = GatewayMetrics()
    m.set_usage_stats_source(lambda: dict(stats))
    stats.update(written=1000, dropped=3, pending=250, write_errors=2)
    m.flush()
    after = scrape()
    assert after[WRITTEN] - before.get(WRITTEN, 0) == 1000
    assert after[DROPPED] - before.get(DROPPED, 0) == 3
    assert after[ERRORS] - before.get(ERRORS, 0) == 2
    assert after[DEPTH] == 250

    # A second flush adds only the difference.
    stats.update(written=1500, pending=0)
    m.flush()
    again = scrape()
    assert again[WRITTEN] - before.get(WRITTEN, 0) == 1500
    assert again[DROPPED] - before.get(DROPPED, 0) == 3
    assert again[DEPTH] == 0


async def test_a_real_recorder_feeds_the_metrics(database: Database) -> None:
    before = scrape()
    recorder = UsageRecorder(database, usage_settings(usage_queue_size=50), purge_interval=None)
    m = GatewayMetrics()
    m.set_usage_stats_source(recorder.counters)
    for n in range(60):
        recorder.record(event(n))
    m.flush()
    assert scrape()[DEPTH] == 50
    recorder.start()
    await until(lambda: recorder.written == 50, what="50 written")
    await recorder.stop(5)
    m.flush()
    after = scrape()
    assert after[WRITTEN] - before.get(WRITTEN, 0) == 50
    assert after[DROPPED] - before.get(DROPPED, 0) == 10
    assert after[DEPTH] == 0


async def test_write_errors_are_counted() -> None:
    database = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    before = scrape()
    recorder = UsageRecorder(database, usage_settings(), retry_max=0.05, purge_interval=None)
    m = GatewayMetrics()
    m.set_usage_stats_source(recorder.counters)
    recorder.start()
    try:
        recorder.record(event(1))
        await until(lambda: recorder.write_errors >= 2, what="failed attempts")
        m.flush()
        assert scrape()[ERRORS] - before.get(ERRORS, 0) >= 2
        assert scrape()[DEPTH] == 1
    finally:
        await recorder.stop(0)
        await database.dispose()


@pytest.fixture
def multiprocess_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "metrics"
    setup_multiprocess(directory)
    try:
        yield directory
    finally:
        setup_multiprocess(None)


def _worker(written: int, pending: int) -> None:
    m = GatewayMetrics()
    m.set_usage_stats_source(
        lambda: {"written": written, "dropped": 1, "pending": pending, "write_errors": 0}
    )
    m.flush()


def test_multiprocess_mode_sums_the_workers(multiprocess_dir: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=args) for args in ((300, 7), (200, 5))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    samples = scrape()
    assert samples[WRITTEN] == 500
    assert samples[DROPPED] == 2
    assert samples[DEPTH] == 12

    for w in workers:
        assert w.pid is not None
        worker_exited(w.pid)
    # A dead worker's queue is gone from the depth; its counts stay counted.
    samples = scrape()
    assert samples.get(DEPTH, 0) == 0
    assert samples[WRITTEN] == 500
