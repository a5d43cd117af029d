from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, envelope_of
from pydantic import ValidationError

from tollway.gateway.context import Response
from tollway.plugins.request_size_limiting import (
    RequestSizeLimiting,
    RequestSizeLimitingConfig,
)


def plugin(**cfg: object) -> RequestSizeLimiting:
    return RequestSizeLimiting(RequestSizeLimitingConfig.model_validate(cfg))


@pytest.mark.parametrize(
    ("size", "limit"), [("10m", 10 * 1024 * 1024), ("512k", 512 * 1024), (4096, 4096)]
)
def test_sizes_are_parsed(size: object, limit: int) -> None:
    assert plugin(allowed_payload_size=size).config.allowed_payload_size == limit


def test_content_length_over_the_limit_is_refused_at_once() -> None:
    p = plugin(allowed_payload_size="1k")
    ctx = build_ctx("POST", content_length=1025, max_body_size=10_000, request_id="rid-s")
    resp = p.access(ctx)
    assert isinstance(resp, Response)
    assert resp.status == 413
    body = envelope_of(resp)
    assert body["error"] == {"code": "payload_too_large", "details": {"limit": 1024}}
    assert "1024" in body["message"]
    assert body["requestId"] == "rid-s"


def test_content_length_at_the_limit_passes_and_lowers_the_streaming_limit() -> None:
    p = plugin(allowed_payload_size="1k")
    ctx = build_ctx("POST", content_length=1024, max_body_size=10_000)
    assert p.access(ctx) is None
    assert ctx.max_body_size == 1024


def test_chunked_body_gets_a_lowered_max_body_size() -> None:
    p = plugin(allowed_payload_size="2k")
    ctx = build_ctx("POST", chunked=True, max_body_size=10 * 1024 * 1024)
    assert p.access(ctx) is None
    assert ctx.max_body_size == 2048


def test_never_raises_a_lower_server_limit() -> None:
    p = plugin(allowed_payload_size="10m")
    ctx = build_ctx("POST", chunked=True, max_body_size=1000)
    assert p.access(ctx) is None
    assert ctx.max_body_size == 1000


def test_require_content_length_refuses_chunked_bodies() -> None:
    p = plugin(allowed_payload_size="1m", require_content_length=True)
    resp = p.access(build_ctx("POST", chunked=True, request_id="rid-c"))
    assert isinstance(resp, Response)
    assert resp.status == 411
    assert envelope_of(resp)["error"]["code"] == "length_required"
    # A request without a body at all has nothing to measure.
    assert p.access(build_ctx("GET")) is None
    assert p.access(build_ctx("POST", content_length=10)) is None


@pytest.mark.parametrize("size", ["ten megs", -1, True, "1.5m"])
def test_bad_sizes_are_rejected(size: object) -> None:
    with pytest.raises(ValidationError):
        RequestSizeLimitingConfig.model_validate({"allowed_payload_size": size})
