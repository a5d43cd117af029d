from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, envelope_of
from pydantic import ValidationError

from tollway.gateway.context import Response
from tollway.plugins.ip_restriction import IpRestriction, IpRestrictionConfig


def plugin(**cfg: object) -> IpRestriction:
    return IpRestriction(IpRestrictionConfig.model_validate(cfg))


def verdict(p: IpRestriction, ip: str) -> int | None:
    resp = p.access(build_ctx(client_ip=ip, request_id="rid-ip"))
    return None if resp is None else resp.status


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.168.1.10", True),
        ("192.168.1.11", False),
        ("2001:db8::1", True),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.0.0.9", True),  # IPv4 client seen through a dual-stack socket
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_allow_list_v4_and_v6(ip: str, allowed: bool) -> None:
    p = plugin(allow=["10.0.0.0/8", "192.168.1.10", "2001:db8::/32"])
    assert verdict(p, ip) == (None if allowed else 403)
    # A second look is served from the cache and says the same.
    assert verdict(p, ip) == (None if allowed else 403)


def test_deny_wins_over_allow() -> None:
    p = plugin(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.9.0.0/16", "2001:db8:bad::/48"])
    assert verdict(p, "10.1.0.1") is None
    assert verdict(p, "10.9.3.4") == 403
    assert verdict(p, "2001:db8::5") is None
    assert verdict(p, "2001:db8:bad::5") == 403


def test_deny_only_lets_others_through() -> None:
    p = plugin(deny=["203.0.113.0/24", "::1"])
    assert verdict(p, "203.0.113.99") == 403
    assert verdict(p, "::1") == 403
    assert verdict(p, "198.51.100.1") is None
    assert verdict(p, "garbage") is None


def test_refusal_envelope() -> None:
    p = plugin(allow=["10.0.0.0/8"])
    resp = p.access(build_ctx(client_ip="8.8.8.8", request_id="rid-ip"))
    assert isinstance(resp, Response)
    body = envelope_of(resp)
    assert resp.status == 403
    assert body["error"] == {"code": "ip_forbidden", "details": {"ip": "8.8.8.8"}}
    assert body["requestId"] == "rid-ip"


def test_cache_stays_bounded() -> None:
    p = plugin(allow=["10.0.0.0/8"])
    for i in range(10000):
        p.allowed(f"10.{i // 256 % 256}.{i % 256}.1")
    assert len(p._cache) <= 8192
    assert p.allowed("10.0.0.1")
    assert not p.allowed("9.0.0.1")


@pytest.mark.parametrize("cfg", [{}, {"allow": ["10.0.0.0/33"]}, {"deny": ["example.com"]}])
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        IpRestrictionConfig.model_validate(cfg)
