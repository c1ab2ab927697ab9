"""Peer request signing: HMAC-SHA256 over the request with the cluster's shared peer token.

Why not a bearer token: peer traffic is plain HTTP on the node network, and a signature reveals
nothing that lets an eavesdropper ask for other files. A signature is valid for `SKEW` seconds
either way (node clocks are NTP-synced); replaying one only re-fetches the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Modelcache-Peer"
SKEW = 300.0


def _mac(token: str, stamp: int, method: str, path: str, range_: str) -> str:
    msg = f"{stamp}\n{method.upper()}\n{path}\n{range_}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def sign(token: str, method: str, path: str, range_: str = "", now: float | None = None) -> str:
    """The header value for one request (`path` as sent, query included)."""
    stamp = int(time.time() if now is None else now)
    return f"v1 t={stamp},s={_mac(token, stamp, method, path, range_)}"


def verify(
    token: str, value: str | None, method: str, path: str, range_: str = "", now: float | None = None
) -> bool:
    """Whether `value` signs this request with `token`, within the clock window."""
    if not token or not value or not value.startswith("v1 "):
        return False
    fields = dict(part.split("=", 1) for part in value[3:].split(",") if "=" in part)
    stamp, sig = fields.get("t", ""), fields.get("s", "")
    if not stamp.isdigit() or len(stamp) > 12:
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > SKEW:
        return False
    return hmac.compare_digest(sig, _mac(token, int(stamp), method, path, range_))
