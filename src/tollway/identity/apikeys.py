"""The API key format: generation, checksum, display prefix, peppered hash.

A key is `tw_live_` + base62(32 random bytes, 43 characters) + a 6-character base62
CRC32 of that body (GitHub's token format does the same): a typo or a made-up key
is refused by `parse` before any cache or database lookup. Only
HMAC-SHA256(pepper, key) is stored; the pepper lives outside the database
(`TOLLWAY_KEY_PEPPER`, else a file in the data directory), so a database dump
alone does not allow checking guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import zlib
from pathlib import Path

KEY_TYPE_PREFIX = "tw_live_"
BODY_LENGTH = 43  # 32 bytes in base62
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_TYPE_PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
DISPLAY_CHARS = 8

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET = frozenset(_ALPHABET)
PEPPER_FILE = "key_pepper"


class PepperError(RuntimeError):
    """The key pepper cannot be used; the message says what to set."""


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_key() -> str:
    body = _base62(int.from_bytes(secrets.token_bytes(32), "big"), BODY_LENGTH)
    return KEY_TYPE_PREFIX + body + _checksum(body)


def is_well_formed(raw: str) -> bool:
    """True when `raw` has the key's shape and its checksum holds."""
    if len(raw) != KEY_LENGTH or not raw.startswith(KEY_TYPE_PREFIX):
        return False
    rest = raw[len(KEY_TYPE_PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:BODY_LENGTH], rest[BODY_LENGTH:]
    return hmac.compare_digest(_checksum(body), check)


def display_prefix(raw: str) -> str:
    """What lists show: `tw_live_` and the first 8 characters after it."""
    return raw[: len(KEY_TYPE_PREFIX) + DISPLAY_CHARS]


def hash_key(pepper: bytes, raw: str) -> str:
    """The stored form of a key; lookups compare these, never raw keys."""
    return hmac.new(pepper, raw.encode("ascii"), hashlib.sha256).hexdigest()


def load_pepper(configured: str | None, data_dir: Path) -> bytes:
    """The configured pepper, else the one in the data directory (made on first use)."""
    if configured:
        return configured.encode()
    path = data_dir / PEPPER_FILE
    try:
        stored = path.read_bytes().strip()
    except FileNotFoundError:
        pass
    else:
        if not stored:
            # An empty pepper would hash every key with no secret at all.
            raise PepperError(f"{path} is empty: restore it, or set TOLLWAY_KEY_PEPPER")
        return stored
    data_dir.mkdir(parents=True, exist_ok=True)
    pepper = secrets.token_hex(32).encode()
    # Written aside, then linked into place: link fails when another process got
    # there first, and nobody ever reads a half-written pepper.
    tmp = data_dir / f".{PEPPER_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pepper)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pepper = path.read_bytes().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return pepper
