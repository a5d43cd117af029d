"""The one error envelope every gateway-made error uses, and its stable codes.

Upstream responses never pass through here: only what Tollway itself answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# code -> (HTTP status, default message). Codes are part of the public API: never
# rename one, only add.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "The request is malformed"),
    "route_not_found": (404, "No route matches this request"),
    "method_not_allowed": (405, "Method not allowed on this route"),
    "request_timeout": (408, "The request was not received in time"),
    "payload_too_large": (413, "The request body is too large"),
    "uri_too_long": (414, "The request URI is too long"),
    "headers_too_large": (431, "The request headers are too large"),
    "expectation_failed": (417, "Unsupported expectation"),
    "not_implemented": (501, "Not implemented"),
    "version_not_supported": (505, "HTTP version not supported"),
    "forbidden": (403, "Forbidden"),
    "ip_forbidden": (403, "Your IP address is not allowed"),
    "host_not_allowed": (403, "Host not allowed"),
    "origin_not_allowed": (403, "Origin not allowed"),
    "parameter_pollution": (400, "A query parameter is repeated"),
    "missing_api_key": (401, "An API key is required"),
    "invalid_api_key": (401, "The API key is not valid"),
    "key_disabled": (403, "The API key is disabled"),
    "key_expired": (403, "The API key has expired"),
    "insufficient_scope": (403, "The API key may not call this route"),
    "auth_unavailable": (503, "Credentials cannot be checked right now; retry shortly"),
    "upstream_unavailable": (502, "The upstream service could not be reached"),
    "upstream_bad_response": (502, "The upstream service sent an invalid response"),
    "upstream_timeout": (504, "The upstream service did not answer in time"),
    "no_healthy_upstream": (503, "No healthy upstream target"),
    "circuit_open": (503, "The upstream circuit is open"),
    "service_unavailable": (503, "The gateway is shutting down"),
    "internal_error": (500, "Internal gateway error"),
    # Admin and platform APIs (FastAPI apps) share the same codes.
    "not_found": (404, "Not found"),
    "unauthorized": (401, "Authentication required"),
    "conflict": (409, "Conflict"),
    "validation_error": (422, "The request did not validate"),
    "rate_limited": (429, "Too many requests"),
    "limiter_unavailable": (503, "Rate limits cannot be checked right now; retry shortly"),
    "temporarily_blocked": (403, "Too many failed requests from this source; retry later"),
    "not_ready": (503, "Not ready"),
    "health_check_failed": (503, "A health check failed"),
    "unhealthy": (503, "The gateway is down"),
}


@dataclass(slots=True)
class GatewayError(Exception):
    """An error the gateway answers itself. Raise it anywhere on the request path."""

    code: str
    message: str | None = None
    details: Any = None
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __post_init__(self) -> None:
        default_status, default_message = ERROR_CODES.get(self.code, (500, "Error"))
        if self.status is None:
            self.status = default_status
        if self.message is None:
            self.message = default_message

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def envelope(
    code: str,
    message: str,
    request_id: str | None,
    details: Any = None,
) -> bytes:
    """Render the DESIGN.md error envelope as JSON bytes."""
    return json.dumps(
        {
            "responseStatus": "error",
            "message": message,
            "data": None,
            "error": {"code": code, "details": details},
            "requestId": request_id,
        },
        separators=(",", ":"),
        default=str,
    ).encode()
