"""http(s)://: one file (or archive) per URI, read with parallel Range requests when the server allows.

Checksums: a server that publishes `Repr-Digest: sha-256=:<b64>:` (RFC 9530) or the older
`Digest: SHA-256=<b64>` has the file checked against it; otherwise we record our own sha256.
Auth: KServe's `<host>-headers` env (JSON), `MODELCACHE_HTTP_BEARER_TOKEN` or userinfo in the URL; none
ever appears in messages (`redact`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import AsyncGenerator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from modelcache.errors import SourceError, UsageError
from modelcache.safepath import UnsafeNameError, safe_relpath
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import RemoteFile, Snapshot, archive_kind
from modelcache.sources.transport import parse_content_range, ranged_get, send, status_error

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


class HttpSource(AiohttpSource):
    @property
    def url(self) -> str:
        return self.uri.uri

    def _credentials(self) -> tuple[dict[str, str], aiohttp.BasicAuth | None]:
        """KServe's `<host>-headers` (a JSON object), our bearer token, or URL user-info: one of them.

        All of them go to the URI's own origin only (see transport.send). Two ways to say who we are
        at once is ambiguous, so it is refused (exit 2) rather than one silently winning.
        """
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        secret: dict[str, str] = {}
        raw = self.options.env.get(f"{host}-headers")
        if raw:
            try:
                extra = json.loads(raw)
            except ValueError as exc:
                raise UsageError(f"{host}-headers must be a JSON object of header names to values") from exc
            if not isinstance(extra, dict):
                raise UsageError(f"{host}-headers must be a JSON object of header names to values")
            secret.update({str(k): str(v) for k, v in extra.items()})
        sources = []
        if any(k.lower() == "authorization" for k in secret):
            sources.append(f"an Authorization header in {host}-headers")
        token = self.options.env.get("MODELCACHE_HTTP_BEARER_TOKEN")
        given = next((v for k, v in secret.items() if k.lower() == "authorization"), None)
        if token and given != f"Bearer {token}":  # the same token said twice is one credential
            sources.append("MODELCACHE_HTTP_BEARER_TOKEN")
            secret["Authorization"] = f"Bearer {token}"
        auth = None
        if parts.username is not None:
            sources.append("user-info in the URL")
            auth = aiohttp.BasicAuth(unquote(parts.username), unquote(parts.password or ""))
        if len(sources) > 1:
            raise UsageError(f"{self.shown}: credentials given twice ({' and '.join(sources)}); use one")
        return secret, auth

    def _request_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.username is None:
            return self.url
        netloc = parts.netloc.rsplit("@", 1)[1]
        return parts._replace(netloc=netloc).geturl()

    def file_name(self) -> str:
        """The file's name: the URL's last path segment, decoded, and checked like any external name."""
        segment = urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]
        try:
            name = unquote(segment, errors="strict") if segment else "model"
            return safe_relpath(name, "file name in the URL")
        except UnsafeNameError as exc:
            raise UsageError(f"{self.shown}: {exc.message}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{self.shown}: the file name in the URL is not valid UTF-8") from None

    async def resolve(self) -> Snapshot:
        name = self.file_name()
        secret, auth = self._credentials()
        url = self._request_url()
        resp = await send(self.session(), "HEAD", url, what=self.shown, secret=secret, auth=auth)
        resp.release()
        status, headers = resp.status, resp.headers
        if status in (405, 501):  # HEAD not allowed: ask for one byte instead
            resp = await send(
                self.session(),
                "GET",
                url,
                what=self.shown,
                headers={"Range": "bytes=0-0"},
                secret=secret,
                auth=auth,
            )
            resp.release()
            status, headers = resp.status, resp.headers
        if status not in (200, 206):
            raise status_error(status, self.shown)
        size: int | None = None
        ranges = headers.get("Accept-Ranges", "").lower() == "bytes"
        if status == 206:
            cr = parse_content_range(headers.get("Content-Range", ""))
            if cr is None or cr[0] != 0 or cr[2] is None:
                raise SourceError(
                    f"{self.shown}: the server answered a 1-byte probe with a bad Content-Range"
                )
            size = cr[2]
            ranges = True
        elif headers.get("Content-Length", "").strip().isdigit() and not headers.get("Content-Encoding"):
            size = int(headers["Content-Length"])
        etag = headers.get("ETag")
        modified = headers.get("Last-Modified")
        revision = etag
        if revision is None and modified:
            try:
                revision = parsedate_to_datetime(modified).isoformat()
            except (TypeError, ValueError):
                revision = None
        f = RemoteFile(
            path=name,
            size=size,
            sha256=_sha256_from_headers(headers),
            etag=etag,
            locator="ranges" if ranges and size is not None else "",
            modified=modified,
        )
        return Snapshot((f,), revision=revision, archive=archive_kind(name))

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.locator == "ranges"

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        secret, auth = self._credentials()
        if not self.supports_ranges(f) and start:
            raise SourceError(f"{self.shown}: cannot resume: the server does not serve byte ranges")
        stream = ranged_get(
            self.session(),
            self._request_url(),
            f,
            start,
            end,
            what=self.shown,
            secret=secret,
            auth=auth,
            if_range=True,
        )
        async with contextlib.aclosing(stream):
            async for block in stream:
                yield block


SOURCE = HttpSource
