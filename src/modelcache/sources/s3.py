"""s3://bucket[/path]: one object or every object under a prefix, meaning what KServe's storage
initializer (`Storage._download_s3`) makes of the same URI.

KServe's rules, which we keep so a URI fills a model directory with the same files:
- the path after the bucket (leading slashes dropped, a trailing slash kept) is a raw key prefix;
- a key equal to it wins alone and lands under its basename (`s3://b/m/model.bin` -> `model.bin`);
- otherwise every key starting with it is taken, laid out at `key[len(prefix):].lstrip("/")` — so
  `s3://b/m` also takes `m-v2/x` (as `-v2/x`), exactly like KServe; end the URI with `/` to mean a
  directory only;
- keys ending in `/` (folder markers) and empty objects are skipped; nothing left -> not found;
- `--include/--exclude` filter a listing, never an exact key; a lone `.tar/.tar.gz/.tgz/.zip` is
  unpacked.

Settings come from `options.env`, named as KServe's S3 secret webhook sets them:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION (or AWS_REGION),
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, or S3_ENDPOINT + S3_USE_HTTPS), S3_VERIFY_SSL,
AWS_CA_BUNDLE (or KServe's CA_BUNDLE_CONFIGMAP_NAME mount), awsAnonymousCredential,
S3_USER_VIRTUAL_BUCKET, S3_USE_ACCELERATE. Custom endpoints are addressed path-style unless
S3_USER_VIRTUAL_BUCKET=true. Without keys we fall back to the AWS default chain (web identity /
container / instance credentials). Bytes are read with obstore, one ranged GET per engine chunk,
streamed in 1 MiB pieces and pinned to the listed ETag (If-Match). A published full-object
x-amz-checksum-sha256 becomes RemoteFile.sha256, so the engine checks the bytes against it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import logging
import os
import posixpath
import re
import socket
import ssl
import threading
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, unquote, urlsplit

import obstore
import obstore.exceptions as obe
from obstore.store import S3Store

from modelcache.errors import (
    AuthError,
    ModelcacheError,
    NotFoundError,
    SourceError,
    TransientSourceError,
    UsageError,
)
from modelcache.safepath import safe_relpath
from modelcache.sources.base import ListingCap, RemoteFile, Snapshot, Source, archive_kind, select
from modelcache.sources.httprules import proxy_for, status_error
from modelcache.uri import redact

log = logging.getLogger("modelcache.s3")

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta
    from obstore.store import ClientConfig, S3Config, S3Credential

READ_BLOCK = 1 << 20
DEFAULT_REGION = "us-east-1"
_STATUS_RE = re.compile(r"status code: (\d{3})")
_VERSION_SEP = "@version="
#: obstore's message when fetching default-chain credentials failed (IMDS token/role, STS).
_CREDENTIAL_FETCH_RE = re.compile(
    r"/latest/api/token|/latest/meta-data|AssumeRoleWithWebIdentity|sts\.[a-z0-9-]*\.?amazonaws|"
    r"credential",
    re.IGNORECASE,
)
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CHECKSUM_LOOKUPS = 16  # concurrent HEADs asking for published checksums
#: All checksum HEADs together: a lookup still unanswered then is given up (best effort), so an
#: endpoint that drips its answers cannot hold a pull for the engine's whole resolve deadline.
CHECKSUM_DEADLINE = 60.0
CREDENTIAL_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
    "or awsAnonymousCredential=true for a public bucket"
)
#: Env values that must never show up in a message.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
#: Default-chain settings passed on explicitly, so they come from options.env and not os.environ.
_CHAIN_VARS: dict[str, str] = {
    "AWS_ROLE_ARN": "role_arn",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "web_identity_token_file",
    "AWS_ROLE_SESSION_NAME": "role_session_name",
    "AWS_STS_ENDPOINT": "sts_endpoint",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "container_credentials_relative_uri",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "container_credentials_full_uri",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "container_authorization_token_file",
    "AWS_METADATA_ENDPOINT": "metadata_endpoint",
}


def _true(value: str | None) -> bool:
    """KServe's flags are on only for the string "true" (any case)."""
    return (value or "").strip().lower() == "true"


def join_etag(etag: str | None, version: str | None) -> str | None:
    """RemoteFile.etag carries the version id too, so resume notices a replaced object."""
    if etag is None or not version:
        return etag
    return f"{etag}{_VERSION_SEP}{version}"


def split_etag(value: str | None) -> tuple[str | None, str | None]:
    if value is None or _VERSION_SEP not in value:
        return value, None
    etag, _, version = value.rpartition(_VERSION_SEP)
    return etag, version


def layout(prefix: str, key: str) -> str:
    """Where KServe puts a listed key: the prefix cut off, then leading slashes."""
    return key.removeprefix(prefix).lstrip("/")


def snapshot_revision(files: list[RemoteFile]) -> str:
    """One object: its ETag (unquoted). Several: a digest of the sorted (key, size, ETag) list."""
    if len(files) == 1 and files[0].etag:
        return files[0].etag.strip('"')
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.locator):
        h.update(f"{f.locator}\t{f.size}\t{f.etag or ''}\n".encode())
    return "sha256:" + h.hexdigest()


def sigv4_headers(
    method: str, url: str, region: str, creds: S3Credential, extra: Mapping[str, str], now: datetime
) -> dict[str, str]:
    """AWS Signature V4 headers for a body-less request to an already-encoded `url`. obstore cannot
    send the `x-amz-checksum-mode` header (and hides checksums), so the checksum HEAD is signed here."""
    parts = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": _EMPTY_SHA256}
    headers.update({k.lower(): v for k, v in extra.items()})
    if creds.get("token"):
        headers["x-amz-security-token"] = str(creds["token"])
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join(
        [method, parts.path or "/", parts.query, *(f"{n}:{headers[n].strip()}" for n in names), "", signed]
    )
    canonical += "\n" + _EMPTY_SHA256
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + creds["secret_access_key"]).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds['access_key_id']}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    del headers["host"]  # the HTTP client sends the same value
    return headers


def full_object_sha256(headers: Mapping[str, str], etag: str | None) -> str | None:
    """A published checksum that really is the sha256 of the whole object, as hex. Multipart
    uploads get composite checksums (a hash of part hashes) unless S3 says FULL_OBJECT."""
    value = headers.get("x-amz-checksum-sha256")
    if not value:
        return None
    kind = headers.get("x-amz-checksum-type", "").upper()
    if kind == "COMPOSITE" or (kind != "FULL_OBJECT" and (etag is None or "-" in etag)):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


#: S3's bucket naming rules (3-63 chars, lower case, digits, dots and hyphens).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Source(Source):
    _store: S3Store | None = None
    _found_region: str | None = None
    _object_base: str = ""  # endpoint URL objects hang off (bucket included), for the checksum HEAD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parts = urlsplit(self.uri.uri)
        self.bucket = parts.netloc
        self.key_prefix = parts.path.lstrip("/")  # as KServe: leading slashes dropped, trailing kept

    @property
    def shown(self) -> str:
        return redact(self.uri.uri)

    # -- configuration ---------------------------------------------------------------------------
    def _env(self, *names: str) -> str | None:
        for name in names:
            value = self.options.env.get(name, "").strip()
            if value:
                return value
        return None

    def endpoint(self) -> str | None:
        """A custom endpoint, as KServe reads it (S3_ENDPOINT may lack a scheme: S3_USE_HTTPS decides)."""
        url = self._env("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
        if url is None and (bare := self._env("S3_ENDPOINT")) is not None:
            if re.match(r"(?i)^https?://", bare):
                url = bare
            else:
                scheme = "http" if self.options.env.get("S3_USE_HTTPS", "").strip() == "0" else "https"
                url = f"{scheme}://{bare}"
        if url is not None and url.rstrip("/") == "https://s3.amazonaws.com":
            return None  # the global AWS endpoint: address the bucket's own region instead
        return url.rstrip("/") if url else None

    def region(self) -> str:
        return self._env("AWS_DEFAULT_REGION", "AWS_REGION") or self._found_region or DEFAULT_REGION

    async def _discover_region(self) -> None:
        """boto3 (so KServe) finds a bucket's region by itself; obstore does not and would get a
        301 outside us-east-1. S3 names the region in a header even on an anonymous 403."""
        if self._env("AWS_DEFAULT_REGION", "AWS_REGION") or self.endpoint() is not None:
            return
        heads = Heads(verify=True, cafile=None, connect_timeout=self.options.connect_timeout, read_timeout=10)
        try:
            _, headers = await asyncio.to_thread(
                heads.head, f"https://s3.amazonaws.com/{quote(self.bucket)}", {}
            )
            self._found_region = headers.get("x-amz-bucket-region")
        except HEAD_ERRORS:
            return  # the real requests will say what is wrong
        finally:
            heads.close()

    def _ca_bundle(self) -> str | None:
        """AWS_CA_BUNDLE, else KServe's global CA bundle ConfigMap mount (cabundle.crt)."""
        if bundle := self._env("AWS_CA_BUNDLE"):
            return bundle
        if self._env("CA_BUNDLE_CONFIGMAP_NAME"):
            mount = self._env("CA_BUNDLE_VOLUME_MOUNT_POINT") or "/etc/ssl/custom-certs"
            return posixpath.join(mount, "cabundle.crt")
        return None

    def _scrub(self, text: str) -> str:
        for name in _SECRET_VARS:
            value = self.options.env.get(name, "")
            if len(value) >= 4:
                text = text.replace(value, "***")
        return redact(text)

    def _credentials(self) -> S3Credential:
        key_id = self._env("AWS_ACCESS_KEY_ID")
        secret = self._env("AWS_SECRET_ACCESS_KEY")
        assert key_id is not None and secret is not None
        return {
            "access_key_id": key_id,
            "secret_access_key": secret,
            "token": self._env("AWS_SESSION_TOKEN"),
            "expires_at": None,
        }

    def store(self) -> S3Store:
        """One client for the whole pull; obstore stores are safe to share between tasks."""
        if self._store is None:
            self._store = self._build_store()
        return self._store

    def _validate(self, endpoint: str | None) -> None:
        """Refuse what would make the S3 client panic (it aborts with a Rust panic, not an error)."""
        if not _BUCKET_RE.match(self.bucket):
            raise UsageError(f"{self.shown}: {self.bucket!r} is not a valid S3 bucket name")
        if endpoint is not None:
            try:
                p = urlsplit(endpoint)
                p.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as exc:
                raise UsageError(f"invalid S3 endpoint (AWS_ENDPOINT_URL / S3_ENDPOINT): {exc}") from exc
            if p.scheme not in ("http", "https") or not p.hostname:
                raise UsageError(
                    "invalid S3 endpoint (AWS_ENDPOINT_URL / S3_ENDPOINT): expected http(s)://host[:port]"
                )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            value = self.options.env.get(name, "")
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise UsageError(f"{name} contains control characters")

    def _build_store(self) -> S3Store:
        env = self.options.env
        if not self.bucket:
            raise SourceError(f"{self.shown}: no bucket name")
        self._validate(self.endpoint())
        anonymous = _true(env.get("awsAnonymousCredential"))
        region = self.region()
        endpoint = self.endpoint()
        config: S3Config = {"region": region, "skip_signature": anonymous}
        if endpoint is not None:
            virtual = _true(env.get("S3_USER_VIRTUAL_BUCKET"))
            if virtual:
                p = urlsplit(endpoint)
                endpoint = p._replace(netloc=f"{self.bucket}.{p.netloc}").geturl()
        elif _true(env.get("S3_USE_ACCELERATE")):
            virtual, endpoint = True, f"https://{self.bucket}.s3-accelerate.amazonaws.com"
        elif "." in self.bucket:  # dotted names break TLS on virtual hosts; boto3 falls back too
            virtual, endpoint = False, f"https://s3.{region}.amazonaws.com"
        else:
            virtual, endpoint = True, f"https://{self.bucket}.s3.{region}.amazonaws.com"
        # Set explicitly (not left to obstore's own reading of os.environ): options.env decides.
        config["endpoint"] = endpoint
        self._object_base = endpoint if virtual else f"{endpoint}/{quote(self.bucket)}"
        config["aws_endpoint_url_s3"] = endpoint
        config["virtual_hosted_style_request"] = virtual
        has_id, has_secret = bool(self._env("AWS_ACCESS_KEY_ID")), bool(self._env("AWS_SECRET_ACCESS_KEY"))
        if not anonymous and has_id != has_secret:
            missing = "AWS_SECRET_ACCESS_KEY" if has_id else "AWS_ACCESS_KEY_ID"
            raise AuthError(f"{self.shown}: {missing} is not set; {CREDENTIAL_HINT}")
        if not anonymous and not has_id:
            for var, option in _CHAIN_VARS.items():
                if (value := self._env(var)) is not None:
                    config[option] = value  # type: ignore[literal-required]
        client: ClientConfig = {
            "allow_http": endpoint.lower().startswith("http://"),
            "connect_timeout": timedelta(seconds=self.options.connect_timeout),
            "read_timeout": timedelta(seconds=self.options.read_timeout),
            "timeout": timedelta(hours=6),  # whole-request cap: a 64 MiB chunk on a slow link is fine
        }
        # The node's proxy (process environment, as for every source), decided for the endpoint;
        # NO_PROXY also goes to obstore for any other host it may be sent to.
        if (proxy := proxy_for(endpoint)) is not None:
            client["proxy_url"] = proxy  # user-info included: reqwest sends it as Proxy-Authorization
            if no_proxy := os.environ.get("no_proxy") or os.environ.get("NO_PROXY"):
                client["proxy_excludes"] = no_proxy
        verify = env.get("S3_VERIFY_SSL", "").strip().lower()
        if verify in ("0", "false"):
            client["allow_invalid_certificates"] = True
        elif bundle := self._ca_bundle():
            try:
                with open(bundle, "rb") as fh:
                    client["root_certificate"] = fh.read()
            except OSError as exc:
                raise SourceError(f"CA bundle {bundle}: cannot read it ({exc.strerror})") from exc
        try:
            return S3Store(
                self.bucket,
                config=config,
                client_options=client,
                retry_config={"max_retries": 0},  # the engine retries, with its own backoff and limits
                credential_provider=(self._credentials if has_id and not anonymous else None),
            )
        except Exception as exc:  # obstore raises plain ValueError & co. for bad settings
            raise SourceError(
                f"{self.shown}: bad S3 settings: {self._scrub(str(exc).splitlines()[0])}"
            ) from exc

    # -- errors ----------------------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str) -> ModelcacheError:
        """Our error for an obstore/network failure. The message never carries obstore's text
        (it holds response bodies with key ids) beyond a scrubbed one-line network reason."""
        if isinstance(exc, ModelcacheError):
            return exc
        if isinstance(exc, obe.NotFoundError | FileNotFoundError):
            return NotFoundError(f"{what}: not found")
        if isinstance(exc, obe.PermissionDeniedError | obe.UnauthenticatedError):
            return AuthError(f"{what}: access denied; {CREDENTIAL_HINT}")
        if isinstance(exc, obe.PreconditionError):
            return TransientSourceError(f"{what}: the object changed while downloading (ETag differs)")
        text = str(exc)
        if _CREDENTIAL_FETCH_RE.search(text.split("\n", 1)[0]):
            return AuthError(
                f"{what}: no usable credentials from the AWS default chain (instance metadata, web "
                f"identity); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or awsAnonymousCredential=true"
            )
        m = _STATUS_RE.search(text)
        if m is not None:
            err = status_error(int(m.group(1)), what)
            if isinstance(err, NotFoundError):
                return NotFoundError(f"{what}: no such bucket or key")
            if m.group(1) in ("301", "307") and not self._env("AWS_DEFAULT_REGION", "AWS_REGION"):
                return SourceError(f"{what}: the bucket is in another region; set AWS_DEFAULT_REGION")
            if isinstance(err, AuthError):
                return AuthError(f"{what}: access denied (HTTP {m.group(1)}); {CREDENTIAL_HINT}")
            return err if isinstance(err, ModelcacheError) else SourceError(str(err))
        return TransientSourceError(f"{what}: {self._reason(exc, text)}")

    def _reason(self, exc: BaseException, text: str) -> str:
        low = text.lower()
        if isinstance(exc, TimeoutError) or "timed out" in low or "timedout" in low:
            return "timed out"
        if "connection refused" in low:
            return "cannot connect (connection refused)"
        if "dns error" in low or "failed to lookup address" in low:
            return "cannot resolve the endpoint host"
        if "certificate" in low:
            return "TLS certificate not trusted (see AWS_CA_BUNDLE / S3_VERIFY_SSL)"
        if "connection reset" in low or "broken pipe" in low:
            return "connection reset"
        first = text.split("\n", 1)[0]
        first = re.sub(r"<\?xml.*", "", first)[:200]
        return f"{type(exc).__name__}: {self._scrub(first)}" if first else type(exc).__name__

    # -- the protocol ----------------------------------------------------------------------------
    async def resolve(self) -> Snapshot:
        if self._store is None:
            await self._discover_region()
        store = self.store()
        prefix = self.key_prefix
        exact: RemoteFile | None = None
        if prefix and not prefix.endswith("/"):
            exact = await self._head(store, prefix)
        if exact is not None:
            files = [exact]
        else:
            files = select(await self._list(store, prefix), self.options.include, self.options.exclude)
            if not files:
                raise NotFoundError(f"{self.shown}: no objects under this prefix")
        files = await self._with_checksums(files)
        archive = archive_kind(files[0].path) if len(files) == 1 else None
        extra = {"bucket": self.bucket, "prefix": prefix}
        if (endpoint := self.endpoint()) is not None:
            extra["endpoint"] = redact(endpoint)
        return Snapshot(tuple(files), revision=snapshot_revision(files), archive=archive, extra=extra)

    async def _head(self, store: S3Store, key: str) -> RemoteFile | None:
        """The object named exactly by the URI, if there is one worth taking (KServe skips empty ones)."""
        try:
            meta = await obstore.head_async(store, key)
        except (obe.NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._error(exc, self.shown) from exc
        if meta["size"] == 0:
            return None
        name = posixpath.basename(key)
        return RemoteFile(name, meta["size"], etag=join_etag(meta["e_tag"], meta["version"]), locator=key)

    async def _list(self, store: S3Store, prefix: str) -> list[RemoteFile]:
        """Every key starting with the raw prefix. obstore lists whole path segments, so list the
        parent "directory" starting after the prefix and stop at the first key past it."""
        parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        files: list[RemoteFile] = []
        cap = ListingCap(self.shown)
        stream = obstore.list(store, parent or None, offset=prefix or None, chunk_size=1000)
        try:
            async for batch in stream:
                for meta in batch:
                    key = meta["path"]
                    if not key.startswith(prefix):
                        if key > prefix:
                            return files  # listings are sorted: nothing further can match
                        continue  # obstore drops the offset's trailing "/": the folder marker itself
                    if f := self._listed(prefix, key, meta):
                        files.append(f)
                cap.check(len(files))
        except Exception as exc:
            raise self._error(exc, self.shown) from exc
        return files

    def _listed(self, prefix: str, key: str, meta: ObjectMeta) -> RemoteFile | None:
        if meta["size"] == 0 or key.endswith("/"):
            return None  # folder markers and empty objects, as KServe
        rel = safe_relpath(layout(prefix, key), "object key")
        return RemoteFile(rel, meta["size"], etag=join_etag(meta["e_tag"], meta["version"]), locator=key)

    async def _with_checksums(self, files: list[RemoteFile]) -> list[RemoteFile]:
        """Fill RemoteFile.sha256 from published full-object SHA-256 checksums, best effort: a
        failed lookup only means the engine has nothing to check the bytes against."""
        env = self.options.env
        anonymous = _true(env.get("awsAnonymousCredential"))
        if not anonymous and not self._env("AWS_ACCESS_KEY_ID"):
            return files  # default-chain credentials live inside obstore: no signing here
        creds = None if anonymous else self._credentials()
        verify = env.get("S3_VERIFY_SSL", "").strip().lower() not in ("0", "false")
        heads = Heads(
            verify=verify,
            cafile=self._ca_bundle() if verify else None,
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
        )

        def one(f: RemoteFile) -> RemoteFile:
            etag, version = split_etag(f.etag)
            url = f"{self._object_base}/{quote(f.locator, safe='/~')}"
            if version:
                url += f"?versionId={quote(version, safe='')}"
            extra = {"x-amz-checksum-mode": "ENABLED"}
            headers = (
                extra if creds is None else sigv4_headers("HEAD", url, self.region(), creds, extra, _now())
            )
            try:
                status, got = heads.head(url, headers)
            except HEAD_ERRORS:
                return f
            sha = full_object_sha256(got, etag) if status == 200 else None
            return dataclasses.replace(f, sha256=sha) if sha else f

        pool = ThreadPoolExecutor(max_workers=min(CHECKSUM_LOOKUPS, len(files)), thread_name_prefix="s3-head")
        try:
            loop = asyncio.get_running_loop()
            futures = [loop.run_in_executor(pool, one, f) for f in files]
            _, late = await asyncio.wait(futures, timeout=CHECKSUM_DEADLINE)
            if late:
                log.warning(
                    "%s: %d checksum lookup(s) unanswered after %gs; those objects are checked by our "
                    "own sha256 only",
                    self.shown,
                    len(late),
                    CHECKSUM_DEADLINE,
                )
            return [fut.result() if fut.done() else f for fut, f in zip(futures, files, strict=True)]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            heads.close()  # wakes any thread still blocked on a socket

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.size is not None

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        stop = f.size if end is None else end
        if stop is None or stop <= start:
            return
        etag, version = split_etag(f.etag)
        options: GetOptions = {"range": (start, stop)}
        if etag:
            options["if_match"] = etag
        if version:
            options["version"] = version
        what = f"s3://{self.bucket}/{f.locator}"
        try:
            result = await obstore.get_async(self.store(), f.locator, options=options)
            async for block in result.stream(min_chunk_size=READ_BLOCK):
                yield bytes(block)
        except ModelcacheError:
            raise
        except Exception as exc:
            raise self._error(exc, what) from exc

    async def aclose(self) -> None:
        self._store = None


def _now() -> datetime:
    return datetime.now(UTC)


#: What a failed HEAD raises (ssl.SSLError and socket timeouts are OSErrors).
HEAD_ERRORS = (OSError, http.client.HTTPException, ValueError)


class Heads:
    """HEAD requests from a few threads, one kept-alive http.client connection per thread and origin.

    obstore can neither send `x-amz-checksum-mode` nor show checksums, so the checksum lookups (and
    the region probe) are the s3 path's only HTTP outside obstore. The stdlib, not aiohttp: importing
    aiohttp for these alone cost every s3 pull 0.11 s of start-up. The node's proxy applies as
    everywhere (`proxy_for`): CONNECT for https, an absolute URI for http."""

    def __init__(
        self, *, verify: bool, cafile: str | None, connect_timeout: float, read_timeout: float
    ) -> None:
        self._verify, self._cafile = verify, cafile
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._tls: ssl.SSLContext | None = None  # built on the first https origin (loading CAs costs 30 ms)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []

    def head(self, url: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """(status, lower-cased headers) of `url`, which must be encoded already (it is sent as is:
        a signature covers it exactly as written)."""
        parts = urlsplit(url)
        conns: dict[tuple[str, str], tuple[http.client.HTTPConnection, str, dict[str, str]]]
        conns = self._local.__dict__.setdefault("conns", {})
        key = (parts.scheme, parts.netloc)
        if key not in conns:
            conns[key] = self._connect(parts)
        conn, prefix, extra = conns[key]
        target = prefix + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("HEAD", target, headers={"Host": parts.netloc, **extra, **headers})
            resp = conn.getresponse()
            resp.read()
        except BaseException:
            conn.close()
            del conns[key]
            raise
        if resp.will_close:
            conn.close()
            del conns[key]
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}

    def _connect(self, parts: SplitResult) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection for the origin of `parts`, the prefix its request targets need, and the
        headers every request on it carries (Proxy-Authorization through a plain-http proxy)."""
        https = parts.scheme == "https"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        host, port = parts.hostname, parts.port or (443 if https else 80)
        prefix, extra = "", {}
        proxy = proxy_for(parts.geturl())
        if proxy is not None:
            p = urlsplit(proxy)
            if p.scheme != "http" or not p.hostname:
                raise ValueError("only http:// proxies are supported for S3 checksum lookups")
            auth = {}
            if p.username is not None:
                token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode())
                auth = {"Proxy-Authorization": "Basic " + token.decode()}
            host, port = p.hostname, p.port or 80
            if not https:
                prefix, extra = f"http://{parts.netloc}", auth  # plain http: absolute URI to the proxy
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._context()
            )
            if proxy is not None:
                conn.set_tunnel(parts.hostname or "", parts.port or 443, headers=auth)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        with self._lock:
            self._all.append(conn)
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self._read_timeout)
        return conn, prefix, extra

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                if not self._verify:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                else:
                    ctx = ssl.create_default_context(cafile=self._cafile)
                self._tls = ctx
            return self._tls

    def close(self) -> None:
        """Close every connection, from any thread. A thread blocked reading one wakes at once
        (a shutdown, which a plain close does not do), so no worker outlives a given-up lookup."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            if conn.sock is not None:
                with contextlib.suppress(OSError):  # not connected (any more)
                    conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()


SOURCE = S3Source
