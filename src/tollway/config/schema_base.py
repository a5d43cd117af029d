"""Field types every config model shares: durations, sizes, regexes, the frozen base."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """'2s', '500ms', '1.5m', '1h', or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 2s, 500ms or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("must be a duration such as 2s, 500ms or 1m")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite, non-negative duration")
    return seconds


def parse_size(value: Any) -> int:
    """'10m', '512k', '1g', '100b' or a number of bytes -> bytes (1k = 1024)."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512k, 10m or 1g")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "b").lower()[0]
        return int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    raise ValueError("must be a size such as 512k, 10m or 1g")


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
# A string that must compile as a Python regular expression.
Regex = Annotated[str, AfterValidator(_compiles)]
Size = Annotated[int, BeforeValidator(parse_size)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
