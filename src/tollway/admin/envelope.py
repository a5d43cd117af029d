"""The gateway's error envelope for the in-process FastAPI apps (admin, platform APIs).

`install_error_handlers(app)` makes every error such an app answers use the same
envelope the data plane renders (`tollway.gateway.errors.envelope`): HTTPException,
request validation (422, with the field paths), `GatewayError` and the identity
package's `IdentityError` raised by handlers (404 `not_found`, 409 `conflict`, 422
`validation_error` naming the field), and anything unexpected (500
`internal_error`, no exception text leaked).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tollway.gateway.errors import ERROR_CODES, GatewayError, envelope
from tollway.identity.errors import Conflict, IdentityError, InvalidInput, NotFound
from tollway.observability.logging import get_logger

REQUEST_ID_HEADER = "x-request-id"

# Codes for statuses a FastAPI app raises without naming a code; the data plane's
# ERROR_CODES has no 401/404/409/422 of its own.
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    501: "not_implemented",
    503: "service_unavailable",
}

# An id arriving from outside is echoed back; keep it to a safe, bounded shape.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

_log = get_logger("tollway.admin")


def request_id_of(request: Request) -> str:
    """The caller's (or the data plane's) X-Request-ID, else a fresh one."""
    cached = getattr(request.state, "request_id", None)
    if isinstance(cached, str):
        return cached
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given and _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
    request.state.request_id = request_id
    return request_id


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    all_headers = dict(headers or {})
    if request_id is not None:
        all_headers[REQUEST_ID_HEADER] = request_id
    return Response(
        content=envelope(code, message, request_id, details),
        status_code=status,
        media_type="application/json",
        headers=all_headers,
    )


def code_for_status(status: int) -> str:
    return STATUS_CODES.get(status, f"http_{status}")


def field_path(loc: Sequence[str | int]) -> str:
    """("body", "items", 0, "name") -> "body.items[0].name"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = code_for_status(exc.status_code)
    message = str(exc.detail)
    details: Any = None
    # A handler may name its own code: HTTPException(409, {"code": ..., "message": ...}).
    if isinstance(exc.detail, dict):
        code = str(exc.detail.get("code", code))
        message = str(exc.detail.get("message", message))
        details = exc.detail.get("details")
    return error_response(
        exc.status_code, code, message, request_id_of(request), details, exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"field": field_path(e["loc"]), "message": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    return error_response(
        422, "validation_error", "The request is invalid", request_id_of(request), details
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in exc.headers}
    return error_response(
        exc.status or 500,
        exc.code,
        exc.message or "Error",
        request_id_of(request),
        exc.details,
        headers,
    )


def identity_status(exc: IdentityError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidInput):
        return 422
    return 400


def located_field(request: Request, field: str) -> str:
    """"email" -> "body.email" / "query.email" / "path.id": the place request
    validation would name, so that a client reads one kind of path whichever layer
    refused the value."""
    head = field.split(".", 1)[0].split("[", 1)[0]
    if head in request.path_params:
        return f"path.{field}"
    if head in request.query_params:
        return f"query.{field}"
    if request.method in ("POST", "PUT", "PATCH"):
        return f"body.{field}"
    return f"query.{field}"


async def _identity_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdentityError)
    status = identity_status(exc)
    details: Any = None
    if exc.field:
        field = located_field(request, exc.field)
        details = [{"field": field, "message": exc.message, "type": exc.code}]
        if status != 422:
            details = {"field": field}
    return error_response(status, exc.code, exc.message, request_id_of(request), details)


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request_id_of(request)
    # Starlette re-raises after this handler and uvicorn logs the traceback; this
    # line ties that traceback to the request id the client was given.
    _log.error(
        "unhandled_error",
        request_id=request_id,
        path=request.url.path,
        error_type=type(exc).__name__,
    )
    _, message = ERROR_CODES["internal_error"]
    return error_response(500, "internal_error", message, request_id)


def install_error_handlers(app: FastAPI) -> None:
    # Async handlers: Starlette runs sync ones in its thread pool.
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(IdentityError, _identity_error)
    app.add_exception_handler(Exception, _unexpected)
