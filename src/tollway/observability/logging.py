"""Structured logs: one JSON object per line on stderr, from structlog and stdlib alike.

Everything goes through stdlib `logging` so that uvicorn's loggers and any library's
records come out in the same shape as Tollway's own: `timestamp` (ISO 8601, UTC),
`level`, `event`, `logger`, plus whatever was bound. A request id bound with
`bind_request_id` appears on every line logged in that context.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["json", "console"]

# uvicorn's loggers get handlers of their own when something hands uvicorn a
# log_config; clearing them makes their records reach our root handler only once.
_ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class _TollwayHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installs, so a second configure replaces it."""


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def configure_logging(
    level: str = "info",
    fmt: LogFormat = "json",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to one handler; safe to call again."""
    out = stream if stream is not None else sys.stderr
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")

    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The console renderer prints tracebacks itself, prettier than a string.
            *([structlog.processors.format_exc_info] if fmt == "json" else []),
            renderer,
        ],
    )
    handler = _TollwayHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TollwayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in _ROUTED_LOGGERS:
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Caching would freeze loggers created before a reconfigure (tests, CLI).
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def bind_request_id(request_id: str) -> None:
    """Add `request_id` to every line logged from the current context on."""
    structlog.contextvars.bind_contextvars(request_id=request_id)


def bind_context(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()
