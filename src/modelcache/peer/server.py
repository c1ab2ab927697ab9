"""The peer server: this node's models, to other nodes of the cluster only.

`GET /v1/models/<key>/manifest` says what this node can give for one model: per file its size,
validators, whole-file sha256 (once known) and the sha256 of every piece it can serve. A published
model offers every piece (hashed once, on first request, in the same pass that re-checks the file
against its manifest: a copy damaged on disk is never offered). A model still downloading offers
only the pieces it has written, synced and hashed (`state.json` of its staging, which the
transfer rewrites atomically), so a peer never gets bytes that are not yet on disk.

`GET /v1/models/<key>/files/<path>` serves one byte range of such a file (RFC 9110 single range).
Every request but `/healthz` must be signed with the cluster's peer token (`peer.auth`); answers
never name the token. Uploads share one token bucket (`upload_rate` bytes/s) and a cap on
concurrent uploads, so serving peers never starves the node's own pods.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from modelcache.peer import API, DEFAULT_PORT
from modelcache.peer.auth import HEADER, verify
from modelcache.store import Store
from modelcache.transfer import STATE_FILE, RateLimiter, piece_size

log = logging.getLogger("modelcache.peer")
SEND_BLOCK = 256 * 1024
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Offer:
    """One file this node can serve: where it is and which pieces (index -> sha256) are readable."""

    path: Path
    size: int
    pieces: dict[int, str]
    piece: int


class PeerServer:
    def __init__(
        self,
        store: Store,
        token: str,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        upload_rate: int | None = None,
        max_uploads: int = 32,
    ) -> None:
        if not token:
            raise ValueError("the peer server needs a token: it never serves anonymously")
        self.store = store
        self.token = token
        self.host = host
        self.port = port
        self.limiter = RateLimiter(upload_rate) if upload_rate else None
        self.uploads = asyncio.Semaphore(max_uploads)
        self.bytes_sent = 0
        self._pieces: dict[tuple[str, str, int, int], dict[int, str] | None] = {}
        # Piece hashes of files seen complete in staging, by (key, path): (whole sha256, pieces).
        # Publishing is a rename, so a published file with that sha256 needs no second hashing.
        self._staged: dict[tuple[str, str], tuple[str, dict[int, str]]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._states: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get(API + "/{key}/manifest", self._manifest)
        app.router.add_get(API + "/{key}/files/{path:.+}", self._file)
        return app

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ----------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)  # type: ignore[no-any-return]
        signed = verify(
            self.token,
            request.headers.get(HEADER),
            request.method,
            request.raw_path,
            request.headers.get("Range", ""),
        )
        if not signed:
            return web.Response(status=401, text="peer request not signed with this cluster's peer token\n")
        return await handler(request)  # type: ignore[no-any-return]

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _manifest(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not _KEY_RE.match(key):
            return web.Response(status=400, text="bad key\n")
        doc = await self.describe(key)
        if doc is None:
            return web.Response(status=404, text="not here\n")
        return web.json_response(doc)

    async def describe(self, key: str) -> dict[str, Any] | None:
        """The manifest document for `key`, or None when this node has nothing of it."""
        published = await self._published(key)
        if published is not None:
            revision, offers, shas = published
            complete = True
            files = {
                p: {
                    "size": o.size,
                    "etag": None,
                    "source_sha256": None,
                    "sha256": shas[p],
                    "piece_size": o.piece,
                }
                | {"pieces": {str(i): h for i, h in o.pieces.items()}}
                for p, o in offers.items()
            }
            return {"key": key, "revision": revision, "complete": complete, "files": files}
        state = self._staging_state(key)
        if state is None:
            return None
        files = {}
        for p, f in state.get("files", {}).items():
            pieces = f.get("pieces") or {}
            size, piece, sha = f.get("size"), f.get("piece_size"), f.get("sha256")
            whole = (
                isinstance(size, int) and isinstance(piece, int) and piece > 0 and len(pieces) * piece >= size
            )
            if whole and isinstance(sha, str):
                self._staged[(key, p)] = (sha, valid_pieces(pieces))
            files[p] = {
                "size": f.get("size"),
                "etag": f.get("etag"),
                "source_sha256": f.get("source_sha256"),
                "sha256": f.get("sha256"),
                "piece_size": f.get("piece_size") or 0,
                "pieces": pieces,
            }
        return {"key": key, "revision": state.get("revision"), "complete": False, "files": files}

    async def _file(self, request: web.Request) -> web.StreamResponse:
        key, name = request.match_info["key"], request.match_info["path"]
        if not _KEY_RE.match(key):
            return web.Response(status=400, text="bad key\n")
        offer = await self._offer(key, name)
        if offer is None:
            return web.Response(status=404, text="not here\n")
        header = request.headers.get("Range")
        start, stop = 0, offer.size
        if header is not None:
            m = _RANGE_RE.match(header.strip())
            if m is None:
                return web.Response(status=416, text="one byte range, please\n")
            start = int(m.group(1))
            stop = min(offer.size, int(m.group(2)) + 1) if m.group(2) else offer.size
            if start >= stop:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{offer.size}"})
        if not _readable(offer, start, stop):
            return web.Response(status=404, text="those bytes are not here (yet)\n")
        if self.uploads.locked():
            return web.Response(status=503, headers={"Retry-After": "1"}, text="busy\n")
        async with self.uploads:
            if self.limiter is not None:  # paid up front, per range: the average is what is capped
                await self.limiter.take(stop - start)
            try:
                fd = os.open(offer.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return web.Response(status=404, text="not here\n")
            resp = web.StreamResponse(status=206 if header is not None else 200)
            resp.content_length = stop - start
            resp.content_type = "application/octet-stream"
            if header is not None:
                resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{offer.size}"
            try:
                await resp.prepare(request)
                with os.fdopen(fd, "rb", closefd=False) as fh:
                    await _sendfile(request, resp, fh, start, stop - start)
                self.bytes_sent += stop - start
                await resp.write_eof()
                return resp
            finally:
                os.close(fd)

    # -- what this node holds ---------------------------------------------------------------
    async def _offer(self, key: str, name: str) -> Offer | None:
        published = await self._published(key)
        if published is not None:
            return published[1].get(name)
        state = self._staging_state(key)
        if state is None:
            return None
        f = state.get("files", {}).get(name)
        dest = state.get("dest")
        if not isinstance(f, dict) or dest not in ("files", "download") or not isinstance(f.get("size"), int):
            return None
        pieces = {int(i): h for i, h in (f.get("pieces") or {}).items() if str(i).isdigit()}
        piece = f.get("piece_size") or 0
        if not pieces or not isinstance(piece, int) or piece <= 0:
            return None
        path = self.store.staging_dir(key) / dest / name  # `name` is a key of our own state: safe
        return Offer(path, f["size"], pieces, piece)

    def _staging_state(self, key: str) -> dict[str, Any] | None:
        """The staging `state.json` of `key`, parsed once per version (peers poll it often)."""
        path = self.store.staging_dir(key) / STATE_FILE
        try:
            st = os.stat(path, follow_symlinks=False)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._states.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            self._states.pop(key, None)
            return None
        if not (isinstance(data, dict) and isinstance(data.get("files"), dict)):
            return None
        self._states[key] = (stamp, data)
        return data

    async def _published(self, key: str) -> tuple[str | None, dict[str, Offer], dict[str, str]] | None:
        """(revision, offers, whole-file sha256s) of a complete model, or None."""
        try:
            # On this thread: the index's SQLite connection belongs to it (one indexed query).
            if self.store.lookup_key(key) is None:
                return None
            manifest = self.store.manifest(key)
        except Exception:  # a damaged index or manifest: offer nothing, the agent repairs it
            return None
        offers: dict[str, Offer] = {}
        shas: dict[str, str] = {}
        base = self.store.model_dir(key)
        for entry in manifest.files:
            path = base / entry.path
            pieces = await self._published_pieces(key, entry.path, path, entry.size, entry.sha256)
            if pieces is not None:
                offers[entry.path] = Offer(path, entry.size, pieces, piece_size(entry.size))
                shas[entry.path] = entry.sha256
        return manifest.revision, offers, shas

    async def _published_pieces(
        self, key: str, name: str, path: Path, size: int, sha256: str
    ) -> dict[int, str] | None:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        cache_key = (key, name, st.st_mtime_ns, st.st_size)
        if cache_key in self._pieces:
            return self._pieces[cache_key]
        staged = self._staged.pop((key, name), None)
        if staged is not None and staged[0] == sha256 and st.st_size == size:
            self._pieces[cache_key] = staged[1]
            return staged[1]
        lock = self._locks.setdefault((key, name), asyncio.Lock())
        async with lock:
            if cache_key not in self._pieces:
                pieces = await asyncio.to_thread(_hash_pieces, path, size, sha256)
                if pieces is None:
                    log.warning(
                        "peer server: %s of model %s does not match its manifest; not offered", name, key
                    )
                self._pieces[cache_key] = pieces
        return self._pieces[cache_key]


async def _sendfile(request: web.Request, resp: web.StreamResponse, fh: Any, offset: int, count: int) -> None:
    """Zero-copy `sendfile` after the headers (as aiohttp's FileResponse does), else reads."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    try:
        await asyncio.get_running_loop().sendfile(transport, fh, offset, count)
        return
    except NotImplementedError:
        pass
    pos, stop = offset, offset + count
    while pos < stop:
        data = os.pread(fh.fileno(), min(SEND_BLOCK, stop - pos), pos)
        if not data:
            raise ConnectionResetError("file shrank")  # the client sees a short body
        await resp.write(data)
        pos += len(data)


def _readable(offer: Offer, start: int, stop: int) -> bool:
    """Whether every piece that [start, stop) touches is one this node has hashed."""
    first, last = start // offer.piece, (stop - 1) // offer.piece
    return all(i in offer.pieces for i in range(first, last + 1))


def _hash_pieces(path: Path, size: int, sha256: str) -> dict[int, str] | None:
    """Piece hashes of a published file, or None when the file is not the one its manifest names."""
    piece = piece_size(size)
    whole = hashlib.sha256()
    out: dict[int, str] = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for index, a in enumerate(range(0, size, piece)):
            h = hashlib.sha256()
            pos, b = a, min(size, a + piece)
            while pos < b:
                data = os.pread(fd, min(4 << 20, b - pos), pos)
                if not data:
                    return None
                h.update(data)
                whole.update(data)
                pos += len(data)
            out[index] = h.hexdigest()
        if os.pread(fd, 1, size):
            return None
    finally:
        os.close(fd)
    return out if whole.hexdigest() == sha256 else None


def valid_pieces(raw: Any) -> dict[int, str]:
    """Pieces from a peer's manifest, keeping only well-formed entries (hostile input)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(k, str) and k.isdigit() and len(k) < 10 and isinstance(v, str) and _HEX64.match(v):
            out[int(k)] = v
    return out
