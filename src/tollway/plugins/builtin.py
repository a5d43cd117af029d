"""The bundled plugins. Importing this module registers them all."""

from __future__ import annotations

from tollway.plugins import (  # noqa: F401 (importing a plugin module registers it)
    abuse_detection,
    access_log,
    compression,
    cors,
    header_transformer,
    ip_restriction,
    key_auth,
    parameter_pollution,
    rate_limit,
    request_id,
    request_size_limiting,
    security_headers,
    trusted_hosts,
)
