from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, head
from pydantic import ValidationError

from tollway.gateway.context import header_get
from tollway.plugins.security_headers import (
    DEFAULT_CSP,
    SecurityHeaders,
    SecurityHeadersConfig,
)

HELMET_DEFAULTS = {
    b"content-security-policy": DEFAULT_CSP.encode(),
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"origin-agent-cluster": b"?1",
    b"referrer-policy": b"no-referrer",
    b"strict-transport-security": b"max-age=31536000; includeSubDomains",
    b"x-content-type-options": b"nosniff",
    b"x-dns-prefetch-control": b"off",
    b"x-download-options": b"noopen",
    b"x-frame-options": b"SAMEORIGIN",
    b"x-permitted-cross-domain-policies": b"none",
    b"x-xss-protection": b"0",
}


def plugin(**cfg: object) -> SecurityHeaders:
    return SecurityHeaders(SecurityHeadersConfig.model_validate(cfg))


def test_helmet_defaults_are_added_and_powered_by_removed() -> None:
    h = head(200, [(b"content-type", b"text/html"), (b"x-powered-by", b"Express")])
    plugin().response_headers(build_ctx(), h)
    got = dict(h.headers)
    assert b"x-powered-by" not in got
    assert got.pop(b"content-type") == b"text/html"
    assert got == HELMET_DEFAULTS
    assert "default-src 'self'" in DEFAULT_CSP
    assert DEFAULT_CSP.endswith("upgrade-insecure-requests")


def test_gateway_made_responses_get_them_too() -> None:
    h = head(401, [(b"content-type", b"application/json")], from_gateway=True)
    plugin().response_headers(build_ctx(), h)
    assert header_get(h.headers, b"x-content-type-options") == b"nosniff"


def test_upstream_value_is_kept_without_override() -> None:
    h = head(200, [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"default-src *")])
    plugin().response_headers(build_ctx(), h)
    assert [v for k, v in h.headers if k == b"x-frame-options"] == [b"DENY"]
    assert header_get(h.headers, b"content-security-policy") == b"default-src *"
    assert header_get(h.headers, b"referrer-policy") == b"no-referrer"


def test_override_replaces_upstream_value() -> None:
    h = head(200, [(b"x-frame-options", b"ALLOWALL"), (b"x-frame-options", b"DENY")])
    plugin(override=True).response_headers(build_ctx(), h)
    assert [v for k, v in h.headers if k == b"x-frame-options"] == [b"SAMEORIGIN"]


def test_headers_can_be_changed_or_disabled() -> None:
    p = plugin(
        content_security_policy=False,
        strict_transport_security="max-age=60",
        x_frame_options=None,
        remove_powered_by=False,
    )
    h = head(200, [(b"x-powered-by", b"PHP")])
    p.response_headers(build_ctx(), h)
    got = dict(h.headers)
    assert b"content-security-policy" not in got
    assert b"x-frame-options" not in got
    assert got[b"strict-transport-security"] == b"max-age=60"
    assert got[b"x-powered-by"] == b"PHP"


@pytest.mark.parametrize(
    "cfg", [{"x_frame_options": True}, {"referrer_policy": "a\r\nSet-Cookie: x"}, {"bogus": 1}]
)
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SecurityHeadersConfig.model_validate(cfg)
