"""The bundled plugins. Importing this module registers them all."""

from __future__ import annotations

from tollway.plugins import (
    access_log,
    compression,
    cors,
    header_transformer,
    ip_restriction,
    parameter_pollution,
    request_id,
    request_size_limiting,
    security_headers,
    trusted_hosts,
)

MODULES = (
    access_log,
    compression,
    cors,
    header_transformer,
    ip_restriction,
    parameter_pollution,
    request_id,
    request_size_limiting,
    security_headers,
    trusted_hosts,
)
