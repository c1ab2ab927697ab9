"""Kubernetes resource quantities for sizes, so CLI flags read like the CRDs (`500Mi`, `1.7T`)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from modelcache.errors import UsageError

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
MAX_BYTES = 2**63 - 1  # what every filesystem and the Kubernetes API can express
_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\s*$"
)


def parse_quantity(text: str | int) -> int:
    """Bytes for a quantity; fractions round up so a limit is never silently lowered."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"size must not be negative: {text}")
        return text
    m = _RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r}: use bytes or a Kubernetes quantity like 500Mi, 10Gi, 1.7T")
    number, exponent, suffix = m.group(1), m.group(2), m.group(3) or ""
    if exponent is not None and suffix:
        raise UsageError(f"invalid size {text!r}: an exponent cannot be combined with a suffix")
    if exponent is not None and abs(int(exponent)) > 30:
        raise UsageError(f"invalid size {text!r}: out of range")
    try:
        value = Decimal(number) * Decimal(10) ** int(exponent or 0) * _SUFFIXES[suffix]
    except (InvalidOperation, ArithmeticError, KeyError) as exc:
        raise UsageError(f"invalid size {text!r}") from exc
    if value > MAX_BYTES:
        raise UsageError(f"invalid size {text!r}: larger than {MAX_BYTES} bytes")
    whole = int(value)
    return whole + (1 if value != whole else 0)


def format_bytes(n: int | float) -> str:
    """Human size with binary units, as `du -h` and kubectl users read them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover
