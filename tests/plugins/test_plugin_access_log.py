from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from plugin_helpers import build_ctx
from pydantic import ValidationError

from tollway.gateway.context import RequestContext
from tollway.plugins import access_log, access_log_engine
from tollway.plugins.access_log import FIELDS, AccessLog, AccessLogConfig


def plugin(path: Path | str, **cfg: object) -> AccessLog:
    return AccessLog(AccessLogConfig.model_validate({"path": str(path), **cfg}))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def finished_ctx(**kw: Any) -> RequestContext:
    ctx = build_ctx(
        "POST",
        path="/v1/images",
        query=b"token=secret",
        headers=[(b"user-agent", b"curl/8.5 \xe9")],
        client_ip="198.51.100.4",
        request_id="rid-log",
        **kw,
    )
    ctx.route = SimpleNamespace(name="images", service=SimpleNamespace(name="gen"))  # type: ignore[assignment]
    ctx.consumer = SimpleNamespace(id="user-42")
    ctx.status = 201
    ctx.bytes_in = 120
    ctx.bytes_out = 5000
    ctx.start = 100.0
    ctx.upstream_addr = "10.0.0.5:9000"
    ctx.upstream_start = 100.010
    ctx.upstream_headers_at = 100.250
    ctx.finished_at = 100.300
    ctx.started_at = 1767225600.5  # 2026-01-01T00:00:00.5Z
    return ctx


def test_one_json_line_with_every_field(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    p = plugin(out)
    try:
        p.log(finished_ctx())  # no running loop: written at once
        [rec] = lines(out)
    finally:
        p.close()
    assert list(rec) == list(FIELDS)
    assert rec == {
        "time": "2026-01-01T00:00:00.500Z",
        "request_id": "rid-log",
        "client_ip": "198.51.100.4",
        "method": "POST",
        "path": "/v1/images",
        "has_query": True,
        "status": 201,
        "route": "images",
        "service": "gen",
        "upstream": "10.0.0.5:9000",
        "latency_ms": 300.0,
        "upstream_latency_ms": 240.0,
        "bytes_in": 120,
        "bytes_out": 5000,
        "user_agent": "curl/8.5 \xe9",
        "consumer": "user-42",
        "aborted": None,
    }
    assert "secret" not in out.read_text()


def test_gateway_answer_without_upstream(tmp_path: Path) -> None:
    out = tmp_path / "a.log"
    p = plugin(out, drop_fields=["user_agent", "bytes_in"])
    ctx = build_ctx(request_id="r2")
    ctx.status = 404
    ctx.aborted = "client_reset"
    p.log(ctx)
    p.close()
    [rec] = lines(out)
    assert "user_agent" not in rec and "bytes_in" not in rec
    assert rec["upstream_latency_ms"] is None
    assert rec["upstream"] is None and rec["route"] is None and rec["service"] is None
    assert rec["consumer"] is None
    assert rec["has_query"] is False
    assert rec["aborted"] == "client_reset"
    assert rec["latency_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])


async def test_lines_are_buffered_on_the_loop_and_flushed_later(tmp_path: Path) -> None:
    out = tmp_path / "b.log"
    p = plugin(out)
    try:
        for _ in range(3):
            p.log(finished_ctx())
        assert out.read_text() == ""
        writer = access_log_engine.WRITERS[str(out)]
        timer = writer._timer
        assert timer is not None
        assert timer.when() - asyncio.get_running_loop().time() <= access_log.FLUSH_SECONDS
        p.flush()
        assert len(lines(out)) == 3
        assert writer._timer is None
    finally:
        p.close()


async def test_a_full_buffer_is_written_without_waiting(tmp_path: Path) -> None:
    out = tmp_path / "c.log"
    p = plugin(out)
    try:
        n = access_log.FLUSH_BYTES // 300 + 10
        for _ in range(n):
            p.log(finished_ctx())
        written = len(lines(out))
        assert 0 < written < n
    finally:
        p.close()
    assert len(lines(out)) == n


def test_one_writer_shared_across_snapshots(tmp_path: Path) -> None:
    out = tmp_path / "d.log"
    old = plugin(out)
    new = plugin(str(tmp_path / "." / "d.log"))
    assert old._engine.writer is new._engine.writer
    old.log(finished_ctx())
    old.close()  # the old snapshot retires; the new one keeps writing
    new.log(finished_ctx())
    new.close()
    assert len(lines(out)) == 2
    assert str(out) not in access_log_engine.WRITERS
    new.log(finished_ctx())  # after close: dropped, no error


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    p = plugin("-")
    p.log(finished_ctx())
    p.close()
    rec = json.loads(capsys.readouterr().out)
    assert rec["request_id"] == "rid-log"


@pytest.mark.parametrize(
    "cfg", [{"drop_fields": ["nope"]}, {"path": "/nonexistent-dir/x.log"}, {"fields": []}]
)
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AccessLogConfig.model_validate(cfg)
