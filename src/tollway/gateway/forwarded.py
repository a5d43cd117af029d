"""Who the client is, and the X-Forwarded-* / Forwarded / Via headers we send on.

A peer inside `trusted_proxies` is another proxy in front of us: we believe what it
says (the client IP is the right-most X-Forwarded-For entry that is not itself a
trusted proxy) and extend its headers. Any other peer is the client: whatever
forwarding headers it sent are overwritten, so a client cannot forge its IP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from functools import lru_cache

from tollway.gateway.context import Headers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDING_HEADERS = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
     b"forwarded"}
)
VIA = b"1.1 tollway"


class TrustedProxies:
    __slots__ = ("_check", "networks")

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )

        # Peers repeat (keep-alive, a few load balancers): cache per address.
        @lru_cache(maxsize=4096)
        def check(ip: str) -> bool:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(addr in net for net in self.networks)

        self._check = check

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, ip: str) -> bool:
        return bool(self.networks) and self._check(ip)


def resolve_client_ip(peer_ip: str, headers: Headers, trusted: TrustedProxies) -> str:
    if not trusted or not trusted.contains(peer_ip):
        return peer_ip
    chain: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            chain.extend(p.strip() for p in value.decode("latin-1").split(","))
    for hop in reversed(chain):
        if hop and not trusted.contains(hop):
            return _strip_port(hop)
    return peer_ip


def _strip_port(hop: str) -> str:
    if hop.startswith("["):
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop


def forwarding_block(
    headers: Headers, peer_ip: str, host: bytes, port: int, trusted: bool
) -> bytes:
    """The forwarding header lines for the upstream request, as one block of bytes.

    `headers` are the client's; only read here. With an untrusted peer everything is
    ours; with a trusted one, its values are kept and extended.
    """
    if not trusted:
        # Everything comes from the peer, the Host and our port, which repeat from
        # one request to the next (keep-alive): built once per combination.
        key = (peer_ip, host, port)
        block = _UNTRUSTED_BLOCKS.get(key)
        if block is None:
            block = _block(headers, peer_ip, host, port, False)
            if len(_UNTRUSTED_BLOCKS) >= _MAX_BLOCKS:
                _UNTRUSTED_BLOCKS.clear()  # cheap to rebuild; bounded memory
            _UNTRUSTED_BLOCKS[key] = block
        return block
    return _block(headers, peer_ip, host, port, True)


def _block(headers: Headers, peer_ip: str, host: bytes, port: int, trusted: bool) -> bytes:
    xff = proto = fhost = fport = fwd = None
    if trusted:
        for name, value in headers:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-host":
                fhost = value
            elif name == b"x-forwarded-port":
                fport = value
            elif name == b"forwarded":
                fwd = value if fwd is None else fwd + b", " + value
    peer = peer_ip.encode()
    for_node = b'"[' + peer + b']"' if b":" in peer else peer
    own_proto = proto or b"http"
    own_host = fhost or host
    # Our Forwarded element describes the hop we received (RFC 7239 §4), whatever
    # the X-Forwarded-* of a proxy before us said about the original request.
    element = b"for=" + for_node + b";host=" + _quote(host) + b";proto=http"
    return b"".join((
        b"x-forwarded-for: ", xff + b", " + peer if xff else peer,
        b"\r\nx-forwarded-proto: ", own_proto,
        b"\r\nx-forwarded-host: ", own_host,
        b"\r\nx-forwarded-port: ", fport or _PORTS.get(port) or str(port).encode(),
        b"\r\nforwarded: ", fwd + b", " + element if fwd else element,
        b"\r\nvia: ", VIA, b"\r\n",
    ))


_PORTS = {80: b"80", 443: b"443", 8000: b"8000"}
_UNTRUSTED_BLOCKS: dict[tuple[str, bytes, int], bytes] = {}
_MAX_BLOCKS = 4096
_NEEDS_QUOTE = re.compile(rb'[:\[\]";, ]')


def _quote(value: bytes) -> bytes:
    # RFC 7239 §4: a value with ":" (host:port) must be a quoted-string.
    if _NEEDS_QUOTE.search(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return value
