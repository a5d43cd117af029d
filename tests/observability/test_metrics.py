"""GatewayMetrics as a scraper sees it: through the /metrics exposition text."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tollway.observability.metrics import (
    LATENCY_BUCKETS,
    GatewayMetrics,
    render_latest,
    setup_multiprocess,
    worker_exited,
)


def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = render_latest()
    assert content_type.startswith("text/plain")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(name: str, **labels: str) -> float | None:
    return scrape().get((name, frozenset(labels.items())))


def unique(prefix: str) -> str:
    # The default registry is process-wide; unique labels keep tests independent.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_requests_reach_the_exposition_only_after_flush() -> None:
    m = GatewayMetrics()
    route, service = unique("route"), unique("svc")
    for _ in range(3):
        m.request(route, service, 200, 0.02, 0.015)
    m.request(route, service, 502, 0.5, None)

    assert value("tollway_requests_total", route=route, service=service, status="200") is None
    m.flush()

    assert value("tollway_requests_total", route=route, service=service, status="200") == 3
    assert value("tollway_requests_total", route=route, service=service, status="502") == 1
    # Nothing is counted twice by a second flush.
    m.flush()
    assert value("tollway_requests_total", route=route, service=service, status="200") == 3


def test_histograms_expose_cumulative_buckets_sum_and_count() -> None:
    m = GatewayMetrics()
    route, service = unique("route"), unique("svc")
    durations = [0.0005, 0.001, 0.02, 0.02, 0.3, 7.0, 1000.0]
    for d in durations:
        m.request(route, service, 200, d, d / 2)
    m.request(route, service, 504, 0.01, None)
    m.flush()

    samples = scrape()
    expected = [*durations, 0.01]
    name = "tollway_request_duration_seconds"
    for bound in LATENCY_BUCKETS:
        le = str(bound)
        got = samples[(f"{name}_bucket", frozenset({("route", route), ("le", le)}))]
        assert got == sum(1 for d in expected if d <= bound), le
    assert samples[(f"{name}_bucket", frozenset({("route", route), ("le", "+Inf")}))] == 8
    assert samples[(f"{name}_count", frozenset({("route", route)}))] == 8
    assert samples[(f"{name}_sum", frozenset({("route", route)}))] == pytest.approx(sum(expected))

    # The upstream histogram only counts requests that reached an upstream.
    up = "tollway_upstream_duration_seconds"
    assert samples[(f"{up}_count", frozenset({("service", service)}))] == 7
    assert samples[(f"{up}_sum", frozenset({("service", service)}))] == pytest.approx(
        sum(durations) / 2
    )


def test_gauges_counters_and_pool_stats() -> None:
    m = GatewayMetrics()
    target_a, target_b = unique("10.0.0.1:80"), unique("10.0.0.2:80")
    code = unique("upstream_timeout")
    pools = {target_a: (3, 1), target_b: (0, 2)}
    m.set_pool_stats_source(lambda: dict(pools))
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.upstream_connection_opened(target_a)
    m.upstream_connection_opened(target_a)
    m.upstream_connection_closed(target_a)
    m.error(code)
    m.error(code)
    before_ok = value("tollway_config_reloads_total", result="success") or 0
    before_failed = value("tollway_config_reloads_total", result="failure") or 0
    m.reload(True)
    m.reload(False)
    m.reload(True)
    m.flush()

    assert value("tollway_open_connections") == 1
    assert value("tollway_upstream_connections_opened_total", target=target_a) == 2
    assert value("tollway_upstream_connections_closed_total", target=target_a) == 1
    assert value("tollway_gateway_errors_total", code=code) == 2
    assert value("tollway_config_reloads_total", result="success") == before_ok + 2
    assert value("tollway_config_reloads_total", result="failure") == before_failed + 1
    assert value("tollway_upstream_pool_connections", target=target_a, state="idle") == 3
    assert value("tollway_upstream_pool_connections", target=target_b, state="in_use") == 2

    # A target dropped by a reload stops counting.
    del pools[target_b]
    m.flush()
    assert value("tollway_upstream_pool_connections", target=target_b, state="in_use") == 0
    assert value("tollway_upstream_pool_connections", target=target_a, state="in_use") == 1


async def test_flusher_flushes_periodically_and_stop_flushes_the_rest() -> None:
    m = GatewayMetrics()
    route = unique("route")
    flushed = asyncio.Event()
    real_flush = m.flush

    def flush_and_signal() -> None:
        real_flush()
        flushed.set()

    m.flush = flush_and_signal  # type: ignore[method-assign]
    m.start_flusher(asyncio.get_running_loop(), interval=0.01)
    m.request(route, "svc", 200, 0.01, None)
    await asyncio.wait_for(flushed.wait(), timeout=5)
    assert value("tollway_requests_total", route=route, service="svc", status="200") == 1

    m.request(route, "svc", 200, 0.01, None)
    m.stop()
    assert value("tollway_requests_total", route=route, service="svc", status="200") == 2


@pytest.fixture
def multiprocess_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale file from a previous run")
    setup_multiprocess(directory)
    try:
        yield directory
    finally:
        setup_multiprocess(None)


def _worker(requests: int) -> None:
    m = GatewayMetrics()
    for _ in range(requests):
        m.request("/v1/images", "images", 200, 0.02, 0.01)
    m.connection_opened()
    m.flush()


def test_multiprocess_mode_sums_the_workers(multiprocess_dir: Path) -> None:
    assert not (multiprocess_dir / "counter_999999.db").exists()

    parent = GatewayMetrics()
    # Pending in the parent at fork time: counted once, by the parent.
    parent.request("/v1/images", "images", 200, 0.02, None)

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(n,)) for n in (3, 4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    parent.flush()

    labels = {"route": "/v1/images", "service": "images", "status": "200"}
    assert value("tollway_requests_total", **labels) == 8
    assert value("tollway_request_duration_seconds_count", route="/v1/images") == 8
    hist = "tollway_request_duration_seconds"
    assert value(f"{hist}_bucket", route="/v1/images", le="0.01") == 0
    assert value(f"{hist}_bucket", route="/v1/images", le="0.025") == 8
    assert value(f"{hist}_sum", route="/v1/images") == pytest.approx(8 * 0.02)
    assert value("tollway_upstream_duration_seconds_count", service="images") == 7
    assert value("tollway_open_connections") == 2

    for w in workers:
        assert w.pid is not None
        worker_exited(w.pid)
    # Live gauges of dead workers are dropped; their counters are kept.
    assert value("tollway_open_connections") == 0
    assert value("tollway_requests_total", **labels) == 8
