"""HTTP itself, once, for every source that speaks it (http, hf, gs, azure, oci).

What lives here, so no source has its own copy:
* `check_response`: a pure judgement of a response against the snapshot it must belong to (status,
  Content-Range, Content-Length, ETag/Last-Modified). Servers lie about all of these; a response
  that does not match is `SnapshotMismatchError`, which the engine answers by resolving a fresh
  snapshot once (then exit 6) instead of writing the bytes at the asked offset.
* `send`: one request with redirects followed by hand. Credentials (`secret` headers, which include
  user-info Basic auth and KServe's `<host>-headers`) go to the original origin only, as curl and
  requests do; a redirect to another scheme than http(s) is refused.
* `ranged_get`: `send` + `check_response` + a body that must be exactly as long as promised.
* `describe`: a transport error as a short reason with no URL (URLs may carry credentials).
* `proxy_for`: the forward proxy for one URL from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (either case),
  decided per request (a redirect may leave NO_PROXY's hosts). Not aiohttp's `trust_env`: that also
  sends `~/.netrc` passwords to whatever host a URL names.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import warnings
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from yarl import URL

from modelcache.errors import (
    AuthError,
    NotFoundError,
    SnapshotMismatchError,
    SourceError,
    TransientSourceError,
)
from modelcache.sources.base import RemoteFile
from modelcache.uri import redact

READ_BLOCK = 1 << 20
MAX_REDIRECTS = 10
__all__ = [
    "SnapshotMismatchError",
    "check_response",
    "checked_body",
    "proxy_for",
    "proxy_kwargs",
    "ranged_get",
    "send",
    "status_error",
]
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


def describe(exc: BaseException) -> str:
    """A short reason without the URL (which may carry credentials) and without a traceback."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection broke mid-body (truncated response)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return "too many redirects"
    text = str(exc).split("\n", 1)[0]
    return f"{type(exc).__name__}: {redact(text)}"[:300] if text else type(exc).__name__


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


def proxy_for(url: str | URL, env: Mapping[str, str] | None = None) -> str | None:
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


def proxy_kwargs(url: str | URL, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`proxy=` (and `proxy_headers=` with its Basic credentials) for one aiohttp request to `url`."""
    proxy = proxy_for(url, env)
    if proxy is None:
        return {}
    p = urlsplit(proxy)
    if p.username is None:
        return {"proxy": proxy}
    # aiohttp turns only `proxy_auth` into Proxy-Authorization for plain-http targets (proxy_headers
    # go to CONNECT only); BasicAuth is deprecated with no replacement for that yet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        auth = aiohttp.BasicAuth(unquote(p.username), unquote(p.password or ""))
    return {"proxy": p._replace(netloc=p.netloc.rsplit("@", 1)[1]).geturl(), "proxy_auth": auth}


# --------------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------------
async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
    secret: Mapping[str, str] | None = None,
    auth: aiohttp.BasicAuth | None = None,
    follow: bool = True,
) -> aiohttp.ClientResponse:
    """One request; redirects followed by hand with credentials kept to the first origin.

    `secret` headers and `auth` are sent only while the URL has the original scheme, host and port.
    The caller releases the response. Transport errors become TransientSourceError (no URL).
    """
    first = str(url)
    current: str | URL = url
    for _ in range(MAX_REDIRECTS + 1):
        here = str(current)
        trusted = same_origin(here, first)
        hdrs = dict(headers or {})
        if trusted and secret:
            hdrs.update(secret)
        try:
            resp = await session.request(
                method,
                current,
                headers=hdrs,
                auth=auth if trusted else None,
                allow_redirects=False,
                **proxy_kwargs(current),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{what}: {describe(exc)}") from exc
        except ValueError as exc:  # a URL aiohttp refuses
            raise SourceError(f"{what}: unusable URL ({type(exc).__name__})") from exc
        if not follow or resp.status not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
            return resp
        location = resp.headers["Location"]
        resp.release()
        nxt = urljoin(here, location)
        if urlsplit(nxt).scheme.lower() not in ("http", "https"):
            raise SourceError(f"{what}: redirected to an unsupported scheme")
        if urlsplit(first).scheme == "https" and urlsplit(nxt).scheme == "http":
            raise SourceError(f"{what}: refusing a redirect from https to plain http")
        if resp.status == 303:
            method = "GET" if method != "HEAD" else "HEAD"
        current = URL(nxt, encoded=True) if "%" in nxt else nxt
    raise SourceError(f"{what}: too many redirects (over {MAX_REDIRECTS})")


async def ranged_get(
    session: aiohttp.ClientSession,
    url: str | URL,
    f: RemoteFile,
    start: int,
    end: int | None,
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
    secret: Mapping[str, str] | None = None,
    auth: aiohttp.BasicAuth | None = None,
    range_header: str = "Range",
    if_range: bool = False,
    on_status: Callable[[aiohttp.ClientResponse], Exception | None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Stream bytes [start, end) of `f`, each response checked against the snapshot.

    `on_status` maps a non-2xx response to the source's own error (None: the generic mapping).
    A body longer than promised is a lie too (SnapshotMismatchError); a shorter one is
    TransientSourceError (the engine resumes from what was written).
    """
    stop = end if end is not None else f.size
    ranged = not (start == 0 and (stop is None or stop == f.size))
    hdrs = dict(headers or {})
    if ranged:
        hdrs[range_header] = f"bytes={start}-{'' if stop is None else stop - 1}"
        if if_range and f.etag and not f.etag.startswith("W/"):
            hdrs["If-Range"] = f.etag
    want = Expect(start, stop, f.size, ranged, etag=f.etag, modified=f.modified)
    resp = await send(session, "GET", url, what=what, headers=hdrs, secret=secret, auth=auth)
    try:
        if resp.status not in (200, 206):
            err = on_status(resp) if on_status else None
            raise err or status_error(resp.status, what)
        body = checked_body(resp, want, what)
        async with contextlib.aclosing(body):
            async for block in body:
                yield block
    finally:
        resp.release()


async def checked_body(resp: aiohttp.ClientResponse, want: Expect, what: str) -> AsyncGenerator[bytes, None]:
    """The body of a 2xx response, after `check_response`, never longer than promised."""
    reason = check_response(resp.status, resp.headers, want)
    if reason is not None:
        raise SnapshotMismatchError(f"{what}: {reason}")
    left = want.length
    try:
        async for block in resp.content.iter_chunked(READ_BLOCK):
            if left is not None:
                if len(block) > left:
                    raise SnapshotMismatchError(f"{what}: the server sent more bytes than promised")
                left -= len(block)
            yield block
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise TransientSourceError(f"{what}: {describe(exc)}") from exc
