"""Azure Blob Storage: `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX` (KServe's form) and
`az://CONTAINER/PREFIX` (account from the environment, as obstore/object_store read az://).

Client: the Blob REST API spoken directly with aiohttp, signing requests with Shared Key ourselves
(HMAC-SHA256, stdlib). Why not obstore's AzureStore: its emulator support is a fixed switch and its
errors are opaque strings; a direct client gives one code path for Azure and Azurite (our test
server), exact error mapping by `x-ms-error-code`, and plain range GETs for parallel chunks.

URI semantics (KServe's `_download_azure_blob`): every blob whose name is PREFIX or starts with
`PREFIX/` (PREFIX has its slashes trimmed; none means the whole container), saved relative to
PREFIX; a blob named exactly PREFIX is saved under its base name. Zero-byte blobs (ADLS folder
markers) are skipped, as KServe does. Deliberate difference: KServe's raw `name_starts_with`
also matches siblings such as `PREFIX-v2/...`, turning them into odd paths; we don't. A single
.tar/.tar.gz/.tgz/.zip result is unpacked, as KServe does. A query string on an https URI is a SAS
token (KServe passes it along with the account URL); it is never shown (`redact`).

Credentials, from options.env, first match wins:
1. service principal `AZ_CLIENT_ID`/`AZ_TENANT_ID`/`AZ_CLIENT_SECRET` (KServe) or the `AZURE_*`
   names, or workload identity (`AZURE_FEDERATED_TOKEN_FILE` instead of a secret): an OAuth token
   from `AZURE_AUTHORITY_HOST` (default login.microsoftonline.com);
2. `AZURE_STORAGE_ACCESS_KEY` (KServe; alias `AZURE_STORAGE_ACCOUNT_KEY`): Shared Key;
3. `AZURE_STORAGE_CONNECTION_STRING`: `AccountKey=` or `SharedAccessSignature=`; its
   `BlobEndpoint=` (or `UseDevelopmentStorage=true`) also says where the account lives, which is
   how Azurite is reached, for az:// and for an https URI naming the same account;
4. a SAS in the URI query or `AZURE_STORAGE_SAS_TOKEN`;
5. nothing: anonymous (public containers).
For az:// the account is `AZURE_STORAGE_ACCOUNT_NAME`, else the connection string's AccountName.

Integrity: Azure publishes Content-MD5 (when the uploader set it), not sha256, so RemoteFile.sha256
stays None. Each blob's ETag is its etag (reads send `If-Match`, so a blob rewritten mid-pull fails
instead of mixing versions); the revision is a single blob's ETag or a digest of (path, ETag) pairs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import posixpath
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from yarl import URL

from modelcache.errors import AuthError, NotFoundError, SourceError, TransientSourceError, UsageError
from modelcache.safepath import safe_relpath
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import ListingCap, RemoteFile, Snapshot, SourceOptions, archive_kind, select
from modelcache.sources.gcs import b64_to_hex, listing_revision
from modelcache.sources.transport import (
    SnapshotMismatchError,
    proxy_kwargs,
    ranged_get,
    read_limited,
    status_error,
)
from modelcache.sources.transport import describe as _describe
from modelcache.uri import ModelURI, redact

READ_BLOCK = 1 << 20
API_VERSION = "2021-12-02"
AUTHORITY = "https://login.microsoftonline.com"
STORAGE_SCOPE = "https://storage.azure.com/.default"
#: Azurite's published development account (not a secret: it is in Microsoft's docs).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
AUTH_HINT = (
    "check AZURE_STORAGE_ACCESS_KEY, AZURE_STORAGE_CONNECTION_STRING, a SAS token, or "
    "AZ_CLIENT_ID/AZ_CLIENT_SECRET/AZ_TENANT_ID"
)
_REFRESH_MARGIN = 300.0


def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=Value;...` -> dict; values may themselves contain '=' (keys, SAS tokens)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out[name.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class _Target:
    account: str
    endpoint: str  # e.g. https://acct.blob.core.windows.net or http://127.0.0.1:10000/devstoreaccount1
    container: str
    prefix: str


class _ServicePrincipal:
    """OAuth client-credentials tokens for storage (secret or federated workload-identity token)."""

    def __init__(self, env: Mapping[str, str], client_id: str) -> None:
        self.client_id = client_id
        self.tenant = env.get("AZ_TENANT_ID") or env.get("AZURE_TENANT_ID") or ""
        self.secret = env.get("AZ_CLIENT_SECRET") or env.get("AZURE_CLIENT_SECRET") or ""
        self.token_file = env.get("AZURE_FEDERATED_TOKEN_FILE") or ""
        self.authority = (env.get("AZURE_AUTHORITY_HOST") or AUTHORITY).rstrip("/")
        if not self.tenant:
            raise UsageError("AZ_CLIENT_ID/AZURE_CLIENT_ID is set but AZ_TENANT_ID/AZURE_TENANT_ID is not")
        if not self.secret and not self.token_file:
            raise UsageError(
                "AZ_CLIENT_ID/AZURE_CLIENT_ID is set without AZ_CLIENT_SECRET/AZURE_CLIENT_SECRET or "
                "AZURE_FEDERATED_TOKEN_FILE; managed identity is not supported yet"
            )
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def _form(self) -> dict[str, str]:
        form = {"client_id": self.client_id, "scope": STORAGE_SCOPE, "grant_type": "client_credentials"}
        if self.secret:
            form["client_secret"] = self.secret
            return form
        try:
            with open(self.token_file, encoding="utf-8") as fh:
                assertion = fh.read().strip()
        except OSError as exc:
            raise AuthError(f"cannot read AZURE_FEDERATED_TOKEN_FILE {self.token_file}") from exc
        form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        form["client_assertion"] = assertion
        return form

    async def token(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() > self._expires - _REFRESH_MARGIN:
                await self._refresh(session)
            assert self._token is not None
            return self._token

    async def _refresh(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.authority}/{quote(self.tenant, safe='')}/oauth2/v2.0/token"
        try:
            async with session.post(url, data=self._form(), **proxy_kwargs(url)) as resp:
                status, body = resp.status, await read_limited(resp, "Azure AD token endpoint")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"Azure AD token endpoint: {_describe(exc)}") from exc
        if status in (408, 429) or status >= 500:
            raise TransientSourceError(f"Azure AD token endpoint: HTTP {status}")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(token, str):
            reason = payload.get("error") if isinstance(payload, dict) else None
            short = isinstance(reason, str) and reason.isprintable() and len(reason) < 80
            raise AuthError(
                f"Azure AD refused the service principal: HTTP {status}{f' ({reason})' if short else ''}; "
                "check AZ_CLIENT_ID/AZ_CLIENT_SECRET/AZ_TENANT_ID (or the AZURE_* names)"
            )
        expires_in = payload.get("expires_in", 3600)
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = 3600.0
        self._token = token
        self._expires = time.monotonic() + lifetime


class AzureBlobSource(AiohttpSource):
    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        super().__init__(uri, options)
        env = self.options.env
        conn_text = env.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
        conn = parse_connection_string(conn_text) if conn_text else {}
        if conn.get("UseDevelopmentStorage", "").lower() == "true":
            conn = {"AccountName": DEV_ACCOUNT, "AccountKey": DEV_KEY, "BlobEndpoint": DEV_ENDPOINT, **conn}
        if conn.get("BlobEndpoint") and not conn.get("AccountName"):
            # SAS connection strings often name only the endpoint: the account is its first host
            # label, or the first path segment of an emulator's path-style endpoint.
            ep = urlsplit(conn["BlobEndpoint"])
            segment = ep.path.strip("/").split("/", 1)[0]
            conn["AccountName"] = segment or (ep.hostname or "").split(".", 1)[0]
        self.target, uri_sas = self._parse(conn)
        same_account = conn.get("AccountName", "").lower() == self.target.account.lower()
        self._key: bytes | None = None
        self._sas = ""
        self._principal: _ServicePrincipal | None = None
        self.auth = "anonymous"
        client_id = env.get("AZ_CLIENT_ID") or env.get("AZURE_CLIENT_ID") or ""
        access_key = env.get("AZURE_STORAGE_ACCESS_KEY") or env.get("AZURE_STORAGE_ACCOUNT_KEY") or ""
        if client_id:
            self._principal = _ServicePrincipal(env, client_id)
            self.auth = "service principal"
        elif access_key:
            self._key = self._decode_key(access_key, "AZURE_STORAGE_ACCESS_KEY")
            self.auth = "shared key"
        elif same_account and conn.get("AccountKey"):
            self._key = self._decode_key(conn["AccountKey"], "AZURE_STORAGE_CONNECTION_STRING AccountKey")
            self.auth = "shared key"
        elif same_account and conn.get("SharedAccessSignature"):
            self._sas = conn["SharedAccessSignature"].lstrip("?")
            self.auth = "SAS"
        elif uri_sas or env.get("AZURE_STORAGE_SAS_TOKEN"):
            self._sas = (uri_sas or env.get("AZURE_STORAGE_SAS_TOKEN", "")).lstrip("?")
            self.auth = "SAS"

    def _parse(self, conn: Mapping[str, str]) -> tuple[_Target, str]:
        env = self.options.env
        parts = urlsplit(self.uri.uri)
        if self.uri.scheme == "az":
            container = parts.netloc
            if "@" in container:
                raise UsageError(
                    f"{redact(self.uri.uri)}: az://CONTAINER@ACCOUNT/... is not supported; "
                    "use az://CONTAINER/... with AZURE_STORAGE_ACCOUNT_NAME, or https://ACCOUNT.blob.core.windows.net/CONTAINER/..."
                )
            account = env.get("AZURE_STORAGE_ACCOUNT_NAME") or conn.get("AccountName", "")
            if not account:
                raise UsageError(
                    f"{redact(self.uri.uri)}: az:// needs the storage account: "
                    "set AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING (or use https://ACCOUNT.blob.core.windows.net/...)"
                )
            sas = ""
        else:
            account = (parts.hostname or "").split(".", 1)[0]
            container, _, _ = parts.path.lstrip("/").partition("/")
            sas = parts.query
        if not container:
            raise UsageError(f"malformed URI {redact(self.uri.uri)!r}: no container")
        rest = parts.path if self.uri.scheme == "az" else parts.path.lstrip("/").partition("/")[2]
        prefix = rest.strip("/")
        if conn.get("BlobEndpoint") and conn.get("AccountName", "").lower() == account.lower():
            endpoint = conn["BlobEndpoint"]
        elif self.uri.scheme == "az":
            scheme = conn.get("DefaultEndpointsProtocol", "https")
            endpoint = f"{scheme}://{account}.blob.{conn.get('EndpointSuffix', 'core.windows.net')}"
        else:
            endpoint = f"https://{parts.netloc.rsplit('@', 1)[-1]}"
        ep = urlsplit(endpoint)
        try:
            ep.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise UsageError(f"Azure blob endpoint {redact(endpoint)!r} has a bad port") from exc
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise UsageError(f"Azure blob endpoint {redact(endpoint)!r} must be an http(s) URL")
        return _Target(account, endpoint.rstrip("/"), container, prefix), sas

    @staticmethod
    def _decode_key(value: str, name: str) -> bytes:
        try:
            return base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AuthError(f"{name} is not a base64 account key") from exc

    # -- requests ------------------------------------------------------------------------------

    def _shared_key(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> str:
        """The Shared Key Authorization header (Blob service, version 2009-09-19 and later)."""
        assert self._key is not None
        ms = sorted((k.lower(), v.strip()) for k, v in headers.items() if k.lower().startswith("x-ms-"))
        canon_headers = "".join(f"{k}:{v}\n" for k, v in ms)
        resource = f"/{self.target.account}{path}"
        for k in sorted(query, key=str.lower):
            resource += f"\n{k.lower()}:{query[k]}"
        slots = [
            method,
            *("" for _ in ("Content-Encoding", "Content-Language", "Content-Length", "Content-MD5")),
            "",  # Content-Type
            "",  # Date (x-ms-date is used)
            "",  # If-Modified-Since
            headers.get("If-Match", ""),
            "",  # If-None-Match
            "",  # If-Unmodified-Since
            "",  # Range (x-ms-range is used)
        ]
        to_sign = "\n".join(slots) + "\n" + canon_headers + resource
        digest = hmac.new(self._key, to_sign.encode("utf-8"), hashlib.sha256).digest()
        return f"SharedKey {self.target.account}:{base64.b64encode(digest).decode()}"

    async def _request(
        self, path: str, query: dict[str, str], extra: dict[str, str] | None = None
    ) -> tuple[URL, dict[str, str]]:
        """URL and headers for a signed/authorised GET of `path` (already percent-encoded)."""
        base = urlsplit(self.target.endpoint)
        full_path = base.path + path
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": API_VERSION, **(extra or {})}
        qs = urlencode(query, quote_via=quote, safe="")
        if self._sas:
            qs = f"{qs}&{self._sas}" if qs else self._sas
        if self._key is not None:
            headers["Authorization"] = self._shared_key("GET", full_path, query, headers)
        elif self._principal is not None:
            headers["Authorization"] = f"Bearer {await self._principal.token(self.session())}"
        url = URL(f"{base.scheme}://{base.netloc}{full_path}{'?' + qs if qs else ''}", encoded=True)
        return url, headers

    def _error(self, status: int, code: str, what: str) -> Exception:
        if code in ("ContainerNotFound", "BlobNotFound", "ResourceNotFound") or status == 404:
            hint = ""
            if self.auth == "anonymous" and code == "ResourceNotFound":
                hint = f" (or not public: anonymous access; {AUTH_HINT})"
            return NotFoundError(f"{what}: not found ({code or 'HTTP 404'}){hint}")
        if status in (401, 403) or code in ("PublicAccessNotPermitted", "NoAuthenticationInformation"):
            reason = code or f"HTTP {status}"
            return AuthError(f"{what}: access denied ({reason}) using {self.auth} credentials; {AUTH_HINT}")
        return status_error(status, f"{what} ({code})" if code else what)

    @property
    def _container_label(self) -> str:
        return f"container {self.target.container!r} of account {self.target.account!r}"

    async def _list(self) -> list[tuple[str, int, str | None, str | None]]:
        t = self.target
        blobs: list[tuple[str, int, str | None, str | None]] = []
        cap = ListingCap(self.shown)
        marker = ""
        while True:
            query = {"comp": "list", "restype": "container", "maxresults": "5000"}
            if t.prefix:
                query["prefix"] = t.prefix
            if marker:
                query["marker"] = marker
            try:
                url, headers = await self._request("/" + quote(t.container, safe=""), query)
                async with self.session().get(url, headers=headers, **proxy_kwargs(url)) as resp:
                    status, code, body = (
                        resp.status,
                        resp.headers.get("x-ms-error-code", ""),
                        await read_limited(resp, self.shown),
                    )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise TransientSourceError(f"{self.shown}: {_describe(exc)}") from exc
            if status != 200:
                raise self._error(status, code, self._container_label)
            try:
                root = ET.fromstring(body)
            except ET.ParseError as exc:
                raise SourceError(f"{self.shown}: the server sent an unreadable blob listing") from exc
            for blob in root.iter("Blob"):
                name = blob.findtext("Name")
                props = blob.find("Properties")
                if name is None or props is None:
                    continue
                size_text = props.findtext("Content-Length") or "0"
                if not size_text.isdigit():
                    raise SourceError(f"{self.shown}: blob {name!r} has a bad size")
                etag = props.findtext("Etag")
                if etag and not etag.startswith(('"', "W/")):
                    etag = f'"{etag}"'  # listings omit the quotes that headers (and If-Match) carry
                blobs.append((name, int(size_text), etag, props.findtext("Content-MD5")))
            cap.check(len(blobs))
            marker = root.findtext("NextMarker") or ""
            if not marker:
                return blobs

    async def resolve(self) -> Snapshot:
        prefix = self.target.prefix
        files: list[RemoteFile] = []
        exact = False
        md5s: dict[str, str] = {}
        for name, size, etag, md5 in await self._list():
            if prefix and name == prefix:
                rel, exact = posixpath.basename(prefix), True
            elif not prefix or name.startswith(prefix + "/"):
                rel = name[len(prefix) :].lstrip("/")
            else:
                continue  # a sibling such as PREFIX-v2/...
            if size == 0 or not rel or rel.endswith("/"):
                continue  # folder markers and empty blobs, as KServe skips them
            files.append(RemoteFile(path=safe_relpath(rel, "blob name"), size=size, etag=etag, locator=name))
            if md5:
                md5s[name] = md5
        files = select(files, self.options.include, self.options.exclude)
        if not files:
            where = f"{prefix!r} in " if prefix else ""
            raise NotFoundError(f"{self.shown}: no blobs under {where}{self._container_label}")
        revision = (
            files[0].etag if exact and len(files) == 1 else listing_revision((f.path, f.etag) for f in files)
        )
        archive = archive_kind(files[0].path) if len(files) == 1 else None
        extra = {"account": self.target.account, "container": self.target.container, "prefix": prefix}
        md5 = b64_to_hex(md5s.get(files[0].locator)) if len(files) == 1 else None
        if md5:
            extra["md5"] = md5  # Content-MD5 as the uploader set it: recorded, not a sha256
        return Snapshot(tuple(files), revision=revision, archive=archive, extra=extra)

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.size is not None  # Get Blob honours x-ms-range on every blob type

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        what = f"{self.shown} blob {f.locator!r}"
        extra: dict[str, str] = {}
        stop = end if end is not None else f.size
        if not (start == 0 and (stop is None or stop == f.size)):
            extra["x-ms-range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        if f.etag:
            extra["If-Match"] = f.etag
        path = "/" + quote(self.target.container, safe="") + "/" + quote(f.locator, safe="/~")
        url, headers = await self._request(path, {}, extra)  # signed over x-ms-range: sent as signed

        def on_status(resp: aiohttp.ClientResponse) -> Exception:
            if resp.status == 412:
                return SnapshotMismatchError(f"{what}: the blob changed during the download")
            return self._error(resp.status, resp.headers.get("x-ms-error-code", ""), what)

        stream = ranged_get(
            self.session(),
            url,
            f,
            start,
            end,
            what=what,
            secret=headers,
            range_header="x-ms-range",
            on_status=on_status,
        )
        async with contextlib.aclosing(stream):
            async for block in stream:
                yield block


SOURCE = AzureBlobSource
