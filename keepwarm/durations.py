"""Durations as the config writes them: `30s`, `4m`, `1h`, `1m30s`, `250ms`, `7d`."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_LONGEST = 365 * 86400.0  # longer is a typo, and infinity would break every comparison after
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")


def parse_duration(text: object) -> float:
    """Return the duration in seconds, or raise ValueError with a message fit for a user."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"expected a duration such as 30s, 4m or 1h, got {text!r}")
    compact = text.strip()
    if not _WHOLE.fullmatch(compact):
        raise ValueError(f"expected a duration such as 30s, 4m or 1h, got {text!r}")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    if not math.isfinite(seconds) or seconds > _LONGEST:
        raise ValueError(f"duration {text!r} is too long (at most 365d)")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds compactly for logs and tables (`4m`, `1h`, `12.5s`)."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.3g}s"
