"""request-transformer and response-transformer: Kong's header (and query) edits.

Priorities as in Kong: request-transformer 801 (after authentication and limits,
so those see the client's own headers, and after parameter-pollution at 1800, so
appended parameters are never judged as pollution); response-transformer 800 (after
security-headers at 1600, so it can still remove or rewrite those, and before
response-compression at 50).

Each operation takes Kong's `"name:value"` strings (split at the first colon) or a
mapping `{name: value}`; `rename` takes `"old:new"`. Operations run in Kong's
order: remove, rename, replace (only if present), add (only if absent), append
(always, as another line). Header names are compared case-insensitively; query
names exactly, after percent-decoding.

Content-Length and Transfer-Encoding cannot be touched: they frame the message,
and a wrong value desynchronises the connection. Kong's body and template
features are not implemented.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote, unquote_to_bytes

from pydantic import AfterValidator, BeforeValidator

from tollway.gateway.context import (
    Headers,
    RequestContext,
    Response,
    ResponseHead,
    header_get,
)
from tollway.plugins.base import Plugin, PluginConfig, register

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FRAMING = frozenset({"content-length", "transfer-encoding"})

Pairs = tuple[tuple[str, str], ...]


def _to_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((str(k), "" if v is None else str(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        out: list[Any] = []
        for item in value:
            if isinstance(item, str):
                name, sep, val = item.partition(":")
                if not sep:
                    raise ValueError(f"{item!r} must be written name:value")
                out.append((name.strip(), val.strip()))
            else:
                out.append(item)
        return tuple(out)
    return value


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in _FRAMING:
        raise ValueError(f"{name} frames the message and cannot be transformed")
    return name


def _header_names(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        _header_name(name)
    return names


def _header_pairs(pairs: Pairs) -> Pairs:
    for name, value in pairs:
        _header_name(name)
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"the value of {name} must not contain CR, LF or NUL")
    return pairs


def _header_renames(pairs: Pairs) -> Pairs:
    for old, new in pairs:
        _header_name(old)
        _header_name(new)
    return pairs


def _query_pairs(pairs: Pairs) -> Pairs:
    for name, _ in pairs:
        if not name:
            raise ValueError("a query parameter name must not be empty")
    return pairs


HeaderNames = Annotated[tuple[str, ...], AfterValidator(_header_names)]
HeaderPairs = Annotated[Pairs, BeforeValidator(_to_pairs), AfterValidator(_header_pairs)]
HeaderRenames = Annotated[Pairs, BeforeValidator(_to_pairs), AfterValidator(_header_renames)]
QueryPairs = Annotated[Pairs, BeforeValidator(_to_pairs), AfterValidator(_query_pairs)]


class _Ops:
    """remove / rename / replace / add / append, compiled to bytes once.

    `fold` normalizes names: header names compare case-insensitively, query
    parameter names exactly.
    """

    __slots__ = ("_add", "_append", "_remove", "_rename", "_replace", "empty")

    def __init__(
        self,
        remove: tuple[str, ...],
        rename: Pairs,
        replace: Pairs,
        add: Pairs,
        append: Pairs,
        fold: Callable[[str], str],
    ) -> None:
        def enc(pairs: Pairs) -> tuple[tuple[bytes, bytes], ...]:
            return tuple((fold(n).encode(), v.encode()) for n, v in pairs)

        self._remove = frozenset(fold(n).encode() for n in remove)
        self._rename = tuple(
            (fold(o).encode(), fold(n).encode()) for o, n in rename if fold(o) != fold(n)
        )
        self._replace = enc(replace)
        self._add = enc(add)
        self._append = enc(append)
        self.empty = not (
            self._remove or self._rename or self._replace or self._add or self._append
        )


def _exact(name: str) -> str:
    return name


class _HeaderOps(_Ops):
    """Header operations, applied in place to a header list."""

    __slots__ = ()

    def apply(self, headers: Headers) -> None:
        if self._remove and any(k in self._remove for k, _ in headers):
            headers[:] = [(k, v) for k, v in headers if k not in self._remove]
        for old, new in self._rename:
            if any(k == old for k, _ in headers):
                # Kong's semantics: the renamed header replaces one already
                # carrying the new name.
                headers[:] = [(new if k == old else k, v) for k, v in headers if k != new]
        for name, value in self._replace:
            first = next((i for i, (k, _) in enumerate(headers) if k == name), None)
            if first is not None:
                # One line with the new value, where the first one was.
                headers[:] = [
                    (k, value if i == first else v)
                    for i, (k, v) in enumerate(headers)
                    if k != name or i == first
                ]
        for name, value in self._add:
            if header_get(headers, name) is None:
                headers.append((name, value))
        headers.extend(self._append)


def _qkey(segment: bytes) -> bytes:
    name = segment.partition(b"=")[0]
    if b"%" in name or b"+" in name:
        return unquote_to_bytes(name.replace(b"+", b" "))
    return name


def _qsegment(name: bytes, value: bytes) -> bytes:
    return quote(name, safe="").encode() + b"=" + quote(value, safe="").encode()


class _QueryOps(_Ops):
    """Query-string operations on the raw query bytes."""

    __slots__ = ()

    def apply(self, query: bytes) -> bytes:
        # Segments are (decoded name, raw bytes); untouched ones are re-joined as is.
        segs = [(_qkey(s), s) for s in query.split(b"&")] if query else []
        if self._remove:
            segs = [(k, s) for k, s in segs if k not in self._remove]
        for old, new in self._rename:
            if any(k == old for k, _ in segs):
                segs = [
                    (new, quote(new, safe="").encode() + s[len(s.partition(b"=")[0]) :])
                    if k == old
                    else (k, s)
                    for k, s in segs
                    if k != new
                ]
        for name, value in self._replace:
            first = next((i for i, (k, _) in enumerate(segs) if k == name), None)
            if first is not None:
                segs = [
                    (k, _qsegment(name, value) if i == first else s)
                    for i, (k, s) in enumerate(segs)
                    if k != name or i == first
                ]
        for name, value in self._add:
            if not any(k == name for k, _ in segs):
                segs.append((name, _qsegment(name, value)))
        for name, value in self._append:
            segs.append((name, _qsegment(name, value)))
        return b"&".join(s for _, s in segs)


class RequestRemove(PluginConfig):
    headers: HeaderNames = ()
    querystring: tuple[str, ...] = ()


class RequestRename(PluginConfig):
    headers: HeaderRenames = ()
    querystring: QueryPairs = ()


class RequestPairs(PluginConfig):
    headers: HeaderPairs = ()
    querystring: QueryPairs = ()


class RequestTransformerConfig(PluginConfig):
    remove: RequestRemove = RequestRemove()
    rename: RequestRename = RequestRename()
    replace: RequestPairs = RequestPairs()
    add: RequestPairs = RequestPairs()
    append: RequestPairs = RequestPairs()


class ResponseRemove(PluginConfig):
    headers: HeaderNames = ()


class ResponseRename(PluginConfig):
    headers: HeaderRenames = ()


class ResponsePairs(PluginConfig):
    headers: HeaderPairs = ()


class ResponseTransformerConfig(PluginConfig):
    remove: ResponseRemove = ResponseRemove()
    rename: ResponseRename = ResponseRename()
    replace: ResponsePairs = ResponsePairs()
    add: ResponsePairs = ResponsePairs()
    append: ResponsePairs = ResponsePairs()


@register
class RequestTransformer(Plugin[RequestTransformerConfig]):
    name = "request-transformer"
    priority = 801
    Config = RequestTransformerConfig

    def __init__(self, config: RequestTransformerConfig) -> None:
        super().__init__(config)
        c = config
        self._headers = _HeaderOps(
            c.remove.headers, c.rename.headers, c.replace.headers, c.add.headers,
            c.append.headers, str.lower,
        )
        self._query = _QueryOps(
            c.remove.querystring,
            c.rename.querystring,
            c.replace.querystring,
            c.add.querystring,
            c.append.querystring,
            _exact,
        )

    def access(self, ctx: RequestContext) -> Response | None:
        if not self._headers.empty:
            self._headers.apply(ctx.headers)
        if not self._query.empty:
            ctx.query = self._query.apply(ctx.query)
        return None


@register
class ResponseTransformer(Plugin[ResponseTransformerConfig]):
    name = "response-transformer"
    priority = 800
    Config = ResponseTransformerConfig

    def __init__(self, config: ResponseTransformerConfig) -> None:
        super().__init__(config)
        c = config
        self._headers = _HeaderOps(
            c.remove.headers, c.rename.headers, c.replace.headers, c.add.headers,
            c.append.headers, str.lower,
        )

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        if not self._headers.empty:
            self._headers.apply(head.headers)
