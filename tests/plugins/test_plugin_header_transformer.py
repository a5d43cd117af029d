from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, head
from pydantic import ValidationError

from tollway.plugins.header_transformer import (
    RequestTransformer,
    RequestTransformerConfig,
    ResponseTransformer,
    ResponseTransformerConfig,
)


def req(**cfg: object) -> RequestTransformer:
    return RequestTransformer(RequestTransformerConfig.model_validate(cfg))


def resp(**cfg: object) -> ResponseTransformer:
    return ResponseTransformer(ResponseTransformerConfig.model_validate(cfg))


def test_request_header_operations_in_kong_order() -> None:
    p = req(
        remove={"headers": ["Cookie", "X-Debug"]},
        rename={"headers": ["X-Old:X-New", "X-Token:Authorization"]},
        replace={"headers": ["User-Agent:tollway", "X-Absent:nope"]},
        add={"headers": {"X-Tenant": "acme", "User-Agent": "ignored"}},
        append={"headers": ["Via:tollway", "X-Forwarded-Proto:https"]},
    )
    ctx = build_ctx(
        headers=[
            (b"cookie", b"sid=1"),
            (b"x-debug", b"1"),
            (b"x-old", b"o"),
            (b"authorization", b"Bearer client"),
            (b"x-token", b"Bearer mapped"),
            (b"user-agent", b"curl/8"),
            (b"via", b"1.1 cdn"),
        ]
    )
    assert p.access(ctx) is None
    assert ctx.headers == [
        (b"x-new", b"o"),
        (b"authorization", b"Bearer mapped"),
        (b"user-agent", b"tollway"),
        (b"via", b"1.1 cdn"),
        (b"x-tenant", b"acme"),
        (b"via", b"tollway"),
        (b"x-forwarded-proto", b"https"),
    ]


def test_request_querystring_operations() -> None:
    p = req(
        remove={"querystring": ["debug"]},
        rename={"querystring": ["q:search"]},
        replace={"querystring": ["page:1", "missing:x"]},
        add={"querystring": ["api version:v 2", "sort:ignored"]},
        append={"querystring": ["tag:a&b"]},
    )
    ctx = build_ctx(query=b"q=caf%C3%A9&debug=1&page=7&sort=-date&page=8&&x=%2F")
    p.access(ctx)
    assert ctx.query == b"search=caf%C3%A9&page=1&sort=-date&&x=%2F&api%20version=v%202&tag=a%26b"


def test_querystring_add_on_empty_query_and_encoded_names() -> None:
    p = req(add={"querystring": ["key:v"]}, remove={"querystring": ["secret"]})
    ctx = build_ctx(query=b"")
    p.access(ctx)
    assert ctx.query == b"key=v"
    ctx = build_ctx(query=b"%73ecret=1&keep=2")
    p.access(ctx)
    assert ctx.query == b"keep=2&key=v"


def test_empty_config_changes_nothing() -> None:
    ctx = build_ctx(query=b"a=1&a=2", headers=[(b"x", b"1")])
    req().access(ctx)
    assert (ctx.query, ctx.headers) == (b"a=1&a=2", [(b"x", b"1")])


def test_response_header_operations() -> None:
    p = resp(
        remove={"headers": ["Server", "X-Powered-By"]},
        rename={"headers": ["X-Internal-Id:X-Request-Ref"]},
        replace={"headers": ["Cache-Control:no-store"]},
        add={"headers": ["X-Frame-Options:DENY", "Content-Type:text/plain"]},
        append={"headers": ["Set-Cookie:region=eu"]},
    )
    h = head(
        200,
        [
            (b"server", b"nginx"),
            (b"content-type", b"application/json"),
            (b"x-internal-id", b"42"),
            (b"cache-control", b"public"),
            (b"set-cookie", b"a=1"),
        ],
    )
    p.response_headers(build_ctx(), h)
    assert h.headers == [
        (b"content-type", b"application/json"),
        (b"x-request-ref", b"42"),
        (b"cache-control", b"no-store"),
        (b"set-cookie", b"a=1"),
        (b"x-frame-options", b"DENY"),
        (b"set-cookie", b"region=eu"),
    ]


def test_response_transformer_applies_to_gateway_made_responses() -> None:
    p = resp(add={"headers": ["X-Served-By:tollway"]})
    h = head(403, [(b"content-type", b"application/json")], from_gateway=True)
    p.response_headers(build_ctx(), h)
    assert (b"x-served-by", b"tollway") in h.headers


@pytest.mark.parametrize(
    "cfg",
    [
        {"add": {"headers": ["no-colon"]}},
        {"add": {"headers": ["Bad Name:x"]}},
        {"add": {"headers": ["X-A:a\r\nInjected: 1"]}},
        {"remove": {"headers": ["Content-Length"]}},
        {"replace": {"headers": ["Transfer-Encoding:identity"]}},
        {"rename": {"headers": ["X-A:bad name"]}},
        {"add": {"body": ["a:b"]}},
    ],
)
def test_bad_response_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ResponseTransformerConfig.model_validate(cfg)


def test_bad_request_config_is_rejected() -> None:
    with pytest.raises(ValidationError):
        RequestTransformerConfig.model_validate({"add": {"querystring": [":v"]}})
