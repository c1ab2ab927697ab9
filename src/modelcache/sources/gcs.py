"""gs://bucket/prefix: Google Cloud Storage, every object under a prefix or one object, as KServe.

Client: the GCS JSON API spoken directly with aiohttp (list `GET /storage/v1/b/B/o`, media
`GET /download/storage/v1/b/B/o/NAME?alt=media` with `Range`). Why not obstore's GCSStore or
google-cloud-storage: obstore fails against gcp-storage-emulator (our test server), and
google-cloud-storage is a heavy synchronous dependency; both real GCS and the emulator speak these
few JSON API calls, so one client serves both and we own error mapping, ranges and timeouts.

URI semantics (KServe's `_download_gcs`): `gs://b/p` means every object under `p/` (their paths
relative to `p/`; "directory" placeholder objects ending in `/` are skipped); when there is none,
the object `p` itself, saved under its base name. `gs://b` is the whole bucket. When the result is
exactly one .tar/.tar.gz/.tgz/.zip it is unpacked, as KServe does.

Credentials (from options.env, never os.environ), found as google-auth's default credentials are:
* `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key file (signed JWT exchanged for an OAuth
  token at its `token_uri`) or an `authorized_user` file (refresh token); else gcloud's
  `application_default_credentials.json` under `CLOUDSDK_CONFIG` or `$HOME/.config/gcloud`;
* `GCE_METADATA_HOST`: the metadata server to ask for tokens (GKE workload identity);
* nothing: anonymous, which works for public buckets (KServe falls back the same way); on 401/403
  we then try the metadata server at metadata.google.internal once, so GKE needs no setup;
* `STORAGE_EMULATOR_HOST` (`http://127.0.0.1:PORT` or `host:port`): talk to an emulator instead;
  there only explicit credentials are used (google-cloud-storage goes anonymous there too).

Integrity: GCS publishes md5Hash/crc32c, not sha256, so RemoteFile.sha256 stays None (the engine
records its own). The object `generation` is each file's etag (resume refuses a changed object and
reads pin it with `ifGenerationMatch`); the snapshot revision is the generation of a single object,
or a digest of all (path, generation) pairs of a prefix. `--revision` pins a single object's
generation (needs object versioning for older ones) or insists on a prefix's digest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from modelcache.errors import AuthError, NotFoundError, SourceError, TransientSourceError, UsageError
from modelcache.safepath import safe_relpath
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import ListingCap, RemoteFile, Snapshot, SourceOptions, archive_kind, select
from modelcache.sources.transport import (
    SnapshotMismatchError,
    proxy_kwargs,
    ranged_get,
    read_limited,
    status_error,
)
from modelcache.sources.transport import describe as _describe
from modelcache.uri import ModelURI

READ_BLOCK = 1 << 20
GCS_ENDPOINT = "https://storage.googleapis.com"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
CREDENTIALS_HINT = "check GOOGLE_APPLICATION_CREDENTIALS (service-account or authorized_user JSON)"
_REFRESH_MARGIN = 300.0  # refresh an access token this many seconds before it expires


def listing_revision(pairs: Iterable[tuple[str, str | None]]) -> str:
    """A revision for a set of objects: changes when any object is added, removed or rewritten."""
    h = hashlib.sha256()
    for path, tag in sorted(pairs, key=lambda p: p[0]):
        h.update(f"{path}\t{tag or ''}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


def b64_to_hex(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except ValueError:
        return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenSource:
    """An OAuth access token, fetched on first use and refreshed before it expires."""

    label = ""  # which credential, for messages

    def __init__(self) -> None:
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def token(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() > self._expires - _REFRESH_MARGIN:
                status, payload = await self._fetch(session)
                token = payload.get("access_token")
                if status != 200 or not isinstance(token, str):
                    reason = payload.get("error")
                    short = isinstance(reason, str) and reason.isprintable() and len(reason) < 80
                    why = f" ({reason})" if short else ""
                    raise AuthError(
                        f"{self.label}: token request refused: HTTP {status}{why}; {CREDENTIALS_HINT}"
                    )
                expires_in = payload.get("expires_in", 3600)
                lifetime = float(expires_in) if isinstance(expires_in, int | float) else 3600.0
                self._token, self._expires = token, time.monotonic() + lifetime
            return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    async def _call(
        self, session: aiohttp.ClientSession, method: str, url: str, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        try:
            async with session.request(method, url, **kw, **proxy_kwargs(url)) as resp:
                status, body = resp.status, await read_limited(resp, f"{self.label}: token endpoint")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{self.label}: token endpoint: {_describe(exc)}") from exc
        if status in (408, 429) or status >= 500:
            raise TransientSourceError(f"{self.label}: token endpoint: HTTP {status}")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        return status, payload if isinstance(payload, dict) else {}


class _KeyFile(_TokenSource):
    """A service_account or authorized_user JSON file, read as google-auth reads it."""

    label = "GOOGLE_APPLICATION_CREDENTIALS"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            with open(path, encoding="utf-8") as fh:
                info = json.load(fh)
        except FileNotFoundError as exc:
            raise AuthError(f"GOOGLE_APPLICATION_CREDENTIALS names a missing file: {path}") from exc
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot read GOOGLE_APPLICATION_CREDENTIALS file {path} as JSON") from exc
        if not isinstance(info, dict):
            raise AuthError(f"GOOGLE_APPLICATION_CREDENTIALS file {path} is not a JSON object")
        self.kind = str(info.get("type", ""))
        if self.kind not in ("service_account", "authorized_user"):
            raise UsageError(
                f"GOOGLE_APPLICATION_CREDENTIALS file {path}: credential type {self.kind!r} is not "
                "supported yet (use a service_account or authorized_user file)"
            )
        self.info: dict[str, Any] = info
        self.token_uri = str(info.get("token_uri") or GOOGLE_TOKEN_URI)

    def _assertion(self) -> str:
        """A service-account JWT (RS256) asking for read-only storage access."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        email, pem = self.info.get("client_email"), self.info.get("private_key")
        if not isinstance(email, str) or not isinstance(pem, str):
            raise AuthError(f"service-account file {self.path} lacks client_email or private_key")
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise AuthError(f"service-account file {self.path}: private_key is not a valid PEM key") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise AuthError(f"service-account file {self.path}: private_key is not an RSA key")
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT"}
        if isinstance(self.info.get("private_key_id"), str):
            header["kid"] = self.info["private_key_id"]
        claims = {"iss": email, "scope": SCOPE, "aud": self.token_uri, "iat": now, "exp": now + 3600}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _grant(self) -> dict[str, str]:
        if self.kind == "service_account":
            return {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": self._assertion(),
            }
        fields = {k: self.info.get(k) for k in ("client_id", "client_secret", "refresh_token")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise AuthError(
                f"authorized_user file {self.path} lacks client_id, client_secret or refresh_token"
            )
        return {"grant_type": "refresh_token", **{k: str(v) for k, v in fields.items()}}

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        return await self._call(session, "POST", self.token_uri, data=self._grant())


class _MetadataServer(_TokenSource):
    """The GCE/GKE metadata server (workload identity): what google-auth falls back to on Google Cloud."""

    label = "GCE metadata server"

    def __init__(self, host: str) -> None:
        super().__init__()
        base = host if "://" in host else f"http://{host}"
        self.url = f"{base.rstrip('/')}/computeMetadata/v1/instance/service-accounts/default/token"

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=5, connect=2)
        return await self._call(
            session, "GET", self.url, headers={"Metadata-Flavor": "Google"}, timeout=timeout
        )


class GcsSource(AiohttpSource):
    #: A single object's generation (older ones need object versioning); for a prefix, the revision
    #: a previous pull reported, refused when the objects have changed since.
    supports_revision = True
    _creds: _TokenSource | None = None

    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        super().__init__(uri, options)
        rest = self.uri.uri.split("://", 1)[1]
        bucket, _, path = rest.partition("/")
        if not bucket or "?" in rest or "#" in rest:
            raise UsageError(f"malformed URI {self.shown!r}: expected gs://bucket[/prefix]")
        self.bucket = bucket
        self.path = path  # the object name or prefix exactly as written (GCS names are raw strings)
        env: Mapping[str, str] = self.options.env
        emulator = env.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
        if emulator and "://" not in emulator:
            emulator = "http://" + emulator
        self.endpoint = emulator or GCS_ENDPOINT
        # Credentials, as google-auth's application default credentials find them. Against an
        # emulator only explicit ones count (google-cloud-storage goes anonymous there too).
        creds_file = env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
        if not creds_file and not emulator:
            config = env.get("CLOUDSDK_CONFIG") or (
                os.path.join(env["HOME"], ".config", "gcloud") if env.get("HOME") else ""
            )
            well_known = os.path.join(config, "application_default_credentials.json") if config else ""
            creds_file = well_known if well_known and os.path.isfile(well_known) else ""
        self._creds_file = creds_file or None
        self._metadata_host = env.get("GCE_METADATA_HOST", "").strip() or None
        # No credentials at all: try anonymous first (public buckets), the metadata server on 401/403.
        self._metadata_fallback = self._creds_file is None and self._metadata_host is None and not emulator

    def _credentials(self) -> _TokenSource | None:
        if self._creds is None:
            if self._creds_file is not None:
                self._creds = _KeyFile(self._creds_file)
            elif self._metadata_host is not None:
                self._creds = _MetadataServer(self._metadata_host)
        return self._creds

    async def _headers(self) -> dict[str, str]:
        creds = self._credentials()
        return {} if creds is None else {"Authorization": f"Bearer {await creds.token(self.session())}"}

    def _object_url(self, name: str, *, media: bool) -> str:
        base = f"{self.endpoint}/download/storage/v1" if media else f"{self.endpoint}/storage/v1"
        return f"{base}/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}"

    def _error(self, status: int, what: str) -> Exception:
        err = status_error(status, what)
        if isinstance(err, AuthError):
            creds = self._credentials()
            using = "anonymous access" if creds is None else f"using {creds.label}"
            return AuthError(f"{err.message} ({using}; {CREDENTIALS_HINT})")
        return err

    @staticmethod
    def _url(url: str, params: dict[str, str]) -> URL:
        """Percent-encode the query ourselves: object names may hold '+', spaces or '/'."""
        query = urlencode(params, quote_via=quote, safe="")
        return URL(f"{url}?{query}" if query else url, encoded=True)

    async def _get_json(self, url: str, params: dict[str, str], what: str) -> dict[str, Any] | None:
        """GET a JSON resource; None on 404 (the caller knows what is missing)."""
        try:
            headers = await self._headers()
            target = self._url(url, params)
            async with self.session().get(target, headers=headers, **proxy_kwargs(target)) as resp:
                status = resp.status
                body = await read_limited(resp, what)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{what}: {_describe(exc)}") from exc
        if status == 404:
            return None
        if status != 200:
            raise self._error(status, what)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise SourceError(f"{what}: the server sent invalid JSON") from exc
        if not isinstance(data, dict):
            raise SourceError(f"{what}: the server sent an unexpected JSON document")
        return data

    async def _list(self, prefix: str) -> list[dict[str, Any]]:
        url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o"
        items: list[dict[str, Any]] = []
        cap = ListingCap(f"gs://{self.bucket}/{prefix}")
        token: str | None = None
        while True:
            params = {
                "prefix": prefix,
                "maxResults": "1000",
                "fields": "items(name,size,generation,md5Hash,crc32c),nextPageToken",
            }
            if token:
                params["pageToken"] = token
            page = await self._get_json(url, params, f"gs://{self.bucket}")
            if page is None:
                raise NotFoundError(f"gs://{self.bucket}: bucket not found")
            items.extend(i for i in page.get("items") or [] if isinstance(i, dict))
            cap.check(len(items))
            token = page.get("nextPageToken")
            if not token:
                return items

    def _file(self, item: dict[str, Any], rel: str) -> RemoteFile:
        name, size, gen = item.get("name"), item.get("size"), item.get("generation")
        if not isinstance(name, str) or gen is None:
            raise SourceError(f"{self.shown}: listing entry without name or generation")
        try:
            nbytes = int(size) if size is not None else None
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{self.shown}: object {name!r} has a bad size") from exc
        return RemoteFile(path=safe_relpath(rel, "object name"), size=nbytes, etag=str(gen), locator=name)

    async def resolve(self) -> Snapshot:
        path = self.path
        prefix = "" if path in ("", "/") else (path if path.endswith("/") else path + "/")
        try:
            items = await self._list(prefix)
        except AuthError:
            if not self._metadata_fallback:
                raise
            self._metadata_fallback = False
            self._metadata_host = "metadata.google.internal"
            try:  # on Google Cloud without a key file: workload identity, as google-auth does
                await self._headers()
            except SourceError:
                self._creds, self._metadata_host = None, None
                raise AuthError(
                    f"{self.shown}: anonymous access denied and no GCE metadata server answered; "
                    f"{CREDENTIALS_HINT}"
                ) from None
            items = await self._list(prefix)
        files: list[RemoteFile] = []
        single: dict[str, Any] | None = None
        for item in items:
            name = item.get("name")
            if not isinstance(name, str) or name.endswith("/"):
                continue  # "folder" placeholder objects hold no file
            files.append(self._file(item, name[len(prefix) :]))
        if not items and path and not path.endswith("/"):
            params = {"generation": self.options.revision} if self.options.revision else {}
            single = await self._get_json(self._object_url(path, media=False), params, self.shown)
            if single is None:
                raise NotFoundError(f"{self.shown}: no such object or prefix")
            files = [self._file(single, path.rsplit("/", 1)[-1])]
        files = select(files, self.options.include, self.options.exclude)
        if not files:
            raise NotFoundError(f"{self.shown}: no objects to copy")
        if single is not None:
            revision = files[0].etag
            if self.options.revision and self.options.revision != revision:
                raise NotFoundError(f"{self.shown}: generation {self.options.revision} not found")
        else:
            revision = listing_revision((f.path, f.etag) for f in files)
            if self.options.revision and self.options.revision != revision:
                raise NotFoundError(
                    f"{self.shown}: revision {self.options.revision} is gone (now {revision}); "
                    "only single objects can be pinned to an older generation"
                )
        extra = {"bucket": self.bucket, "prefix": path}
        if single is not None:
            md5 = b64_to_hex(single.get("md5Hash"))
            if md5:
                extra["md5"] = md5
            if isinstance(single.get("crc32c"), str):
                extra["crc32c"] = single["crc32c"]
        archive = archive_kind(files[0].path) if len(files) == 1 else None
        return Snapshot(tuple(files), revision=revision, archive=archive, extra=extra)

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.size is not None  # GCS media downloads (and the emulator) honour Range

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        what = f"gs://{self.bucket}/{f.locator}"
        params = {"alt": "media"}
        if f.etag:
            params["ifGenerationMatch" if not self.options.revision else "generation"] = f.etag

        def on_status(resp: aiohttp.ClientResponse) -> Exception:
            if resp.status == 412:
                return SnapshotMismatchError(f"{what}: the object changed during the download")
            return self._error(resp.status, what)

        stream = ranged_get(
            self.session(),
            self._url(self._object_url(f.locator, media=True), params),
            dataclasses.replace(f, etag=None),  # the generation is checked by GCS (412), not an ETag
            start,
            end,
            what=what,
            secret=await self._headers(),
            on_status=on_status,
        )
        async with contextlib.aclosing(stream):
            async for block in stream:
                yield block


SOURCE = GcsSource
