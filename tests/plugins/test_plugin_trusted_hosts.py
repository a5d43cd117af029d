from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, envelope_of
from pydantic import ValidationError

from tollway.gateway.context import Response
from tollway.plugins.trusted_hosts import TrustedHosts, TrustedHostsConfig


def plugin(*hosts: str) -> TrustedHosts:
    return TrustedHosts(TrustedHostsConfig(hosts=hosts))


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("wildmindai.com", True),
        ("wildmindai.com.", True),
        ("studio.wildmindai.com", True),
        ("a.b.wildmindai.com", True),
        ("api.example.com", True),
        ("example.com", False),
        ("evilwildmindai.com", False),
        ("wildmindai.com.evil.io", False),
        ("", False),
        ("10.0.0.1", False),
    ],
)
def test_exact_and_suffix_hosts(host: str, ok: bool) -> None:
    p = plugin("WildMindAI.com", "*.wildmindai.com", "api.example.com")
    resp = p.access(build_ctx(host=host, request_id="rid-h"))
    if ok:
        assert resp is None
    else:
        assert isinstance(resp, Response)
        assert resp.status == 403
        body = envelope_of(resp)
        assert body["error"] == {"code": "host_not_allowed", "details": {"host": host}}
        assert body["requestId"] == "rid-h"


def test_star_allows_anything() -> None:
    assert plugin("*").access(build_ctx(host="whatever.test")) is None


@pytest.mark.parametrize("hosts", [(), ("example.com:8000",), ("a.*.com",), ("*.",), ("",)])
def test_bad_config_is_rejected(hosts: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError):
        TrustedHostsConfig(hosts=hosts)
