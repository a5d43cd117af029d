"""response-compression: gzip text-like responses for clients that accept it.

Priority 50: low, so its response phase runs after every plugin that edits
headers (response-transformer at 800 may drop Content-Encoding, and so on) and its
body filter is the last rewrite of the body.

A response is compressed only when all hold: the client accepts gzip (q > 0), the
upstream set no Content-Encoding, the status has a body (not 1xx/204/206/304, not a
HEAD request), the gateway did not make it (its envelopes are tiny), Cache-Control
lacks no-transform, the media type is on the list, and Content-Length is unknown or
at least `min_size`. Vary: Accept-Encoding is added whenever only the client's
Accept-Encoding decided, so caches keep both variants.

Event streams (`stream_types`) are flushed after every chunk: without that zlib
holds small events back until its buffer fills, and a token stream would stall.
Other bodies are not flushed per chunk, which compresses better.
"""

from __future__ import annotations

import re
import zlib

from pydantic import Field, field_validator

from tollway.config.schema import Size
from tollway.gateway.context import (
    RequestContext,
    ResponseHead,
    header_add_vary,
    header_get,
    header_remove,
)
from tollway.plugins.base import BodyFilter, Plugin, PluginConfig, register

_VARS_KEY = "response-compression"
_NO_BODY = frozenset({204, 206, 304})
_MEDIA = re.compile(r"^(?:[a-z0-9!#$&^_.+-]+|\*)/(?:[a-z0-9!#$&^_.+-]+|\*(?:\+[a-z0-9.-]+)?)$")


# Clients send a handful of distinct Accept-Encoding values (one per browser
# build), so parsing each once and remembering the verdict saves most of the work.
_ACCEPT_CACHE: dict[bytes, bool] = {}
_ACCEPT_CACHE_SIZE = 256


def accepts_gzip(value: bytes | None) -> bool:
    """Whether an Accept-Encoding value allows gzip. Malformed entries count as absent."""
    if not value:
        return False
    verdict = _ACCEPT_CACHE.get(value)
    if verdict is None:
        verdict = _parse_accept(value)
        if len(_ACCEPT_CACHE) >= _ACCEPT_CACHE_SIZE:
            _ACCEPT_CACHE.clear()
        _ACCEPT_CACHE[value] = verdict
    return verdict


def _parse_accept(value: bytes) -> bool:
    gzip_q: float | None = None
    star_q: float | None = None
    for part in value.decode("latin-1").lower().split(","):
        coding, _, params = part.partition(";")
        coding = coding.strip()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        params = params.strip()
        if params:
            name, _, raw_q = params.partition("=")
            if name.strip() != "q":
                continue
            try:
                q = float(raw_q.strip())
            except ValueError:
                continue
            if not 0.0 <= q <= 1.0:
                continue
        if coding == "*":
            star_q = q
        else:
            gzip_q = q if gzip_q is None else max(gzip_q, q)
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


class GzipFilter(BodyFilter):
    """Streams a body through one gzip member."""

    __slots__ = ("_flush", "_z")

    def __init__(self, level: int, flush_each_chunk: bool = False) -> None:
        # wbits=31: gzip header and trailer rather than a bare zlib stream.
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._flush = flush_each_chunk

    def feed(self, chunk: bytes) -> bytes:
        out = self._z.compress(chunk)
        if self._flush and chunk:
            out += self._z.flush(zlib.Z_SYNC_FLUSH)
        return out

    def finish(self) -> bytes:
        return self._z.flush()


class CompressionConfig(PluginConfig):
    level: int = Field(default=6, ge=1, le=9, description="zlib level: 1 fast .. 9 small")
    min_size: Size = Field(default=1024, description="smaller known bodies stay as is")
    content_types: tuple[str, ...] = Field(
        default=(
            "text/*",
            "application/json",
            "application/javascript",
            "application/xml",
            "image/svg+xml",
            "*/*+json",
            "*/*+xml",
        ),
        description="type/subtype, type/*, or */*+suffix",
    )
    stream_types: tuple[str, ...] = Field(
        default=("text/event-stream",), description="media types flushed after every chunk"
    )

    @field_validator("content_types", "stream_types")
    @classmethod
    def _media(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(t.strip().lower() for t in v)
        for t in out:
            if not _MEDIA.match(t):
                raise ValueError(f"{t!r} is not type/subtype, type/* or */*+suffix")
        return out


@register
class Compression(Plugin[CompressionConfig]):
    name = "response-compression"
    priority = 50
    Config = CompressionConfig

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        for t in config.content_types:
            if t.startswith("*/*+"):
                suffixes.append(t[3:])  # "+json"
            elif t == "*/*":
                prefixes.append("")
            elif t.endswith("/*"):
                prefixes.append(t[:-1])  # "text/"
            else:
                exact.add(t)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._suffixes = tuple(suffixes)
        self._stream = frozenset(config.stream_types)

    def _media_type(self, head: ResponseHead) -> str | None:
        raw = header_get(head.headers, b"content-type")
        if raw is None:
            return None
        media = raw.partition(b";")[0].strip().lower().decode("latin-1")
        if media in self._exact or (self._prefixes and media.startswith(self._prefixes)):
            return media
        if self._suffixes and media.endswith(self._suffixes):
            return media
        return None

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        # Gateway-made answers (error envelopes, preflights) are a few hundred
        # bytes: not worth a compressor.
        if head.from_gateway or ctx.method == "HEAD":
            return
        if head.status < 200 or head.status in _NO_BODY:
            return
        hdrs = head.headers
        if header_get(hdrs, b"content-encoding") is not None:
            return
        if header_get(hdrs, b"content-range") is not None:
            return
        cache_control = header_get(hdrs, b"cache-control")
        if cache_control is not None and b"no-transform" in cache_control.lower():
            return
        media = self._media_type(head)
        if media is None:
            return
        length = header_get(hdrs, b"content-length")
        if length is not None:
            try:
                if int(length) < self.config.min_size:
                    return
            except ValueError:
                pass  # unknown length: the server re-frames the body anyway
        header_add_vary(hdrs, b"Accept-Encoding")
        if not accepts_gzip(ctx.header(b"accept-encoding")):
            return
        header_remove(hdrs, b"content-length")
        header_remove(hdrs, b"accept-ranges")
        hdrs.append((b"content-encoding", b"gzip"))
        etag = header_get(hdrs, b"etag")
        if etag is not None and etag.startswith(b'"'):
            # The compressed bytes differ from the identity ones, so a strong
            # validator would be a lie.
            hdrs[:] = [
                (k, b"W/" + v if k == b"etag" and v.startswith(b'"') else v) for k, v in hdrs
            ]
        ctx.vars[_VARS_KEY] = media in self._stream

    def body_filter(self, ctx: RequestContext, head: ResponseHead) -> BodyFilter | None:
        flush = ctx.vars.get(_VARS_KEY)
        if flush is None:
            return None
        return GzipFilter(self.config.level, flush_each_chunk=flush)
