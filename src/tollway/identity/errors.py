"""Errors the identity layer raises; the admin API and the CLI map them to answers.

Each error has a stable machine `code` (the admin API's envelope code) and, for
invalid input, the `field` that was wrong so that a 422 can name its path.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Base of every error the identity functions raise on purpose."""

    code: str = "identity_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class NotFound(IdentityError):
    """The consumer or key does not exist (404)."""

    code = "not_found"


class Conflict(IdentityError):
    """The request contradicts the current state (409): a duplicate email,
    re-enabling a revoked key, a key for a disabled consumer."""

    code = "conflict"


class InvalidInput(IdentityError):
    """An input is malformed or out of range (422); `field` names it."""

    code = "validation_error"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field)
