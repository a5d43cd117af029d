from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, envelope_of, head
from pydantic import ValidationError

from tollway.gateway.context import RequestContext, Response, header_get
from tollway.plugins.cors import Cors, CorsConfig

SITE = b"https://studio.wildmindai.com"


def plugin(**cfg: object) -> Cors:
    return Cors(CorsConfig.model_validate(cfg))


def preflight(origin: bytes = SITE, **extra: bytes) -> RequestContext:
    headers = [(b"origin", origin), (b"access-control-request-method", b"POST")]
    headers += [(k.replace("_", "-").encode(), v) for k, v in extra.items()]
    return build_ctx("OPTIONS", headers=headers, request_id="rid-1")


def listed(**cfg: object) -> Cors:
    return plugin(
        origins=["https://wildmindai.com", "https://studio.wildmindai.com/"],
        credentials=True,
        **cfg,
    )


def test_preflight_is_answered_with_204_and_cors_headers() -> None:
    p = listed(max_age=600, exposed_headers=["X-Request-ID"])
    ctx = preflight(access_control_request_headers=b"Content-Type, Authorization")
    resp = p.access(ctx)
    assert isinstance(resp, Response)
    assert resp.status == 204
    assert resp.body == b""
    h = dict(resp.headers)
    assert h[b"access-control-allow-origin"] == SITE
    assert h[b"access-control-allow-credentials"] == b"true"
    assert h[b"access-control-allow-methods"] == b"GET, HEAD, PUT, PATCH, POST, DELETE, OPTIONS"
    assert h[b"access-control-allow-headers"] == b"Content-Type, Authorization"
    assert h[b"access-control-max-age"] == b"600"
    varies = [v for k, v in resp.headers if k == b"vary"]
    assert b"Origin" in varies and b"Access-Control-Request-Headers" in varies

    # The response phase runs on the gateway's own answer too: idempotent.
    out = head(204, list(resp.headers), from_gateway=True)
    p.response_headers(ctx, out)
    assert [k for k, _ in out.headers].count(b"access-control-allow-origin") == 1
    assert header_get(out.headers, b"vary") == b"Origin, Access-Control-Request-Headers"


def test_preflight_with_configured_headers_does_not_reflect() -> None:
    p = plugin(headers=["Content-Type"], methods=["get", "post"])
    resp = p.access(preflight(access_control_request_headers=b"X-Evil"))
    assert isinstance(resp, Response)
    h = dict(resp.headers)
    assert h[b"access-control-allow-headers"] == b"Content-Type"
    assert h[b"access-control-allow-methods"] == b"GET, POST"
    assert h[b"access-control-allow-origin"] == b"*"


def test_malformed_request_headers_are_not_reflected() -> None:
    resp = plugin().access(preflight(access_control_request_headers=b"a b\xff, ;"))
    assert isinstance(resp, Response)
    assert b"access-control-allow-headers" not in dict(resp.headers)


def test_wildcard_with_credentials_echoes_origin_never_star() -> None:
    p = plugin(origins=["*"], credentials=True)
    ctx = build_ctx("GET", headers=[(b"origin", b"https://anything.example")])
    assert p.access(ctx) is None
    h = head(200, [(b"access-control-allow-origin", b"*"), (b"vary", b"Accept-Encoding")])
    p.response_headers(ctx, h)
    assert header_get(h.headers, b"access-control-allow-origin") == b"https://anything.example"
    assert header_get(h.headers, b"access-control-allow-credentials") == b"true"
    assert header_get(h.headers, b"vary") == b"Accept-Encoding, Origin"


def test_wildcard_without_credentials_is_star_without_vary() -> None:
    p = plugin()
    ctx = build_ctx("GET", headers=[(b"origin", b"https://x.example")])
    p.access(ctx)
    h = head()
    p.response_headers(ctx, h)
    assert h.headers == [(b"access-control-allow-origin", b"*")]


def test_listed_origin_gets_headers_on_actual_request() -> None:
    p = listed(exposed_headers=["X-Request-ID", "X-RateLimit-Remaining"])
    ctx = build_ctx("POST", headers=[(b"origin", SITE)])
    assert p.access(ctx) is None
    h = head(201)
    p.response_headers(ctx, h)
    assert dict(h.headers) == {
        b"access-control-allow-origin": SITE,
        b"vary": b"Origin",
        b"access-control-allow-credentials": b"true",
        b"access-control-expose-headers": b"X-Request-ID, X-RateLimit-Remaining",
    }


def test_origin_comparison_ignores_case_of_config() -> None:
    p = plugin(origins=["HTTPS://WildMindAI.com"])
    ctx = build_ctx("POST", headers=[(b"origin", b"https://wildmindai.com")])
    assert p.access(ctx) is None


def test_regex_origins_must_match_whole_origin() -> None:
    p = plugin(origins=[r"~https://[a-z]+\.wildmindai\.com"])
    ok = build_ctx("POST", headers=[(b"origin", b"https://studio.wildmindai.com")])
    assert p.access(ok) is None
    evil = build_ctx("POST", headers=[(b"origin", b"https://studio.wildmindai.com.evil.io")])
    assert isinstance(p.access(evil), Response)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_strict_refuses_unsafe_method_from_unlisted_origin(method: str) -> None:
    p = listed()
    ctx = build_ctx(method, headers=[(b"origin", b"https://evil.example")], request_id="rid-9")
    resp = p.access(ctx)
    assert isinstance(resp, Response)
    assert resp.status == 403
    body = envelope_of(resp)
    assert body["error"]["code"] == "origin_not_allowed"
    assert body["error"]["details"] == {"origin": "https://evil.example"}
    assert body["requestId"] == "rid-9"
    assert b"access-control-allow-origin" not in dict(resp.headers)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_from_unlisted_origin_pass_without_cors_headers(method: str) -> None:
    p = listed()
    ctx = build_ctx(method, headers=[(b"origin", b"https://evil.example")])
    assert p.access(ctx) is None
    h = head()
    p.response_headers(ctx, h)
    assert b"access-control-allow-origin" not in dict(h.headers)
    assert h.headers == [(b"vary", b"Origin")]


def test_non_strict_lets_unlisted_unsafe_through_without_headers() -> None:
    p = listed(strict=False)
    ctx = build_ctx("POST", headers=[(b"origin", b"https://evil.example")])
    assert p.access(ctx) is None


def test_preflight_from_unlisted_origin() -> None:
    strict = listed().access(preflight(b"https://evil.example"))
    assert isinstance(strict, Response)
    assert strict.status == 403
    assert envelope_of(strict)["error"]["code"] == "origin_not_allowed"
    lax = listed(strict=False).access(preflight(b"https://evil.example"))
    assert isinstance(lax, Response)
    assert lax.status == 204
    assert b"access-control-allow-origin" not in dict(lax.headers)


def test_preflight_continue_passes_to_upstream_and_adds_headers_after() -> None:
    p = listed(preflight_continue=True)
    ctx = preflight()
    assert p.access(ctx) is None
    h = head(200)
    p.response_headers(ctx, h)
    assert header_get(h.headers, b"access-control-allow-origin") == SITE
    assert header_get(h.headers, b"access-control-allow-methods") is not None


@pytest.mark.parametrize("origin", [b"\xff\xfe", b"https://ok\x01.example", b""])
def test_malformed_origin_is_never_echoed(origin: bytes) -> None:
    p = plugin(origins=["*"], credentials=True)
    get = build_ctx("GET", headers=[(b"origin", origin)])
    assert p.access(get) is None
    h = head()
    p.response_headers(get, h)
    assert b"access-control-allow-origin" not in dict(h.headers)
    post = build_ctx("POST", headers=[(b"origin", origin)])
    resp = p.access(post)
    assert isinstance(resp, Response)
    assert resp.status == 403


def test_request_without_origin_is_untouched() -> None:
    p = listed()
    ctx = build_ctx("POST")
    assert p.access(ctx) is None
    assert ctx.vars == {}


@pytest.mark.parametrize(
    "cfg",
    [{"origins": []}, {"origins": ["~(["]}, {"methods": ["GE T"]}, {"max_age": -1}],
)
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CorsConfig.model_validate(cfg)


def test_gateway_cors_headers_replace_the_upstreams_not_duplicate_them() -> None:
    p = listed()
    ctx = build_ctx("GET", headers=[(b"origin", SITE)])
    assert p.access(ctx) is None
    response = head(200, [
        (b"access-control-allow-origin", b"*"),
        (b"x-kept", b"1"),
        (b"vary", b"Accept-Encoding"),
    ])
    p.response_headers(ctx, response)
    names = [k for k, _ in response.headers]
    assert names.count(b"access-control-allow-origin") == 1
    assert header_get(response.headers, b"access-control-allow-origin") == SITE
    assert header_get(response.headers, b"x-kept") == b"1"
    assert header_get(response.headers, b"vary") == b"Accept-Encoding, Origin"


def test_upstream_cors_grant_is_removed_for_an_origin_the_gateway_refuses() -> None:
    p = listed()
    ctx = build_ctx("GET", headers=[(b"origin", b"https://evil.example")])
    assert p.access(ctx) is None  # a safe method passes, without CORS headers
    response = head(200, [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-credentials", b"true"),
        (b"x-kept", b"1"),
    ])
    p.response_headers(ctx, response)
    assert [k for k, _ in response.headers if k.startswith(b"access-control-")] == []
    assert header_get(response.headers, b"x-kept") == b"1"
