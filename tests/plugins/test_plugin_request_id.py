from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import build_ctx as make_ctx
from plugin_helpers import head
from pydantic import ValidationError

from tollway.gateway.ids import new_request_id
from tollway.plugins.request_id import RequestId, RequestIdConfig


def plugin(**cfg: object) -> RequestId:
    return RequestId(RequestIdConfig.model_validate(cfg))


def test_well_formed_client_id_is_kept_forwarded_and_echoed() -> None:
    p = plugin()
    ctx = make_ctx(headers=[(b"x-request-id", b"abc-123:xyz.9_")])
    assert p.access(ctx) is None
    assert ctx.request_id == "abc-123:xyz.9_"
    assert ctx.headers == [(b"x-request-id", b"abc-123:xyz.9_")]
    h = head(headers=[(b"x-request-id", b"upstream-own")])
    p.response_headers(ctx, h)
    assert h.headers == [(b"x-request-id", b"abc-123:xyz.9_")]


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"has space",
        b"a" * 129,
        b"semi;colon",
        b"\xff\xfe",
        b"caf\xc3\xa9",
        b"<script>",
    ],
)
def test_malformed_client_id_is_replaced(bad: bytes) -> None:
    p = plugin()
    ctx = make_ctx(headers=[(b"x-request-id", bad), (b"x-request-id", b"second")])
    p.access(ctx)
    assert ctx.request_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}", ctx.request_id)
    # The client's header (all copies) is replaced by the gateway's id upstream.
    assert ctx.headers == [(b"x-request-id", ctx.request_id.encode())]


def test_id_generated_when_absent_and_ids_are_unique() -> None:
    p = plugin()
    ids = set()
    for _ in range(5000):
        ctx = make_ctx()
        p.access(ctx)
        ids.add(ctx.request_id)
    assert len(ids) == 5000


def test_forked_child_uses_another_prefix() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    assert len(child_id) == 32
    assert child_id[:20] != new_request_id()[:20]


def test_custom_header_pattern_and_no_echo() -> None:
    p = plugin(header_name="X-Correlation-ID", pattern=r"[0-9]{4}", echo_downstream=False)
    ctx = make_ctx(headers=[(b"x-correlation-id", b"1234")])
    p.access(ctx)
    assert ctx.request_id == "1234"
    h = head()
    p.response_headers(ctx, h)
    assert h.headers == []

    ctx = make_ctx(headers=[(b"x-correlation-id", b"12345")])
    p.access(ctx)
    assert ctx.request_id != "12345"


def test_echo_on_gateway_made_response() -> None:
    p = plugin()
    ctx = make_ctx()
    p.access(ctx)
    h = head(404, from_gateway=True)
    p.response_headers(ctx, h)
    assert h.headers == [(b"x-request-id", str(ctx.request_id).encode())]


@pytest.mark.parametrize("cfg", [{"pattern": "(["}, {"header_name": "bad header"}, {"x": 1}])
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RequestIdConfig.model_validate(cfg)
