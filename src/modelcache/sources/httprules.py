"""HTTP's rules as pure functions, with no HTTP client imported: what a response must look like
(`check_response`), how a status maps to our errors (`status_error`), and which proxy a URL goes
through (`proxy_for`). `transport` does the I/O with aiohttp; the s3 source, whose bytes come through
obstore, uses these without paying for aiohttp's import (0.11 s of every s3 pull's start).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelcache.errors import AuthError, NotFoundError, SourceError, TransientSourceError

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def status_error(status: int, what: str) -> Exception:
    """Map an HTTP status to our error tree; transient ones are retried by the engine."""
    if status in (404, 410):
        return NotFoundError(f"{what}: not found (HTTP {status})")
    if status in (401, 403):
        return AuthError(f"{what}: access denied (HTTP {status}); check credentials")
    if status in (408, 425, 429) or status >= 500:
        return TransientSourceError(f"{what}: HTTP {status}")
    return SourceError(f"{what}: unexpected HTTP {status}")


# --------------------------------------------------------------------------------------------
# Pure checks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """What a response to one read must look like. `end` is exclusive; None means to the end."""

    start: int
    end: int | None
    size: int | None  # the whole file's size in the snapshot
    ranged: bool  # whether we sent a Range header
    etag: str | None = None  # the snapshot's validator, compared when the response carries one
    modified: str | None = None

    @property
    def length(self) -> int | None:
        stop = self.end if self.end is not None else self.size
        return None if stop is None else stop - self.start


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """`bytes A-B/T` -> (A, B+1, T or None); None when it does not parse or is inconsistent."""
    m = _CONTENT_RANGE_RE.match(value or "")
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last + 1, total


def _strong(etag: str | None) -> str | None:
    if not etag:
        return None
    etag = etag.strip()
    return etag[2:] if etag.startswith("W/") else etag


def check_response(status: int, headers: Mapping[str, str], want: Expect) -> str | None:
    """Why this (2xx) response does not belong to the snapshot, or None when it does.

    Pure: the caller has already mapped non-2xx statuses to errors.
    """
    if status not in (200, 206):
        return f"unexpected HTTP {status} for a read"
    if want.ranged and status != 206:
        return "the server ignored the byte range (sent the whole object instead)"
    if not want.ranged and status == 206 and "Content-Range" not in headers:
        return "206 Partial Content to a request without a Range, and no Content-Range"
    if status == 206:
        cr = parse_content_range(headers.get("Content-Range", ""))
        if cr is None:
            return f"unparseable Content-Range {headers.get('Content-Range', '')[:80]!r}"
        first, stop, total = cr
        want_stop = want.end if want.end is not None else want.size
        if first != want.start or (want_stop is not None and stop != want_stop):
            asked = f"{want.start}-{'' if want_stop is None else want_stop - 1}"
            return f"asked for bytes {asked}, the server sent {first}-{stop - 1}"
        if want.size is not None and total is not None and total != want.size:
            return f"the object is now {total} bytes, the snapshot said {want.size}"
    length = headers.get("Content-Length")
    known = length is not None and want.length is not None and not headers.get("Content-Encoding")
    if known and length is not None and (not length.strip().isdigit() or int(length) != want.length):
        return f"Content-Length {length[:20]!r} where {want.length} bytes were expected"
    etag = _strong(headers.get("ETag"))
    if want.etag and etag and etag != _strong(want.etag):
        return "the object changed since the snapshot (ETag differs)"
    modified = headers.get("Last-Modified")
    if want.modified and modified and modified.strip() != want.modified.strip() and not want.etag:
        return "the object changed since the snapshot (Last-Modified differs)"
    return None


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)

    def port(p: Any) -> int | None:
        try:
            return int(p.port or {"http": 80, "https": 443}.get(p.scheme, 0))
        except ValueError:
            return None

    return (pa.scheme.lower(), (pa.hostname or "").lower(), port(pa)) == (
        pb.scheme.lower(),
        (pb.hostname or "").lower(),
        port(pb),
    )


def _env_var(env: Mapping[str, str], name: str) -> str:
    """curl's rule: the lower-case variable wins (CGI sets HTTP_PROXY from a request header)."""
    return (env.get(name.lower()) or env.get(name.upper()) or "").strip()


def bypass_proxy(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY names `host`: `*`, a domain and its subdomains (`.x.com` or `x.com`), an IP,
    a CIDR range, each optionally with `:port`. Pure."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        want_port: int | None = None
        if entry.startswith("["):  # [v6]:port
            inner, _, rest = entry[1:].partition("]")
            entry = inner
            if rest.startswith(":") and rest[1:].isdigit():
                want_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, p = entry.partition(":")
            if p.isdigit():
                entry, want_port = name, int(p)
        if want_port is not None and want_port != port:
            continue
        if addr is not None:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip("*").lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def proxy_for(url: object, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL (as configured, user-info included) for one request to `url`, or None: direct.

    `env` defaults to the process environment: a proxy describes the node's network, not a model.
    """
    env = os.environ if env is None else env
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None
    proxy = _env_var(env, "HTTPS_PROXY") if scheme == "https" else _env_var(env, "HTTP_PROXY")
    if not proxy:
        return None
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    if bypass_proxy(parts.hostname or "", port, _env_var(env, "NO_PROXY")):
        return None
    return proxy if "://" in proxy else "http://" + proxy
