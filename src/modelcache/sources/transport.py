"""HTTP itself, once, for every source that speaks it through aiohttp (http, hf, gs, azure, oci).

The rules are pure and live in `httprules` (re-exported here): `check_response` judges a response
against the snapshot it must belong to, `status_error` maps a status, `proxy_for` picks the node's
proxy for one URL. What lives here is the I/O, so no source has its own copy:
* `send`: one request with redirects followed by hand. Credentials (`secret` headers, which include
  user-info Basic auth and KServe's `<host>-headers`) go to the original origin only, as curl and
  requests do; a redirect to another scheme than http(s) is refused.
* `ranged_get`: `send` + `check_response` + a body that must be exactly as long as promised.
* `describe`: a transport error as a short reason with no URL (URLs may carry credentials).
* `proxy_kwargs`: `proxy_for` as aiohttp's arguments. Not aiohttp's `trust_env`: that also sends
  `~/.netrc` passwords to whatever host a URL names.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from yarl import URL

from modelcache.errors import (
    SnapshotMismatchError,
    SourceError,
    TransientSourceError,
)
from modelcache.sources.base import RemoteFile
from modelcache.sources.httprules import (
    Expect,
    bypass_proxy,
    check_response,
    parse_content_range,
    proxy_for,
    same_origin,
    status_error,
)
from modelcache.uri import redact

READ_BLOCK = 1 << 20
MAX_REDIRECTS = 10
#: The most a listing page, token or manifest may be: far above any real one (a 1000-entry page is
#: well under 1 MiB), so a hostile server's endless document costs this much memory, not all of it.
METADATA_LIMIT = 64 << 20
__all__ = [
    "Expect",
    "SnapshotMismatchError",
    "bypass_proxy",
    "check_response",
    "checked_body",
    "parse_content_range",
    "proxy_for",
    "proxy_kwargs",
    "ranged_get",
    "read_limited",
    "same_origin",
    "send",
    "status_error",
]


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


async def read_limited(resp: aiohttp.ClientResponse, what: str, limit: int = METADATA_LIMIT) -> bytes:
    """A whole (metadata) body, read no further than `limit` bytes: SourceError past that."""
    length = resp.content_length
    buf = bytearray()
    if length is None or length <= limit:
        async for block in resp.content.iter_chunked(1 << 16):
            buf += block
            if len(buf) > limit:
                break
    if (length is not None and length > limit) or len(buf) > limit:
        raise SourceError(f"{what}: the server's answer is larger than {limit >> 20} MiB: not a usable reply")
    return bytes(buf)


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
