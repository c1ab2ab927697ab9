"""oci://registry[:port]/repo[:tag|@sha256:digest]: models stored in an OCI registry.

Two kinds of content live behind the same URI, and we tell them apart per layer:

- **ORAS artifacts** (`oras push`): every layer is one file, named by its
  `org.opencontainers.image.title` annotation. Each becomes a file of the model; its layer digest is
  the file's sha256, which the engine checks. A titled layer marked `io.deis.oras.content.unpack`
  is a directory that ORAS packed as tar(.gz): it is unpacked under its title.
- **Modelcars** (KServe's `storageUri: oci://...`): a container image whose filesystem holds the
  model under `/models`. Its untitled tar layers are downloaded as blobs (digest-verified, ranged,
  resumable) and then `finalize` applies them in order, keeping what is under `models/` (prefix
  stripped) and honouring whiteouts, as KServe's storage initializer and a container runtime do.
  Links inside /models become copies (the cache holds regular files); links out of it are refused.
  Untitled layers of other media types (attestations, ...) are skipped; zstd layers are refused.

Revision: the digest of the manifest the reference resolved to (for a multi-platform index, the
index digest; the chosen platform's manifest digest is recorded in `extra`). A `@sha256:` pin is
checked against the bytes we received.

Auth, read from `options.env` only: `OCI_USERNAME`/`OCI_PASSWORD`; else a docker `config.json`
(`KSERVE_OCI_DOCKER_CONFIG` = file path, as KServe's initializer; `DOCKER_CONFIG` = its directory;
`$HOME/.docker/config.json`) with `auth` or `username`/`password` entries. Credentials go to the
registry as Basic auth or to its token service (the Bearer challenge flow real registries use);
anonymous pulls work with no credentials. Transport: https, or plain http for localhost/127.0.0.1
or when `OCI_INSECURE` / `KSERVE_OCI_INSECURE_REGISTRY` is true. `OCI_PLATFORM` (e.g.
`linux/arm64`) overrides the platform picked from an index (default: linux/<host arch>).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import shutil
import tarfile
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlencode, urljoin

import aiohttp

from modelcache.archive import (
    CORRUPT_ARCHIVE,
    ArchiveBombError,
    TreeCheck,
    UnpackBudget,
    UnsafeArchiveError,
    _write,
    member_relpath,
    os_error,
)
from modelcache.errors import (
    AuthError,
    IntegrityError,
    ModelcacheError,
    NotFoundError,
    SourceError,
    TransientSourceError,
    UsageError,
)
from modelcache.safepath import join_under, printable, safe_relpath
from modelcache.sources.aio import AiohttpSource
from modelcache.sources.base import RemoteFile, Snapshot, SourceOptions, select
from modelcache.sources.transport import Expect, checked_body, proxy_kwargs, read_limited, status_error
from modelcache.sources.transport import describe as _describe
from modelcache.store.manifest import FileEntry
from modelcache.uri import ModelURI

log = logging.getLogger("modelcache")

READ_BLOCK = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
DOCKER_HUB = "registry-1.docker.io"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"
#: Filesystem layer media types we can read (gzip or plain tar; docker's and OCI's names).
TAR_LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
MODELS_DIR = "models"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_TRUE = ("1", "true", "yes", "on")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')

# Layer kinds, as recorded in RemoteFile.locator ("<kind> <digest> <mediaType>").
FILE, DIRECTORY, IMAGE_LAYER = "file", "dir", "layer"


@dataclass(frozen=True)
class Reference:
    """A parsed `oci://` URI: where to ask (`base`), for what (`repo`, `ref`)."""

    registry: str  # host[:port] we talk to
    repo: str
    ref: str  # tag or sha256:... digest
    plain_http: bool

    @property
    def base(self) -> str:
        return f"{'http' if self.plain_http else 'https'}://{self.registry}/v2/{self.repo}"

    @property
    def shown(self) -> str:
        sep = "@" if self.ref.startswith("sha256:") else ":"
        return f"oci://{self.registry}/{self.repo}{sep}{self.ref}"


def parse_reference(host: str, path: str, env: Mapping[str, str], revision: str | None = None) -> Reference:
    """Split `host/path` the way docker and oras do; a host without '.', ':' or 'localhost' is Docker Hub."""
    if "@" in host:
        raise UsageError("oci:// URIs take no user info; set OCI_USERNAME/OCI_PASSWORD instead")
    name = path.strip("/")
    registry = host
    if "." not in host and ":" not in host and host != "localhost":
        registry, name = DOCKER_HUB, f"{host}/{name}" if name else host
    elif host in ("docker.io", "index.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in name.split("@", 1)[0].split(":", 1)[0]:
        name = f"library/{name}"  # docker's rule: official images live under library/
    ref: str | None = None
    if "@" in name:
        name, ref = name.split("@", 1)
        if not _DIGEST_RE.match(ref):
            raise UsageError(f"malformed OCI digest {ref!r}: expected sha256:<64 hex>")
    else:
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, ref = name.rsplit(":", 1)
            if not _TAG_RE.match(ref):
                raise UsageError(f"malformed OCI tag {ref!r}")
    if not name:
        raise UsageError("oci:// URI names no repository: expected oci://registry/repo[:tag|@digest]")
    if not _REPO_RE.match(name):
        raise UsageError(f"malformed OCI repository name {name!r} (lowercase, digits, . _ - and /)")
    if revision:
        if ref is not None and ref != revision:
            raise UsageError(f"--revision {revision} conflicts with {ref} in the URI")
        if not (_DIGEST_RE.match(revision) or _TAG_RE.match(revision)):
            raise UsageError(f"--revision {revision!r} is neither a tag nor a sha256 digest")
        ref = revision
    hostname = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    local = hostname in ("localhost", "127.0.0.1", "[::1]") or hostname.startswith("127.")
    insecure = any(
        env.get(k, "").strip().lower() in _TRUE for k in ("OCI_INSECURE", "KSERVE_OCI_INSECURE_REGISTRY")
    )
    return Reference(registry=registry, repo=name, ref=ref or "latest", plain_http=local or insecure)


def credentials(registry: str, env: Mapping[str, str]) -> tuple[tuple[str, str] | None, str]:
    """(username, password) for this registry, and where they came from (for messages, never values)."""
    user, password = env.get("OCI_USERNAME"), env.get("OCI_PASSWORD")
    if user or password:
        return (user or "", password or ""), "OCI_USERNAME/OCI_PASSWORD"
    paths: list[tuple[str, str]] = []
    if env.get("KSERVE_OCI_DOCKER_CONFIG"):
        paths.append((env["KSERVE_OCI_DOCKER_CONFIG"], "KSERVE_OCI_DOCKER_CONFIG"))
    if env.get("DOCKER_CONFIG"):
        paths.append((os.path.join(env["DOCKER_CONFIG"], "config.json"), "DOCKER_CONFIG"))
    elif env.get("HOME"):
        paths.append((os.path.join(env["HOME"], ".docker", "config.json"), "~/.docker/config.json"))
    for path, label in paths:
        found = _from_docker_config(path, registry)
        if found is not None:
            return found, f"{label} ({path})"
    return None, ""


def _from_docker_config(path: str, registry: str) -> tuple[str, str] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    auths = cfg.get("auths") if isinstance(cfg, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}", registry.split(":", 1)[0]]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    for key in keys:
        entry = auths.get(key) or auths.get(key + "/")
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, password
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


class OciSource(AiohttpSource):
    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        super().__init__(uri, options)
        self._ref: Reference | None = None
        self._creds: tuple[str, str] | None = None
        self._creds_from = ""
        self._token: str | None = None
        self._basic = False  # the registry asked for Basic auth
        self._auth_lock = asyncio.Lock()

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def ref(self) -> Reference:
        if self._ref is None:
            self._ref = parse_reference(self.uri.host, self.uri.path, self.options.env, self.options.revision)
            self._creds, self._creds_from = credentials(self._ref.registry, self.options.env)
        return self._ref

    @property
    def shown(self) -> str:
        return self.ref.shown

    def _auth_header(self) -> dict[str, str]:
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        if self._basic and self._creds is not None:
            return {"Authorization": aiohttp.BasicAuth(*self._creds).encode()}
        return {}

    def _denied(self, what: str, status: int) -> AuthError:
        if self._creds is None:
            hint = "the registry wants credentials: set OCI_USERNAME/OCI_PASSWORD or a docker config.json"
            hint += " (DOCKER_CONFIG or KSERVE_OCI_DOCKER_CONFIG)"
        else:
            hint = f"credentials from {self._creds_from} were refused or lack pull access"
        return AuthError(f"{what}: access denied (HTTP {status}); {hint}")

    async def _authenticate(self, header: str, used: dict[str, str], what: str) -> None:
        """Answer a 401 challenge once: fetch a bearer token, or switch to Basic auth."""
        async with self._auth_lock:
            if self._auth_header() != used:  # another request already refreshed it
                return
            scheme, params = _challenge(header)
            if scheme == "basic":
                if self._creds is None or self._basic:
                    raise self._denied(what, 401)
                self._basic = True
                return
            if scheme != "bearer" or "realm" not in params:
                raise self._denied(what, 401)
            query = {"service": params["service"]} if "service" in params else {}
            query["scope"] = params.get("scope") or f"repository:{self.ref.repo}:pull"
            url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
            auth = aiohttp.BasicAuth(*self._creds) if self._creds is not None else None
            try:
                async with self.session().get(url, auth=auth, **proxy_kwargs(url)) as resp:
                    if resp.status in (401, 403):
                        raise self._denied(what, resp.status)
                    if resp.status != 200:
                        raise status_error(resp.status, f"{what}: token service")
                    body = json.loads(await read_limited(resp, f"{what}: token service"))
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                raise TransientSourceError(f"{what}: token service: {_describe(exc)}") from exc
            token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise SourceError(f"{what}: token service returned no token")
            if self._token == token:  # a fresh token that is refused again: no access
                raise self._denied(what, 401)
            self._token = token

    async def _get(
        self, url: str, what: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> aiohttp.ClientResponse:
        """A request with the auth dance (at most two challenges) and manual redirects.

        Redirects are followed by hand so our Authorization never reaches the blob store a
        registry redirects to (a signed URL carries its own authority). The caller releases
        the response."""
        extra = dict(headers or {})
        for _ in range(3):
            auth = self._auth_header()
            try:
                resp = await self.session().request(
                    method, url, headers={**extra, **auth}, allow_redirects=False, **proxy_kwargs(url)
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise TransientSourceError(f"{what}: {_describe(exc)}") from exc
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                await self._authenticate(challenge, auth, what)
                continue
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                location = urljoin(url, resp.headers["Location"])
                resp.release()
                try:
                    redirected = await self.session().request(
                        method, location, headers=extra, **proxy_kwargs(location)
                    )
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise TransientSourceError(f"{what}: redirect: {_describe(exc)}") from exc
                if redirected.status in (401, 403):  # a signed URL that expired: ask the registry again
                    redirected.release()
                    raise TransientSourceError(f"{what}: the storage the registry redirected to refused us")
                return redirected
            return resp
        raise self._denied(what, 401)

    # -- resolve ----------------------------------------------------------------------------
    async def _manifest(self, ref: str) -> tuple[dict[str, Any], str, str]:
        """(manifest, its digest, media type); a digest reference is checked against the bytes."""
        ref_obj = self.ref
        what = f"{self.shown}" if ref == ref_obj.ref else f"{self.shown} ({ref})"
        resp = await self._get(f"{ref_obj.base}/manifests/{ref}", what, {"Accept": MANIFEST_ACCEPT})
        try:
            if resp.status != 200:
                if resp.status == 403:
                    raise self._denied(what, 403)
                err = status_error(resp.status, what)
                if resp.status in (400, 404):  # distribution: unknown repo/tag; 400 = bad name
                    err = NotFoundError(f"{what}: no such repository, tag or digest (HTTP {resp.status})")
                raise err
            body = await read_limited(resp, f"{what}: manifest", MAX_MANIFEST_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{what}: {_describe(exc)}") from exc
        finally:
            resp.release()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise IntegrityError(f"{what}: manifest bytes hash to {digest[:19]}…, not the pinned digest")
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            raise SourceError(f"{what}: manifest is not JSON") from exc
        if not isinstance(manifest, dict):
            raise SourceError(f"{what}: manifest is not a JSON object")
        media_type = str(manifest.get("mediaType") or resp.headers.get("Content-Type", "").split(";")[0])
        if "manifests" in manifest and media_type not in INDEX_TYPES:
            media_type = OCI_INDEX
        return manifest, digest, media_type

    def _pick_platform(self, index: dict[str, Any]) -> tuple[str, str]:
        wanted = self.options.env.get("OCI_PLATFORM") or f"linux/{host_arch()}"
        os_name, _, arch = wanted.partition("/")
        arch, _, variant = arch.partition("/")
        entries = [
            e
            for e in index.get("manifests") or []
            if isinstance(e, dict) and _DIGEST_RE.match(str(e.get("digest", "")))
        ]
        for entry in entries:
            p = entry.get("platform")
            p = p if isinstance(p, dict) else {}
            if p.get("os") == os_name and p.get("architecture") == arch:
                if variant and p.get("variant") not in (None, variant):
                    continue
                return str(entry["digest"]), wanted
        if len(entries) == 1 and not entries[0].get("platform"):  # an artifact index: one manifest
            return str(entries[0]["digest"]), ""
        seen = sorted(
            {
                f"{e['platform'].get('os')}/{e['platform'].get('architecture')}"
                for e in entries
                if isinstance(e.get("platform"), dict)
            }
        )
        raise NotFoundError(
            f"{self.shown}: the image index has no {wanted} manifest (has: {', '.join(seen)})"
        )

    async def resolve(self) -> Snapshot:
        manifest, digest, media_type = await self._manifest(self.ref.ref)
        extra = {"oci_digest": digest}
        if media_type in INDEX_TYPES:
            chosen, plat = self._pick_platform(manifest)
            manifest, inner, media_type = await self._manifest(chosen)
            extra["oci_manifest"] = inner
            if plat:
                extra["oci_platform"] = plat
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise SourceError(
                f"{self.shown}: unsupported manifest type {media_type or 'unknown'} (no layers)"
            )
        files, kinds = self._plan(layers)
        archive = None if kinds <= {FILE} else "oci"
        if archive is None:
            files = select(files, self.options.include, self.options.exclude)
            if not files:
                raise NotFoundError(f"{self.shown}: no files to download (all excluded?)")
        extra["oci_kind"] = "image" if IMAGE_LAYER in kinds else "artifact"
        return Snapshot(tuple(files), revision=digest, archive=archive, extra=extra)

    def _plan(self, layers: list[Any]) -> tuple[list[RemoteFile], set[str]]:
        """Decide what each layer is. Titled layers are ORAS files; untitled tar layers, image layers."""
        planned: list[tuple[str, dict[str, Any], str]] = []  # (kind, descriptor, title)
        for layer in layers:
            if not isinstance(layer, dict) or not _DIGEST_RE.match(str(layer.get("digest", ""))):
                raise SourceError(f"{self.shown}: layer without a sha256 digest in the manifest")
            if not isinstance(layer.get("size"), int) or layer["size"] < 0:
                raise SourceError(f"{self.shown}: layer {layer['digest'][:19]}… has no size")
            annotations = layer.get("annotations") or {}
            title = annotations.get(TITLE) if isinstance(annotations, dict) else None
            media = str(layer.get("mediaType", ""))
            if isinstance(title, str) and title:
                try:
                    path = _clean_title(title)
                except UnsafeArchiveError as exc:
                    raise UnsafeArchiveError(f"{self.shown}: {exc.message}") from exc
                unpack = str(annotations.get(UNPACK, "")).lower() in _TRUE
                planned.append((DIRECTORY if unpack else FILE, layer, path))
            elif media in TAR_LAYER_TYPES:
                planned.append((IMAGE_LAYER, layer, ""))
            elif "zstd" in media:
                raise SourceError(
                    f"{self.shown}: layer media type {media} is zstd-compressed, which this build cannot "
                    "unpack; rebuild the image with gzip layers"
                )
            else:
                log.info(
                    "%s: skipping layer %s (%s): neither a titled file nor a tar layer",
                    self.shown,
                    layer["digest"][:19],
                    media,
                )
        kinds = {k for k, _, _ in planned}
        if not planned:
            raise NotFoundError(f"{self.shown}: the manifest has no file or filesystem layers")
        files: list[RemoteFile] = []
        only_files = kinds <= {FILE}
        seen: set[str] = set()
        titles = TreeCheck("OCI layer title")  # one title twice, or a file title inside another
        for kind, _, title in planned:
            try:
                if kind == FILE:
                    titles.add_file(title, title)
                elif kind == DIRECTORY:
                    titles.add_dir(title, title)
            except UnsafeArchiveError as exc:
                raise UnsafeArchiveError(f"{self.shown}: {exc.message}") from exc
        for i, (kind, layer, title) in enumerate(planned):
            digest = layer["digest"]
            if only_files:
                path = title
            elif kind == IMAGE_LAYER:
                path = f"layers/{i:03d}-{digest[7:19]}"
            else:
                path = f"layers/{i:03d}-{digest[7:19]}-{PurePosixPath(title).name}"
            if path in seen:
                raise UnsafeArchiveError(f"{self.shown}: two layers are titled {printable(title)!r}")
            seen.add(path)
            files.append(
                RemoteFile(
                    path=path,
                    size=int(layer["size"]),
                    sha256=digest[7:],
                    etag=digest,
                    locator=json.dumps([kind, digest, str(layer.get("mediaType", "")), title]),
                )
            )
        return files, kinds

    # -- read -------------------------------------------------------------------------------
    def supports_ranges(self, f: RemoteFile) -> bool:
        return True  # blobs are immutable and every registry we know serves Range on them

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        digest = json.loads(f.locator)[1]
        what = f"{self.shown}: blob {digest[:19]}…"
        ranged = not (start == 0 and (end is None or end == f.size))
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if ranged else {}
        resp = await self._get(f"{self.ref.base}/blobs/{digest}", what, headers)
        try:
            if resp.status == 403:
                raise self._denied(what, 403)
            if resp.status not in (200, 206):
                raise status_error(resp.status, what)
            # Blobs are digest-verified too, but a server that ignores the range is refused as
            # everywhere else rather than skipped over (one rule: transport.check_response).
            stop = end if end is not None else f.size
            body = checked_body(resp, Expect(start, stop, f.size, ranged), what)
            async with contextlib.aclosing(body):
                async for block in body:
                    yield block
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientSourceError(f"{what}: {_describe(exc)}") from exc
        finally:
            resp.release()

    # -- after download ---------------------------------------------------------------------
    def finalize(self, snapshot: Snapshot, download_dir: Path, files_dir: Path) -> list[FileEntry]:
        """Build the model tree from downloaded, digest-verified layers (for `archive == "oci"`).

        Layers apply in manifest order: titled files are moved into place, ORAS directories and
        image layers are unpacked (image layers: only `models/`, whiteouts honoured). Each layer
        blob is deleted once applied, so peak disk stays near one copy. Synchronous: run it in a
        thread. Returns the manifest entries of every file written, after --include/--exclude."""
        if files_dir.exists():
            shutil.rmtree(files_dir)
        files_dir.mkdir(parents=True)
        tree = Tree()
        top_level: set[str] = set()
        # Unpacked bytes (and copies made for links) are capped against the packed layers' size.
        packed = sum(f.size or 0 for f in snapshot.files if json.loads(f.locator)[0] != FILE)
        budget = UnpackBudget(packed, f"{self.shown}: image layers")
        for rf in snapshot.files:
            kind, digest, media, title = json.loads(rf.locator)
            blob = download_dir / rf.path
            if kind == FILE:
                dest = join_under(files_dir, title, "OCI layer title")
                _make_room(dest, files_dir, tree)
                os.replace(blob, dest)
                tree[title] = FileEntry(path=title, size=dest.stat().st_size, sha256=digest[7:])
                continue
            try:
                _apply_tar(
                    blob,
                    files_dir,
                    tree,
                    top_level,
                    prefix=title if kind == DIRECTORY else None,
                    budget=budget,
                )
            except UnsafeArchiveError as exc:
                raise UnsafeArchiveError(f"{self.shown}: layer {digest[:19]}…: {exc}") from exc
            except ArchiveBombError:
                raise
            except IntegrityError as exc:
                raise IntegrityError(f"{self.shown}: layer {digest[:19]}… ({media}): {exc}") from exc
            blob.unlink()
        _materialise_links(files_dir, tree, self.shown, budget)
        kept = {
            e.path
            for e in select(
                [RemoteFile(p, e.size) for p, e in tree.items()], self.options.include, self.options.exclude
            )
        }
        for path in set(tree) - kept:
            join_under(files_dir, path).unlink()
            del tree[path]
        if not tree:
            if any(json.loads(f.locator)[0] == IMAGE_LAYER for f in snapshot.files) and not top_level & {
                MODELS_DIR
            }:
                found = ", ".join(sorted(top_level)[:10]) or "nothing"
                raise NotFoundError(
                    f"{self.shown}: the image has no /models directory (a modelcar keeps its model there; "
                    f"top-level entries: {found})"
                )
            raise NotFoundError(f"{self.shown}: no files to keep (empty /models, or all excluded)")
        return sorted(tree.values(), key=lambda e: e.path)


class Tree(dict[str, FileEntry]):
    """The files written so far ({relative path: entry}) and the symlinks seen (path -> target)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str | None] = {}


def _clean_title(title: str) -> str:
    """A layer title as a safe relative path (ORAS titles may hold sub-directories; `./a` is `a`)."""
    rel = member_relpath(title, "OCI layer title")
    if not rel:
        raise UnsafeArchiveError(f"unsafe OCI layer title {printable(title)!r}: no file name")
    return rel


def _make_room(dest: Path, root: Path, tree: Tree) -> None:
    """Make `dest` writable as a file: parents must be directories, dest itself not a directory."""
    cur = root
    for part in dest.relative_to(root).parts[:-1]:
        cur = cur / part
        tree.links.pop(cur.relative_to(root).as_posix(), None)
        if cur.is_symlink() or (cur.exists() and not cur.is_dir()):
            _remove(cur, root, tree)
        cur.mkdir(exist_ok=True)
    tree.links.pop(dest.relative_to(root).as_posix(), None)
    if dest.is_dir() and not dest.is_symlink():
        _remove(dest, root, tree)


def _remove(path: Path, root: Path, tree: Tree) -> None:
    rel = path.relative_to(root).as_posix()
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        for key in [k for k in tree if k.startswith(rel + "/")]:
            del tree[key]
    elif path.exists() or path.is_symlink():
        path.unlink()
    tree.pop(rel, None)
    for key in [k for k in tree.links if k == rel or k.startswith(rel + "/")]:
        del tree.links[key]


def _apply_tar(
    blob: Path, root: Path, tree: Tree, top_level: set[str], prefix: str | None, budget: UnpackBudget
) -> None:
    """Unpack one tar layer into root. prefix None: an image layer (keep models/, apply whiteouts);
    else an ORAS directory, whose members must all lie under `prefix` (its title).

    Only regular files reach the disk: directories are created, hard links copied, symbolic links
    recorded in `tree.links` (never created, so no later write can go through one) and copied at
    the end; devices and fifos are refused. Every name we use goes through `member_relpath`, every
    byte written through `budget` (a layer that unpacks to far more than it weighs is a bomb)."""
    with open(blob, "rb") as fh:
        if fh.read(4) == ZSTD_MAGIC:
            raise IntegrityError("zstd-compressed layer; rebuild the image with gzip layers")
    written: set[str] = set()  # paths this layer wrote: whiteouts only hide lower layers
    try:
        with tarfile.open(blob, mode="r:*") as tf:
            for m in tf:
                # Image layers are rooted at the container's /: `/models/x`, `./models/x` are models/x.
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not parts:
                    continue
                if prefix is None:
                    first, rest = parts[0], "/".join(parts[1:])
                    top_level.add(printable(first, 60))
                    if first in (OPAQUE, WHITEOUT + MODELS_DIR) or (
                        first == MODELS_DIR and not rest and m.isreg()
                    ):
                        _clear(root, tree, written)  # the lower layers' /models is gone
                        continue
                    if first != MODELS_DIR or not rest:
                        continue  # the rest of the image's filesystem: never written, never used
                    rel = member_relpath(rest, "layer member")
                else:
                    rel = member_relpath("/".join(parts), "layer member")
                    if rel != prefix and not rel.startswith(prefix + "/"):
                        raise UnsafeArchiveError(
                            f"member {printable(m.name)!r} is outside the layer's directory "
                            f"{printable(prefix)!r}"
                        )
                if not rel:
                    continue
                parent, _, base = rel.rpartition("/")
                if prefix is None and base.startswith(WHITEOUT):
                    target = join_under(root, parent, "whiteout") if parent else root
                    if base == OPAQUE:
                        _clear(target, tree, written, root)
                    else:
                        hidden = base[len(WHITEOUT) :]
                        gone = safe_relpath(f"{parent}/{hidden}" if parent else hidden, "whiteout")
                        if gone not in written:
                            _remove(join_under(root, gone, "whiteout"), root, tree)
                    continue
                dest = join_under(root, rel, "layer member")
                key = rel
                if m.isdir():
                    budget.reserve(0, key)
                    if dest.exists() and not dest.is_dir():
                        _remove(dest, root, tree)
                    _make_room(dest / "x", root, tree)
                    written.add(key)
                    continue
                if m.islnk():
                    src = _hardlink_source(m.linkname, prefix)
                    if src is None or src not in tree:
                        raise UnsafeArchiveError(
                            f"hard link {printable(m.name)!r} -> {printable(m.linkname)!r} "
                            "points outside the model"
                        )
                    budget.reserve(tree[src].size, key, free_at=root)
                    _make_room(dest, root, tree)
                    with _open_ours(root, src) as data:
                        tree[key] = _write(data, dest, root, limit=tree[src].size, name=key)
                    written.add(key)
                    continue
                if m.issym():  # materialised as a copy once every layer is applied
                    budget.reserve(0, key)
                    _make_room(dest, root, tree)
                    _remove(dest, root, tree)
                    tree.links[key] = _link_target(key, m.linkname, image=prefix is None)
                    written.add(key)
                    continue
                if not m.isreg():
                    raise UnsafeArchiveError(
                        f"unsafe archive member {printable(m.name)!r}: special file not allowed"
                    )
                budget.reserve(m.size, key, free_at=root)
                _make_room(dest, root, tree)
                if dest.is_symlink():
                    dest.unlink()
                member = tf.extractfile(m)
                assert member is not None
                tree[key] = _write(member, dest, root, limit=m.size, name=key)
                written.add(key)
    except ModelcacheError:
        raise
    except OSError as exc:
        if exc.errno is None:  # gzip: not a valid stream
            raise IntegrityError(f"not a valid tar layer ({printable(str(exc), 120)})") from exc
        raise os_error(exc, "layer") from exc
    except CORRUPT_ARCHIVE as exc:
        raise IntegrityError(f"not a valid tar layer ({printable(str(exc), 120)})") from exc


def _open_ours(root: Path, rel: str) -> IO[bytes]:
    """A file we wrote under root, opened for reading without following any link."""
    fd = os.open(join_under(root, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _link_target(key: str, linkname: str, *, image: bool) -> str | None:
    """Where a symlink at `key` points, relative to the model root; None if outside it.

    In an image, links resolve in the container (absolute ones against its /, so `/models/x` is
    inside); in an ORAS directory only relative links that stay inside count."""
    if image:
        here = posixpath.join(f"/{MODELS_DIR}", posixpath.dirname(key))
        target = posixpath.normpath(posixpath.join(here, linkname))
        inside = target.startswith(f"/{MODELS_DIR}/")
        return target[len(MODELS_DIR) + 2 :] if inside else None
    if linkname.startswith("/"):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(key), linkname))
    return None if target == ".." or target.startswith("../") or target == "." else target


def _materialise_links(root: Path, tree: Tree, shown: str, budget: UnpackBudget) -> None:
    """Replace every symlink by a copy of what it points to (the cache holds regular files only)."""
    for key, target in sorted(tree.links.items()):
        seen = {key}
        while target is not None and target in tree.links and target not in seen:
            seen.add(target)
            target = tree.links[target]
        if target is None or target in seen:
            raise UnsafeArchiveError(
                f"{shown}: symbolic link {printable(key)!r} points outside /models (or loops)"
            )
        sources = [(target, key)] if target in tree else []
        sources += [(p, key + p[len(target) :]) for p in list(tree) if p.startswith(target + "/")]
        if not sources:
            log.warning("%s: skipping dangling symbolic link %s", shown, printable(key))
            continue
        for src, dest_key in sources:
            budget.reserve(tree[src].size, dest_key, free_at=root)  # a thousand links to one file: a bomb
            dest = join_under(root, dest_key, "symbolic link")
            _make_room(dest, root, tree)
            with _open_ours(root, src) as data:
                tree[dest_key] = _write(data, dest, root, limit=tree[src].size, name=dest_key)
    tree.links.clear()


def _hardlink_source(linkname: str, prefix: str | None) -> str | None:
    """The tree key a hard link names (normalised as member names are), or None if not in /models.
    Callers also require the key to be a file already written, so nothing else can be copied."""
    parts = [p for p in linkname.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    if prefix is not None:
        return "/".join(parts) or None
    return "/".join(parts[1:]) if len(parts) > 1 and parts[0] == MODELS_DIR else None


def _clear(target: Path, tree: Tree, written: set[str], root: Path | None = None) -> None:
    """Opaque whiteout: drop what lower layers put in `target`, keep what this layer wrote."""
    root = root or target
    base = target.relative_to(root).as_posix()
    for key in [k for k in tree.links if k not in written and (base == "." or k.startswith(base + "/"))]:
        del tree.links[key]
    if not target.is_dir():
        return
    for child in list(target.iterdir()):
        rel = child.relative_to(root).as_posix()
        if rel in written:
            if child.is_dir() and not child.is_symlink():
                _clear(child, tree, written, root)
            continue
        if child.is_dir() and not child.is_symlink() and any(w.startswith(rel + "/") for w in written):
            _clear(child, tree, written, root)
            continue
        _remove(child, root, tree)


SOURCE = OciSource
