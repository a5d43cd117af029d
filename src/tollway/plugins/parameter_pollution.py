"""parameter-pollution: repeated query parameters (seed 000's HPP).

Priority 1800: after the size limit, before authentication and before
request-transformer (801), so parameters a transformer appends on purpose are
never judged as pollution.

`?role=user&role=admin` is read as "user" by one framework, "admin" by another and
["user", "admin"] by a third; an attacker uses that disagreement to slip a value
past a check. `mode: last` keeps only the last occurrence of each repeated name
(what HPP does) and rewrites the query the upstream sees; `mode: reject` refuses
the request with 400 `parameter_pollution` naming the parameter. Names listed in
`allow` may repeat (they are arrays on purpose) and are left alone.

Names are compared after percent-decoding (`a=1&%61=2` repeats `a`), so encoding
cannot hide a repeat. Parameters that are not rewritten keep their exact bytes and
their order.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from pydantic import Field

from tollway.gateway.context import RequestContext, Response
from tollway.plugins.base import Plugin, PluginConfig, register

_VARS_KEY = "parameter-pollution"


def _key(raw_name: bytes) -> bytes:
    if b"%" in raw_name or b"+" in raw_name:
        return unquote_to_bytes(raw_name.replace(b"+", b" "))
    return raw_name


class ParameterPollutionConfig(PluginConfig):
    mode: Literal["last", "reject"] = Field(
        default="last", description="keep the last value, or refuse the request (400)"
    )
    allow: tuple[str, ...] = Field(default=(), description="names that may repeat")


@register
class ParameterPollution(Plugin[ParameterPollutionConfig]):
    name = "parameter-pollution"
    priority = 1800
    Config = ParameterPollutionConfig

    def __init__(self, config: ParameterPollutionConfig) -> None:
        super().__init__(config)
        self._allow = frozenset(n.encode() for n in config.allow)

    def access(self, ctx: RequestContext) -> Response | None:
        query = ctx.query
        if b"&" not in query:
            return None
        segments = query.split(b"&")
        raw_names = [seg.partition(b"=")[0] for seg in segments]
        if len(set(raw_names)) == len(raw_names):
            # Distinct raw names are distinct names unless encoding could make two
            # equal; only then is decoding needed.
            joined = b"&".join(raw_names)
            if b"%" not in joined and b"+" not in joined:
                return None
        keys = [_key(name) if seg else None for seg, name in zip(segments, raw_names, strict=True)]
        named = [k for k in keys if k is not None]
        if len(set(named)) == len(named):
            return None
        # Index of the last occurrence of each name: the one kept.
        last: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k is not None and k not in self._allow:
                last[k] = i
        repeated: list[bytes] = []
        kept: list[bytes] = []
        for i, (seg, k) in enumerate(zip(segments, keys, strict=True)):
            if k is None or k in self._allow or last[k] == i:
                kept.append(seg)
            elif k not in repeated:
                repeated.append(k)
        if not repeated:
            return None
        names = [k.decode("utf-8", "replace") for k in repeated]
        if self.config.mode == "reject":
            details: dict[str, Any] = {"parameter": names[0], "parameters": names}
            return Response.error(
                "parameter_pollution",
                ctx.request_id,
                f"The query parameter {names[0]!r} is repeated",
                details=details,
            )
        ctx.query = b"&".join(kept)
        ctx.vars[_VARS_KEY] = names
        return None
