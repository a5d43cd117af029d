"""What the RESP client (resp.py) raises, and the error replies it returns.

Kept apart from resp.py, which is compiled: these stay ordinary Python classes.
"""

from __future__ import annotations


class RespClientError(Exception):
    """Base of everything this client raises."""


class RespError(RespClientError):
    """An error reply from Redis (`-ERR ...`); `message` is its text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @staticmethod
    def of(message: str) -> RespError:
        if message.startswith("NOSCRIPT"):
            return NoScriptError(message)
        return RespError(message)


class NoScriptError(RespError):
    """EVALSHA of a script the server does not hold (restarted, flushed)."""


class RespConnectionError(RespClientError):
    """No answer from Redis: cannot connect, connection lost or dropped."""


class RespTimeoutError(RespConnectionError):
    """A call (or the connect) got no reply within its deadline."""


class RespProtocolError(RespConnectionError):
    """Bytes that are not RESP2, or a reply nobody asked for."""
