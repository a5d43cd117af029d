"""Process settings: one pydantic-settings class, every field a TOLLWAY_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLWAY_", extra="ignore")

    config: Path | None = Field(default=None, description="Path of tollway.yaml")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8001, ge=0, le=65535)
    data_dir: Path = Path("data")
    workers: int = Field(default=1, ge=1, le=256)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Where the access log plugin writes: "-" for stdout, else a file path.
    access_log: str = "-"

    # Client-side limits (413/414/431).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_header_count: int = Field(default=100, ge=1)
    max_uri_length: int = Field(default=8 * 1024, ge=64)
    # Largest request body any route accepts; request-size-limiting lowers it per route.
    max_body_size: int = Field(default=1024 * 1024 * 1024, ge=0)

    # Client-side timeouts, seconds (408 when they expire mid-request).
    keepalive_timeout: float = Field(default=75.0, gt=0)
    header_timeout: float = Field(default=30.0, gt=0)
    body_timeout: float = Field(default=60.0, gt=0)
    websocket_idle_timeout: float = Field(default=3600.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, ge=0)

    # Seconds between checks of the config file's modification time (0: never).
    reload_poll_interval: float = Field(default=1.0, ge=0)

    # Storage. Unset: a SQLite file in data_dir. postgresql+asyncpg://... for PostgreSQL.
    database_url: str | None = None
    # redis://host:port/db: shared limits, cache invalidation across nodes. Unset: none.
    redis_url: str | None = None
    # Without Redis, `--workers N` with the rate-limit plugin is refused (each worker
    # would count alone, allowing N times the limit) unless this says so explicitly.
    per_worker_limits: bool = False
    # HMAC pepper for API keys. Unset: generated once into data_dir/key_pepper.
    key_pepper: SecretStr | None = None
    # Bearer token for the admin API. Unset: generated once into data_dir/admin_token.
    admin_token: SecretStr | None = None

    # API key cache (per worker): entries, seconds a hit / a miss stays cached, and
    # how often the database's invalidation outbox is polled (the 1 s refusal bound).
    key_cache_size: int = Field(default=100_000, ge=1)
    key_cache_ttl: float = Field(default=60.0, gt=0)
    key_cache_negative_ttl: float = Field(default=10.0, gt=0)
    invalidation_poll_interval: float = Field(default=0.25, gt=0)
    # Seconds between batched writes of keys' last_used_at.
    last_used_flush_interval: float = Field(default=10.0, gt=0)

    # Usage records: queue bound (oldest dropped past it), batch size and delay.
    usage_queue_size: int = Field(default=100_000, ge=1)
    usage_batch_size: int = Field(default=1000, ge=1)
    usage_flush_interval: float = Field(default=0.5, gt=0)
    usage_retention_days: int = Field(default=30, ge=1, le=36500)
