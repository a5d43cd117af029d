"""Process settings: one pydantic-settings class, every field a TOLLWAY_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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
