"""security-headers: the headers Helmet 8 sets by default (seed 000's Helmet).

Priority 1600. It only has a response phase; what matters is that it runs before
response-transformer (800), so an operator can still remove or rewrite any of
these headers per route with that plugin.

Every header can be given another value, or `false` to leave it out. With
`override: false` (the default) a header the upstream already set is kept: the
upstream knows best what its pages need (a dashboard's CSP, a framed widget), and
the gateway fills in what is missing. `override: true` always writes these values.
X-Powered-By is removed either way (unless `remove_powered_by: false`): it only
tells an attacker which framework to aim at.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from tollway.gateway.context import Headers, RequestContext, ResponseHead
from tollway.plugins.base import Plugin, PluginConfig, register

DEFAULT_CSP = (
    "default-src 'self';base-uri 'self';font-src 'self' https: data:;"
    "form-action 'self';frame-ancestors 'self';img-src 'self' data:;"
    "object-src 'none';script-src 'self';script-src-attr 'none';"
    "style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests"
)


def _header_value(value: Any) -> Any:
    # YAML `false` turns a header off; `true` would be ambiguous (which value?).
    if value is False:
        return None
    if value is True:
        raise ValueError("give the header value as a string, or false to disable it")
    if isinstance(value, str) and any(c in value for c in "\r\n\0"):
        raise ValueError("a header value must not contain CR, LF or NUL")
    return value


HeaderValue = Annotated[str | None, BeforeValidator(_header_value)]

# Config field -> header name, in the order Helmet writes them.
_FIELDS: tuple[tuple[str, bytes], ...] = (
    ("content_security_policy", b"content-security-policy"),
    ("cross_origin_opener_policy", b"cross-origin-opener-policy"),
    ("cross_origin_resource_policy", b"cross-origin-resource-policy"),
    ("origin_agent_cluster", b"origin-agent-cluster"),
    ("referrer_policy", b"referrer-policy"),
    ("strict_transport_security", b"strict-transport-security"),
    ("x_content_type_options", b"x-content-type-options"),
    ("x_dns_prefetch_control", b"x-dns-prefetch-control"),
    ("x_download_options", b"x-download-options"),
    ("x_frame_options", b"x-frame-options"),
    ("x_permitted_cross_domain_policies", b"x-permitted-cross-domain-policies"),
    ("x_xss_protection", b"x-xss-protection"),
)


class SecurityHeadersConfig(PluginConfig):
    content_security_policy: HeaderValue = DEFAULT_CSP
    cross_origin_opener_policy: HeaderValue = "same-origin"
    cross_origin_resource_policy: HeaderValue = "same-origin"
    origin_agent_cluster: HeaderValue = "?1"
    referrer_policy: HeaderValue = "no-referrer"
    strict_transport_security: HeaderValue = "max-age=31536000; includeSubDomains"
    x_content_type_options: HeaderValue = "nosniff"
    x_dns_prefetch_control: HeaderValue = "off"
    x_download_options: HeaderValue = "noopen"
    x_frame_options: HeaderValue = "SAMEORIGIN"
    x_permitted_cross_domain_policies: HeaderValue = "none"
    # "0" on purpose: the legacy XSS auditor caused more leaks than it stopped.
    x_xss_protection: HeaderValue = "0"
    remove_powered_by: bool = True
    override: bool = Field(default=False, description="replace headers the upstream already set")


@register
class SecurityHeaders(Plugin[SecurityHeadersConfig]):
    name = "security-headers"
    priority = 1600
    Config = SecurityHeadersConfig

    def __init__(self, config: SecurityHeadersConfig) -> None:
        super().__init__(config)
        headers: Headers = []
        for field_name, header in _FIELDS:
            value: str | None = getattr(config, field_name)
            if value is not None:
                headers.append((header, value.encode("latin-1")))
        self._headers = tuple(headers)
        drop = {name for name, _ in headers} if config.override else set()
        if config.remove_powered_by:
            drop.add(b"x-powered-by")
        self._drop = frozenset(drop)

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        hdrs = head.headers
        # Rebuild the list only when something must go: most responses carry
        # none of these headers, and the scan is cheaper than the copy.
        if self._drop and any(k in self._drop for k, _ in hdrs):
            hdrs[:] = [(k, v) for k, v in hdrs if k not in self._drop]
        if self.config.override:
            hdrs.extend(self._headers)
            return
        present = {k for k, _ in hdrs}
        hdrs.extend(h for h in self._headers if h[0] not in present)
