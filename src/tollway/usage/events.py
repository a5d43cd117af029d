"""One usage event: what the log phase hands to the recorder, and what a row holds."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(slots=True, frozen=True)
class UsageEvent:
    ts: datetime  # request start, timezone-aware UTC
    consumer_id: uuid.UUID
    key_id: uuid.UUID | None
    route: str | None
    method: str
    path: str  # without the query string
    status: int
    upstream_latency_ms: float | None
    latency_ms: float
    bytes_in: int
    bytes_out: int
    request_id: str | None
    client_ip: str | None
