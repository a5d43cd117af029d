"""Client addresses and CIDR lists, as the IP-aware plugins read them."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_networks(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Config validator: every entry is an address or a CIDR."""
    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or CIDR") from exc
    return entries


def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    # strict=False accepts "10.1.2.3/8" as 10.0.0.0/8: an operator writing a host
    # address with a prefix means the network around it.
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `text` (None when it is not one), IPv4-mapped IPv6 as IPv4."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; rules are
    # written in IPv4, so compare the IPv4 form.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
