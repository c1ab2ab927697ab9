"""A Hugging Face Hub protocol endpoint on 127.0.0.1, for testing the hf:// source offline.

Why our own: the source must be tested against the protocol the real Hub speaks (a test checks
that by running huggingface_hub.snapshot_download against it), with no internet, and with the
faults we need: wrong bytes behind a published LFS sha256, slow responses to kill a pull mid-way,
auth failures, gated repos.

What it serves (the parts of the Hub that downloaders use):

* ``GET /api/models/{repo}[/revision/{rev}]`` -> model info with ``sha`` and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`` -> entries ``{type, oid, size,
  path[, lfs{oid, size, pointerSize}]}``, paginated with a ``Link: <...>; rel="next"`` header
  when ``tree_page_size`` is set;
* ``HEAD/GET /{repo}/resolve/{rev}/{path}`` -> regular files inline (``ETag`` = git blob oid),
  LFS files as a 302 to a second "CDN" server on another port (so another origin, like the Hub's
  CDN), with ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``;
* errors as the Hub sends them: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound /
  EntryNotFound, 403 GatedRepo; with ``token`` set, 401 without a bearer token, 403 with a wrong one.

Repos are built from local directories: ``commit(repo_id, directory, branches=..., tags=...)``
snapshots the files as one commit (sha derived from the contents) and points refs at it. Files
of ``lfs_threshold`` bytes or more are LFS files. Everything runs on one event loop in a daemon
thread; counters and knobs are guarded by a lock because tests poke them from their own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote

from aiohttp import web

from tests.support.origin import _parse_range

HOST = "127.0.0.1"
LFS_THRESHOLD = 256 * 1024
BLOCK = 64 * 1024
DATE = "2026-01-01T00:00:00.000Z"

_INFO_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?/?$")
_TREE_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE_RE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_CDN_RE = re.compile(r"^/lfs/([0-9a-f]{64})$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, len(self.data))

    @property
    def blob_oid(self) -> str:
        """What git stores for the path: the pointer file for LFS files, else the bytes."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.blob_oid,
            "size": len(self.data),
            "path": self.path,
        }
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha

    def commit_for(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


@dataclass(frozen=True)
class Served:
    """One request as the endpoint saw it (recorded when the status is decided)."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    status: int
    authorization: bool


class HfEndpoint:
    """The Hub API + resolve on ``url``, LFS bytes on ``cdn_url`` (another port: another origin).

    Knobs, changeable while running: ``token`` (require this bearer token), ``gated`` (repo ids
    answering 403 GatedRepo), ``rate_limit`` (bytes/s per response body), ``tree_page_size``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
        rate_limit: int | None = None,
        tree_page_size: int | None = None,
    ) -> None:
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.rate_limit = rate_limit
        self.tree_page_size = tree_page_size
        self.gated: set[str] = set()
        self._repos: dict[str, HubRepo] = {}
        self._blobs: dict[str, HubFile] = {}  # sha256 -> file, what the CDN serves
        self._corrupt: set[str] = set()  # sha256 of files served with one byte flipped
        self._failures: list[int] = []  # statuses for the next Hub (not CDN) requests, in order
        self._lock = threading.Lock()
        self._requests: list[Served] = []
        self._bytes_by_path: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._hub_port = 0
        self._cdn_port = 0

    # ----------------------------------------------------------------- repos

    def commit(
        self, repo_id: str, directory: Path, *, branches: Iterable[str] = ("main",), tags: Iterable[str] = ()
    ) -> str:
        """Snapshot every file under ``directory`` as a commit of ``repo_id``; returns its sha."""
        root = Path(directory)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
        with self._lock:
            repo = self._repos.setdefault(repo_id, HubRepo(repo_id))
            parent = next(reversed(repo.commits), "")
            hub_files = {
                path: HubFile(path, data, lfs=len(data) >= self.lfs_threshold) for path, data in files.items()
            }
            listing = "\n".join(f"{f.blob_oid} {p}" for p, f in sorted(hub_files.items()))
            sha = hashlib.sha1(f"{repo_id}\n{parent}\n{len(repo.commits)}\n{listing}".encode()).hexdigest()
            repo.commits[sha] = hub_files
            for f in hub_files.values():
                self._blobs[f.sha256] = f
            for ref in (*branches, *tags):
                repo.refs[ref] = sha
        return sha

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve this file (in every commit that has it) with one byte flipped, same size."""
        with self._lock:
            for files in self._repos[repo_id].commits.values():
                if path in files:
                    self._corrupt.add(files[path].sha256)

    def heal(self) -> None:
        with self._lock:
            self._corrupt.clear()
            self._failures.clear()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` Hub requests with ``status`` (an overloaded or restarting Hub)."""
        with self._lock:
            self._failures.extend([status] * count)

    # ----------------------------------------------------------------- stats

    @property
    def requests(self) -> list[Served]:
        with self._lock:
            return list(self._requests)

    def bytes_sent_for(self, repo_path: str) -> int:
        """Body bytes sent for a file path (inline or from the CDN), summed over all repos."""
        with self._lock:
            return self._bytes_by_path.get(repo_path, 0)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return sum(self._bytes_by_path.values())

    def reset_stats(self) -> None:
        with self._lock:
            self._requests.clear()
            self._bytes_by_path.clear()

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._hub_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{HOST}:{self._cdn_port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("endpoint already running")
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="hf-endpoint", daemon=True)
        thread.start()
        ready.result(timeout=10)
        self._loop, self._thread = loop, thread

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _astart(self) -> None:
        for handler in (self._hub, self._cdn):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, HOST, 0).start()
            self._runners.append(runner)
        self._hub_port = int(self._runners[0].addresses[0][1])
        self._cdn_port = int(self._runners[1].addresses[0][1])

    async def _astop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    # ----------------------------------------------------------------- handlers

    def _log(self, server: str, request: web.Request, status: int) -> None:
        with self._lock:
            self._requests.append(
                Served(
                    server,
                    request.method,
                    request.raw_path,
                    request.headers.get("Range"),
                    status,
                    "Authorization" in request.headers,
                )
            )

    def _fail(self, request: web.Request, status: int, code: str | None, message: str) -> web.Response:
        self._log("hub", request, status)
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        body = None if request.method == "HEAD" else json.dumps({"error": message})
        return web.Response(status=status, headers=headers, text=body, content_type="application/json")

    def _lookup(self, request: web.Request, owner: str, name: str) -> HubRepo | web.Response:
        """Auth first (as the Hub, a bad token fails even for a missing repo), then the repo."""
        if self.token is not None:
            auth = request.headers.get("Authorization", "")
            if not auth:
                return self._fail(request, 401, None, "Authentication required")
            if auth != f"Bearer {self.token}":
                return self._fail(request, 403, None, "Invalid credentials in Authorization header")
        repo_id = f"{owner}/{name}"
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            return self._fail(request, 404, "RepoNotFound", "Repository not found")
        if repo_id in self.gated:
            return self._fail(
                request,
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )
        return repo

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return self._fail(request, failure, None, "Service temporarily unavailable")
        path = request.raw_path.split("?", 1)[0]
        if request.method == "GET" and (m := _INFO_RE.match(path)):
            return self._info(request, m.group(1), m.group(2), unquote(m.group(3) or "main"))
        if request.method == "GET" and (m := _TREE_RE.match(path)):
            return self._tree(request, m.group(1), m.group(2), unquote(m.group(3)), unquote(m.group(4) or ""))
        if request.method in ("GET", "HEAD") and (m := _RESOLVE_RE.match(path)):
            return await self._resolve(
                request, m.group(1), m.group(2), unquote(m.group(3)), unquote(m.group(4))
            )
        return self._fail(request, 404, None, "Not found")

    def _info(self, request: web.Request, owner: str, name: str, rev: str) -> web.StreamResponse:
        repo = self._lookup(request, owner, name)
        if isinstance(repo, web.Response):
            return repo
        sha = repo.commit_for(rev)
        if sha is None:
            return self._fail(request, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        body = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": owner,
            "sha": sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": self.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": [{"rfilename": p} for p in sorted(files)],
            "usedStorage": sum(len(f.data) for f in files.values()),
        }
        self._log("hub", request, 200)
        return web.json_response(body)

    def _tree(self, request: web.Request, owner: str, name: str, rev: str, prefix: str) -> web.StreamResponse:
        repo = self._lookup(request, owner, name)
        if isinstance(repo, web.Response):
            return repo
        sha = repo.commit_for(rev)
        if sha is None:
            return self._fail(request, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        base = prefix.strip("/")
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, f in sorted(repo.commits[sha].items()):
            if base and not p.startswith(base + "/"):
                continue
            rel = p[len(base) + 1 :] if base else p
            parts = rel.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                d = "/".join(([base] if base else []) + parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    entries.append(
                        {"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d}
                    )
            if recursive or len(parts) == 1:
                entries.append(f.tree_entry())
        if base and not entries:
            return self._fail(request, 404, "EntryNotFound", f"{base} does not exist on {rev}")
        cursor = int(request.query.get("cursor", "0") or 0)
        headers: dict[str, str] = {}
        page = entries[cursor:]
        if self.tree_page_size is not None and len(page) > self.tree_page_size:
            page = page[: self.tree_page_size]
            query = "&".join(f"{k}={quote(v)}" for k, v in request.query.items() if k != "cursor")
            nxt = f"{self.url}{request.path}?{query}&cursor={cursor + len(page)}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._log("hub", request, 200)
        return web.json_response(page, headers=headers)

    async def _resolve(
        self, request: web.Request, owner: str, name: str, rev: str, path: str
    ) -> web.StreamResponse:
        repo = self._lookup(request, owner, name)
        if isinstance(repo, web.Response):
            return repo
        sha = repo.commit_for(rev)
        if sha is None:
            return self._fail(request, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        f = repo.commits[sha].get(path)
        if f is None:
            resp = self._fail(request, 404, "EntryNotFound", f"{path} does not exist on {rev}")
            resp.headers["X-Repo-Commit"] = sha
            return resp
        headers = {"X-Repo-Commit": sha}
        if f.lfs:
            headers.update(
                {
                    "Location": f"{self.cdn_url}/lfs/{f.sha256}",
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.data)),
                    "ETag": f'"{f.blob_oid}"',
                }
            )
            self._log("hub", request, 302)
            return web.Response(status=302, headers=headers)
        return await self._send(request, "hub", f, {**headers, "ETag": f'"{f.blob_oid}"'})

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        m = _CDN_RE.match(request.raw_path.split("?", 1)[0])
        with self._lock:
            f = self._blobs.get(m.group(1)) if m else None
        if f is None or request.method not in ("GET", "HEAD"):
            self._log("cdn", request, 404)
            return web.Response(status=404, text="NoSuchKey")
        return await self._send(request, "cdn", f, {"ETag": f'"{f.sha256}"'})

    async def _send(
        self, request: web.Request, server: str, f: HubFile, headers: dict[str, str]
    ) -> web.StreamResponse:
        size = len(f.data)
        start, end, status = 0, size - 1, 200
        if "Range" in request.headers:
            parsed = _parse_range(request.headers["Range"], size)
            if parsed == "unsatisfiable":
                self._log(server, request, 416)
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if parsed != "ignore":
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start + 1 if size else 0
        self._log(server, request, status)
        await resp.prepare(request)
        if request.method == "HEAD" or size == 0:
            return resp
        with self._lock:
            data = f.data
            if f.sha256 in self._corrupt:
                mid = size // 2
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        t0, sent, pos = time.monotonic(), 0, start
        with contextlib.suppress(ConnectionError):
            while pos <= end:
                block = data[pos : min(pos + BLOCK, end + 1)]
                await resp.write(block)
                pos += len(block)
                sent += len(block)
                with self._lock:
                    self._bytes_by_path[f.path] = self._bytes_by_path.get(f.path, 0) + len(block)
                    rate = self.rate_limit
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await resp.write_eof()
        return resp
