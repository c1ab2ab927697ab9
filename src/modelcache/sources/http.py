"""http(s)://: one file (or archive) per URI, read with parallel Range requests when the server allows.

Checksums: a server that publishes `Repr-Digest: sha-256=:<b64>:` (RFC 9530) or the older
`Digest: SHA-256=<b64>` has the file checked against it; otherwise we record our own sha256.
Auth: KServe's `<host>-headers` env (JSON), `MODELCACHE_HTTP_BEARER_TOKEN` or userinfo in the URL; none
ever appears in messages (`redact`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncGenerator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from modelcache.errors import AuthError, NotFoundError, SourceError, TransientSourceError, UsageError
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import RemoteFile, Snapshot, archive_kind
from modelcache.uri import redact

READ_BLOCK = 1 << 20
_DIGEST_RE = re.compile(r"(?i)sha-256=:?([A-Za-z0-9+/=]+):?")


def _sha256_from_headers(headers: Any) -> str | None:
    for name in ("Repr-Digest", "Digest"):
        value = headers.get(name)
        if not value:
            continue
        m = _DIGEST_RE.search(value)
        if m:
            try:
                raw = base64.b64decode(m.group(1), validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 32:
                return raw.hex()
    return None


def status_error(status: int, what: str) -> Exception:
    """Map an HTTP status to our error tree; transient ones are retried by the engine."""
    if status in (404, 410):
        return NotFoundError(f"{what}: not found (HTTP {status})")
    if status in (401, 403):
        return AuthError(f"{what}: access denied (HTTP {status}); check credentials")
    if status in (408, 425, 429) or status >= 500:
        return TransientSourceError(f"{what}: HTTP {status}")
    return SourceError(f"{what}: unexpected HTTP {status}")


class HttpSource(AiohttpSource):
    @property
    def url(self) -> str:
        return self.uri.uri

    @property
    def shown(self) -> str:
        return redact(self.uri.uri)

    def _headers(self) -> dict[str, str]:
        """KServe's `<host>-headers` (a JSON object, as its storage initializer reads it), then our token."""
        headers: dict[str, str] = {}
        host = urlsplit(self.url).hostname or ""
        raw = self.options.env.get(f"{host}-headers")
        if raw:
            try:
                extra = json.loads(raw)
            except ValueError as exc:
                raise UsageError(f"{host}-headers must be a JSON object of header names to values") from exc
            if not isinstance(extra, dict):
                raise UsageError(f"{host}-headers must be a JSON object of header names to values")
            headers.update({str(k): str(v) for k, v in extra.items()})
        token = self.options.env.get("MODELCACHE_HTTP_BEARER_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def session_kwargs(self) -> dict[str, Any]:
        parts = urlsplit(self.url)
        auth = None
        if parts.username is not None:
            auth = aiohttp.BasicAuth(unquote(parts.username), unquote(parts.password or ""))
        return {"auth": auth, "headers": self._headers()}

    def _request_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.username is None:
            return self.url
        netloc = parts.netloc.rsplit("@", 1)[1]
        return parts._replace(netloc=netloc).geturl()

    async def resolve(self) -> Snapshot:
        try:
            async with self.session().head(self._request_url(), allow_redirects=True) as resp:
                status, headers = resp.status, resp.headers
            if status in (405, 501):  # HEAD not allowed: ask for one byte instead
                async with self.session().get(
                    self._request_url(), headers={"Range": "bytes=0-0"}, allow_redirects=True
                ) as resp:
                    status, headers = resp.status, resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{self.shown}: {_describe(exc)}") from exc
        if status not in (200, 206):
            raise status_error(status, self.shown)
        size: int | None = None
        ranges = headers.get("Accept-Ranges", "").lower() == "bytes"
        if status == 206:
            cr = headers.get("Content-Range", "")
            total = cr.rsplit("/", 1)[-1]
            size = int(total) if total.isdigit() else None
            ranges = True
        elif headers.get("Content-Length", "").isdigit() and not headers.get("Content-Encoding"):
            size = int(headers["Content-Length"])
        etag = headers.get("ETag")
        name = unquote(urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]) or "model"
        revision = etag
        if revision is None and headers.get("Last-Modified"):
            try:
                revision = parsedate_to_datetime(headers["Last-Modified"]).isoformat()
            except (TypeError, ValueError):
                revision = None
        f = RemoteFile(
            path=name,
            size=size,
            sha256=_sha256_from_headers(headers),
            etag=etag,
            locator="ranges" if ranges and size is not None else "",
        )
        return Snapshot((f,), revision=revision, archive=archive_kind(name))

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.locator == "ranges"

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        headers: dict[str, str] = {}
        ranged = self.supports_ranges(f) and not (start == 0 and end is None)
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if f.etag and not f.etag.startswith("W/"):
                headers["If-Range"] = f.etag
        try:
            async with self.session().get(self._request_url(), headers=headers, allow_redirects=True) as resp:
                if resp.status not in (200, 206):
                    raise status_error(resp.status, self.shown)
                if ranged and resp.status != 206:
                    # Range ignored, or If-Range failed because the object changed under us.
                    raise TransientSourceError(
                        f"{self.shown}: server ignored the byte range (object changed?)"
                    )
                async for block in resp.content.iter_chunked(READ_BLOCK):
                    yield block
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{self.shown}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """A short reason without the URL (which may carry credentials) and without a traceback."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection broke mid-body (truncated response)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    text = str(exc).split("\n", 1)[0]
    return f"{type(exc).__name__}: {redact(text)}" if text else type(exc).__name__


SOURCE = HttpSource
