from __future__ import annotations

import pytest
from plugin_helpers import build_ctx, envelope_of

from tollway.gateway.context import Response
from tollway.plugins.parameter_pollution import ParameterPollution, ParameterPollutionConfig


def plugin(**cfg: object) -> ParameterPollution:
    return ParameterPollution(ParameterPollutionConfig.model_validate(cfg))


def run(query: bytes, **cfg: object) -> tuple[Response | None, bytes]:
    ctx = build_ctx(query=query, request_id="rid-q")
    resp = plugin(**cfg).access(ctx)
    return resp, ctx.query


@pytest.mark.parametrize(
    "query", [b"", b"a=1", b"a=1&b=2&c=%20x", b"a=1&&b=2", b"q=caf%C3%A9&page=2&sort=-date"]
)
def test_queries_without_repeats_are_untouched(query: bytes) -> None:
    assert run(query) == (None, query)


def test_last_value_wins_and_other_params_keep_bytes_and_order() -> None:
    resp, query = run(b"role=user&x=%41%2b&role=admin&y&role=root&z=1")
    assert resp is None
    assert query == b"x=%41%2b&y&role=root&z=1"


def test_encoded_names_count_as_repeats() -> None:
    _, query = run(b"role=user&%72ole=admin&a+b=1&a%20b=2")
    assert query == b"%72ole=admin&a%20b=2"


def test_reject_mode_names_the_parameter() -> None:
    resp, query = run(b"a=1&role=user&role=admin", mode="reject")
    assert isinstance(resp, Response)
    assert resp.status == 400
    body = envelope_of(resp)
    assert body["error"]["code"] == "parameter_pollution"
    assert body["error"]["details"] == {"parameter": "role", "parameters": ["role"]}
    assert "'role'" in body["message"]
    assert body["requestId"] == "rid-q"
    assert query == b"a=1&role=user&role=admin"


def test_allowed_names_stay_arrays() -> None:
    resp, query = run(b"tag=a&id=1&tag=b&id=2&tag=c", allow=["tag"])
    assert resp is None
    assert query == b"tag=a&tag=b&id=2&tag=c"
    resp, query = run(b"tag=a&tag=b", allow=["tag"], mode="reject")
    assert (resp, query) == (None, b"tag=a&tag=b")


def test_undecodable_names_never_raise() -> None:
    resp, _ = run(b"%ff%fe=1&%ff%fe=2", mode="reject")
    assert isinstance(resp, Response)
    assert resp.status == 400
    assert run(b"%ff=1&%ff=2&%zz=3")[1] == b"%ff=2&%zz=3"
