"""hf://owner/model[:revision]: a Hugging Face Hub model repo, pinned to one commit.

URI meaning is KServe's storage initializer's: exactly `owner/model` with an optional `:revision`
(branch, tag or commit sha) after the model name; no revision means the default branch `main`.
`--revision` overrides the one in the URI. The revision is resolved to a commit sha once, and every
listing and byte read is made at that sha, so a branch moving mid-download cannot mix two commits.

Env (from `options.env`, never the process env or ~/.cache/huggingface/token): `HF_ENDPOINT`
(default https://huggingface.co), `HF_TOKEN` or else `HUGGING_FACE_HUB_TOKEN`, and `HF_HUB_OFFLINE`
(a model not in our cache is then "not found" instead of downloaded, as huggingface_hub does).

We speak the Hub's HTTP protocol with aiohttp instead of calling huggingface_hub: HfApi is
synchronous, uses one process-wide session and falls back to the token file and process env when
no token is given, while the node agent pulls many models at once, each with its own credentials.
The protocol pieces used are small and stable: `/api/models/{repo}/revision/{rev}` (commit sha),
`/api/models/{repo}/tree/{sha}?recursive=true` (paginated by `Link` header), and ranged GETs of
`/{repo}/resolve/{sha}/{path}`, which redirect LFS/Xet files to a CDN. The token goes to the
endpoint's own origin only (transport.send), so it never reaches the CDN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from modelcache import __version__
from modelcache.errors import (
    AuthError,
    NotFoundError,
    SourceError,
    TransientSourceError,
    UsageError,
)
from modelcache.safepath import safe_relpath
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import ListingCap, RemoteFile, Snapshot, SourceOptions, select
from modelcache.sources.transport import describe as _describe
from modelcache.sources.transport import proxy_kwargs, ranged_get, read_limited, status_error
from modelcache.uri import ModelURI, redact

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_AUTH_HINT = "check HF_TOKEN / HUGGING_FACE_HUB_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # what may go into an HTTP header unescaped
_MAX_PAGES = 10_000


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """`hf://owner/model[:revision]` -> ("owner/model", revision or None), as KServe splits it."""
    usage = f"malformed URI {redact(uri)!r}: expected hf://owner/model[:revision]"
    rest = uri.split("://", 1)[1]
    parts = rest.split("/")
    if len(parts) != 2:
        raise UsageError(usage)
    owner, model_part = parts
    model, _, revision = model_part.partition(":")
    for name in (owner, model):
        if not _NAME_RE.match(name) or ".." in name or "--" in name:
            raise UsageError(usage)
    return f"{owner}/{model}", revision or None


def hf_endpoint(env: Mapping[str, str]) -> str:
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"HF_ENDPOINT must be an http(s) URL, got {redact(endpoint)!r}")
    if "@" in parts.netloc:
        raise UsageError("HF_ENDPOINT must not carry credentials; put the token in HF_TOKEN")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise UsageError(f"HF_ENDPOINT has a bad port: {redact(endpoint)!r}") from exc
    return endpoint


def hf_token(env: Mapping[str, str]) -> str | None:
    for var in TOKEN_VARS:
        token = (env.get(var) or "").strip()
        if token:
            if not _TOKEN_RE.match(token):
                raise AuthError(f"{var} contains characters that cannot be sent in an HTTP header")
            return token
    return None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.rsplit("@", 1)[-1].lower()


class HfSource(AiohttpSource):
    supports_revision = True  # a branch, tag or commit sha; overrides the URI's `:revision`

    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        super().__init__(uri, options)
        self.repo_id, uri_revision = parse_hf_uri(uri.uri)
        self.requested = options.revision or uri_revision or DEFAULT_REVISION
        self.endpoint = hf_endpoint(options.env)
        self._token = hf_token(options.env)
        self.commit: str | None = None

    # -- plumbing ------------------------------------------------------------------------------
    def session_kwargs(self) -> dict[str, Any]:
        return {"headers": {"User-Agent": f"modelcache/{__version__}"}}

    def _headers(self, url: str) -> dict[str, str]:
        """The token goes to the endpoint's own origin only (not to pagination links elsewhere)."""
        if self._token and _origin(url) == _origin(self.endpoint):
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    def _error(self, status: int, headers: Mapping[str, str], what: str) -> Exception:
        """Map a Hub error reply; `X-Error-Code` tells a missing repo from a missing revision or file."""
        code = headers.get("X-Error-Code", "")
        where = f"{self.repo_id} on {redact(self.endpoint)}"
        token_state = "a token is set" if self._token else "no HF_TOKEN is set"
        if code == "GatedRepo":
            return AuthError(
                f"{where}: gated repository (HTTP {status}): request access on the Hub with the account "
                f"whose token you use, then {_AUTH_HINT} ({token_state})"
            )
        if code == "RepoNotFound" and status == 401 and not self._token:
            # The Hub answers anonymous requests for private repos exactly like missing ones.
            return AuthError(
                f"{where}: repository not found or private (HTTP 401); {_AUTH_HINT} (none is set)"
            )
        if code == "RepoNotFound":
            return NotFoundError(
                f"{where}: repository not found (HTTP {status}); if it is private, {_AUTH_HINT} "
                f"({token_state})"
            )
        if code == "RevisionNotFound":
            return NotFoundError(f"{where}: revision {self.requested!r} not found (HTTP {status})")
        if code == "EntryNotFound":
            return NotFoundError(f"{where}: {what}: file not found (HTTP {status})")
        if code == "DisabledRepo":
            return SourceError(f"{where}: access to this repository is disabled (HTTP {status})")
        if status in (401, 403):
            return AuthError(f"{where}: {what}: access denied (HTTP {status}); {_AUTH_HINT} ({token_state})")
        return status_error(status, f"{where}: {what}")

    async def _get_json(self, url: str, what: str) -> tuple[Any, str | None]:
        """GET a Hub API document; returns (json, next page URL from the Link header)."""
        try:
            async with self.session().get(
                url, headers=self._headers(url), allow_redirects=True, **proxy_kwargs(url)
            ) as resp:
                if resp.status != 200:
                    raise self._error(resp.status, resp.headers, what)
                body = json.loads(await read_limited(resp, f"{self.repo_id}: {what}"))
                link = resp.links.get("next")
                nxt = link.get("url") if link is not None else None
                if nxt is not None:  # may be relative to the page it came with
                    nxt = urljoin(str(resp.url), str(nxt))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{self.repo_id}: {what}: {_describe(exc)}") from exc
        except ValueError as exc:  # a reply that is not JSON, or a URL aiohttp refuses
            raise SourceError(f"{self.repo_id}: {what}: unusable reply ({type(exc).__name__})") from exc
        return body, (str(nxt) if nxt else None)

    # -- Source --------------------------------------------------------------------------------
    async def resolve(self) -> Snapshot:
        if (self.options.env.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on"):
            raise NotFoundError(f"{self.repo_id}: not cached, and HF_HUB_OFFLINE forbids downloading it")
        api = f"{self.endpoint}/api/models/{self.repo_id}"
        info, _ = await self._get_json(
            f"{api}/revision/{quote(self.requested, safe='')}", f"revision {self.requested!r}"
        )
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not _SHA1_RE.match(sha):
            raise SourceError(f"{self.repo_id}: the Hub returned no commit sha for {self.requested!r}")
        self.commit = sha
        files: list[RemoteFile] = []
        cap = ListingCap(self.repo_id)
        url: str | None = f"{api}/tree/{sha}?recursive=true"
        pages = 0
        while url is not None:
            pages += 1
            if pages > _MAX_PAGES:
                raise SourceError(f"{self.repo_id}: file listing does not end (over {_MAX_PAGES} pages)")
            page, url = await self._get_json(url, "file listing")
            if not isinstance(page, list):
                raise SourceError(f"{self.repo_id}: unexpected file listing reply")
            files.extend(self._file(entry, sha) for entry in page if self._is_file(entry))
            cap.check(len(files))
        total = len(files)
        files = select(files, self.options.include, self.options.exclude)
        if not files:
            if total:
                raise NotFoundError(f"{self.repo_id}@{sha[:12]}: no file matches --include/--exclude")
            raise NotFoundError(f"{self.repo_id}@{sha[:12]}: the repository has no files")
        extra = {"repo": self.repo_id, "requested_revision": self.requested}
        if self.endpoint != DEFAULT_ENDPOINT:
            extra["endpoint"] = redact(self.endpoint)
        return Snapshot(tuple(sorted(files, key=lambda f: f.path)), revision=sha, extra=extra)

    @staticmethod
    def _is_file(entry: Any) -> bool:
        if not isinstance(entry, dict):
            raise SourceError("Hub listing entry is not an object")
        return entry.get("type") == "file"

    def _file(self, entry: dict[str, Any], sha: str) -> RemoteFile:
        path = safe_relpath(entry.get("path"), "Hub file path")
        size, oid, sha256 = entry.get("size"), entry.get("oid"), None
        lfs = entry.get("lfs")
        if isinstance(lfs, dict):  # LFS: oid is the sha256 of the whole file, size the real size
            lfs_oid, lfs_size = lfs.get("oid") or lfs.get("sha256"), lfs.get("size")
            if isinstance(lfs_oid, str) and _SHA256_RE.match(lfs_oid.lower()):
                sha256 = oid = lfs_oid.lower()
            if isinstance(lfs_size, int):
                size = lfs_size
        if not isinstance(size, int) or size < 0:
            raise SourceError(f"{self.repo_id}: Hub listing gives no size for {path!r}")
        return RemoteFile(
            path=path,
            size=size,
            sha256=sha256,  # a git blob oid (sha1 of header + bytes) is not a sha256: leave None
            etag=oid if isinstance(oid, str) else None,
            locator=f"{self.endpoint}/{self.repo_id}/resolve/{sha}/{quote(path)}",
        )

    def supports_ranges(self, f: RemoteFile) -> bool:
        return f.size is not None

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        what = f"{self.repo_id}: {f.path}@{(self.commit or '')[:12]}"
        stream = ranged_get(
            self.session(),
            f.locator,
            # The Hub's ETag is the oid on its own origin but the CDN's it redirects to: the LFS
            # sha256 (or our own overlap check) guards the bytes instead.
            dataclasses.replace(f, etag=None),
            start,
            end,
            what=what,
            secret=self._headers(f.locator),
            on_status=lambda resp: self._error(resp.status, resp.headers, f.path),
        )
        async with contextlib.aclosing(stream):
            async for block in stream:
                yield block


SOURCE = HfSource
