"""Durations on the command line (`7d`, `12h`, `90s`, `1h30m`): one parser for gc, stats and --wait."""

from __future__ import annotations

import re

from modelcache.errors import UsageError

_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)")


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in `text`: a number (seconds) or unit parts like 1h30m; anything else is exit 2."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pos, value = 0, 0.0
        for m in _PART.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise UsageError(f"{what} {text!r}: use seconds or units like 30s, 15m, 12h, 7d, 1h30m") from None
    if value < 0 or value != value or value == float("inf"):
        raise UsageError(f"{what} {text!r}: must be a finite, non-negative duration")
    return value


def format_duration(seconds: float) -> str:
    """Short human form (`3d`, `4h`, `12m`, `9s`), for tables."""
    s = max(0.0, seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"
