"""Upstream failures, each mapping onto one gateway error (httpcore's habit).

The mapping lives on the class so the data plane never guesses a status from a
message: connect failures and broken responses are 502, timeouts 504.
"""

from __future__ import annotations


class UpstreamError(Exception):
    code = "upstream_unavailable"
    # True when the upstream cannot have seen the request: retrying elsewhere is safe
    # whatever the method.
    before_send = False


class UpstreamConnectError(UpstreamError):
    code = "upstream_unavailable"
    before_send = True


class UpstreamConnectTimeout(UpstreamConnectError):
    code = "upstream_timeout"


class UpstreamClosed(UpstreamError):
    """The connection closed (or was reset) before a complete response."""

    code = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_bad_response"


class UpstreamReadTimeout(UpstreamError):
    code = "upstream_timeout"


class UpstreamWriteTimeout(UpstreamError):
    code = "upstream_timeout"


class PoolExhausted(UpstreamError):
    """max_per_host connections busy and none freed within the connect timeout."""

    code = "upstream_timeout"
    before_send = True
