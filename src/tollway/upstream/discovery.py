"""Where a service's targets come from besides its config: the environment and DNS.

`env_targets` reads TOLLWAY_SERVICE_<NAME>_URL once, when a config is loaded.
`DnsWatcher` (dns_watcher.py) keeps a service's targets current from A/AAAA or SRV
records: it re-resolves when the records' TTL ends and reports each change of the
target set.

Only the sources live here; the cluster that consumes the target lists is elsewhere
(this module never imports the gateway or any web layer).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import structlog

from tollway.upstream.service import Target

__all__ = [
    "TargetsChanged",
    "env_targets",
    "env_var_name",
    "format_host_port",
    "parse_host_port",
]

log = structlog.get_logger("tollway.upstream.discovery")

# (service name, its new targets). Called from the event loop; must not block.
TargetsChanged = Callable[[str, tuple[Target, ...]], None]

_ENV_PREFIX = "TOLLWAY_SERVICE_"
_ENV_SUFFIX = "_URL"
# A DNS host name or an IPv4 address (IPv6 goes in brackets). Underscores are let
# through: they are common in container and SRV-derived names.
_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})$")


# -- host:port --------------------------------------------------------------------


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port" into (lower-case host without brackets, port).

    Stricter than TargetConfig's check on one point: an IPv6 address must be in
    brackets, because "::1:8080" could be read as two different addresses.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{value!r} is not "host:port" (port 1-65535)')
    if host.startswith("[") and host.endswith("]"):
        return _ipv6(host[1:-1]), int(port)
    if ":" in host:
        raise ValueError(f'write an IPv6 address in brackets: "[{host}]:{port}"')
    return _hostname(host), int(port)


def _ipv6(text: str) -> str:
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv6 address") from None


def _hostname(text: str) -> str:
    if not _HOSTNAME.match(text):
        raise ValueError(f"{text!r} is not a host name or IPv4 address")
    return text.lower()


def format_host_port(host: str, port: int) -> str:
    """The canonical "host:port" (IPv6 in brackets): the form registrations are stored in."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the environment --------------------------------------------------------------


def env_var_name(service: str) -> str:
    """The variable that gives `service` its targets: TOLLWAY_SERVICE_<NAME>_URL.

    Every character but an ASCII letter or digit becomes "_", as shells only
    allow those in variable names ("payments-v2" -> TOLLWAY_SERVICE_PAYMENTS_V2_URL).
    """
    mangled = "".join(c.upper() if c.isascii() and c.isalnum() else "_" for c in service)
    return f"{_ENV_PREFIX}{mangled}{_ENV_SUFFIX}"


def env_targets(
    service: str, environ: Mapping[str, str]
) -> tuple[tuple[Target, ...], str] | None:
    """The targets and base path `service` gets from its environment variable.

    None when the variable is unset or blank. Otherwise the value is one URL
    ("http://host:port/base") or a comma-separated list of URLs and/or "host:port"
    entries; all URLs must share one base path ("/" when none gives one). Raises
    ValueError naming the variable for anything else.
    """
    name = env_var_name(service)
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    targets: list[Target] = []
    seen: set[str] = set()
    base: str | None = None
    for i, raw in enumerate(value.split(","), start=1):
        entry = raw.strip()
        if not entry:
            raise ValueError(f"{name}: entry {i} is empty (a stray comma?)")
        try:
            if "://" in entry:
                host, port, path = _parse_url(entry)
                if base is not None and path != base:
                    raise ValueError(
                        f"its base path {path!r} differs from {base!r} of an earlier URL; "
                        "all URLs of one service must share one base path"
                    )
                base = path
            else:
                host, port = parse_host_port(entry)
        except ValueError as exc:
            raise ValueError(f"{name}: entry {i} ({entry!r}): {exc}") from None
        target = Target(host, port)
        if target.key in seen:
            raise ValueError(f"{name}: lists {format_host_port(host, port)} more than once")
        seen.add(target.key)
        targets.append(target)
    return tuple(targets), base or "/"


def _parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError('must be an http:// URL or "host:port"')
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("port must be a number from 1 to 65535") from None
    hostname = parts.hostname  # lower-case, brackets taken off
    if not hostname:
        raise ValueError("must name a host")
    host = _ipv6(hostname) if ":" in hostname else _hostname(hostname)
    return host, port, parts.path or "/"
