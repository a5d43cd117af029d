"""The admin token: from TOLLWAY_ADMIN_TOKEN, else generated once into the data directory.

The generated token is written aside and hard-linked into place (as the key pepper
is): the link fails when another process (a second node on the same data
directory, or the CLI) got there first, and nobody ever reads a half-written file.
The file is created with mode 0600: whoever can read it administers the gateway.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from tollway.observability.logging import get_logger
from tollway.settings import Settings

TOKEN_FILE = "admin_token"
TOKEN_ENV = "TOLLWAY_ADMIN_TOKEN"
# 32 random bytes, url-safe: fits an Authorization header and a shell variable as is.
TOKEN_BYTES = 32

_log = get_logger("tollway.admin.token")


class AdminTokenError(RuntimeError):
    """The token file exists but cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True)
class AdminToken:
    value: str
    # The file it was read from or written to; None when it came from the environment.
    path: Path | None
    # True only for the call that created the file: that call prints it, once.
    generated: bool


def token_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / TOKEN_FILE


def load_admin_token(settings: Settings) -> AdminToken:
    """The configured token, else the one in the data directory (made on first use)."""
    if settings.admin_token is not None:
        configured = settings.admin_token.get_secret_value().strip()
        if not configured:
            raise AdminTokenError(f"{TOKEN_ENV} is set but empty")
        return AdminToken(configured, None, generated=False)
    path = token_path(settings)
    existing = _read(path)
    if existing is not None:
        return AdminToken(existing, path, generated=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.parent / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another process created it between our read and our link: theirs wins,
            # and they print it.
            raced = _read(path)
            if raced is None:  # pragma: no cover - only if someone empties it meanwhile
                raise AdminTokenError(f"admin token file {path} is empty") from None
            return AdminToken(raced, path, generated=False)
    finally:
        tmp.unlink(missing_ok=True)
    return AdminToken(token, path, generated=True)


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"cannot read the admin token file {path}: {exc}") from exc
    if not text:
        raise AdminTokenError(
            f"admin token file {path} is empty; delete it to generate a new token "
            f"or set {TOKEN_ENV}"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Not refused: the operator may have a reason (a group-readable secrets
        # mount), but they should know.
        _log.warning("admin_token_file_readable_by_others", path=str(path), mode=oct(mode))
    return text


def token_matches(expected: str, given: str) -> bool:
    """Constant-time comparison (the time does not depend on where they differ)."""
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))
