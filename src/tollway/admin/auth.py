"""The admin token guard: every admin route needs `Authorization: Bearer <token>`.

The guard is ASGI middleware rather than a per-route dependency so that it fails
closed: a route added later (by any router) is guarded without anyone remembering
to say so. Only what probes and scrapers read stays open: /health and /health/*,
/metrics, and the OpenAPI description (/docs, /openapi.json), which holds no data.
The admin port binds 127.0.0.1 by default; exposing it is an operator's choice.
"""

from __future__ import annotations

from fastapi.security import HTTPBearer
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from tollway.admin.envelope import error_response, request_id_of
from tollway.admin.token import token_matches

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
PUBLIC_PREFIXES = ("/health/",)

# Only declares the scheme in the OpenAPI description (the "Authorize" button in
# /docs); AdminGuard does the checking.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The admin token (TOLLWAY_ADMIN_TOKEN, or data_dir/admin_token).",
)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class AdminGuard:
    """Answers 401 `unauthorized` (in the envelope) unless the bearer token matches."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("the admin guard needs a non-empty token")
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = bearer_token(request.headers.get("authorization"))
        if given is not None and token_matches(self.token, given):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # 1008: policy violation; the handshake is refused before any accept.
            await send({"type": "websocket.close", "code": 1008})
            return
        if given is None:
            message = "This admin API needs the admin token as a bearer token"
            challenge = 'Bearer realm="tollway-admin"'
        else:
            message = "The admin token is not valid"
            challenge = 'Bearer realm="tollway-admin", error="invalid_token"'
        response = error_response(
            401,
            "unauthorized",
            message,
            request_id_of(request),
            headers={"www-authenticate": challenge},
        )
        await response(scope, receive, send)
