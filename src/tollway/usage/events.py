"""One usage event: what the log phase hands to the recorder, and what a row holds."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


# Not frozen, and `ts` may stay an epoch float: the log phase builds one per request,
# and a frozen dataclass plus datetime.fromtimestamp cost about 6 µs there. The
# writer turns floats into UTC datetimes a batch at a time, off the request path.
@dataclass(slots=True)
class UsageEvent:
    ts: datetime | float  # request start: aware datetime, or epoch seconds (UTC)
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
