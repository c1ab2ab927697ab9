"""A real, fault-injectable static HTTP origin on 127.0.0.1 for downloader tests.

Why a hand-rolled server instead of ``web.static``: tests need byte-exact control over what
goes on the wire (ranges, If-Range, validators, digests), counters of what was *actually*
written, and faults that real origins/CDNs produce (5xx, RSTs mid-body, short bodies,
stalls, slow starts), toggled at runtime.

Two modes:

* in-process: ``with Origin(root) as origin: ...`` runs aiohttp on its own event loop in a
  daemon thread, so synchronous and async tests can both use it.
* subprocess: ``python -m tests.support.origin --root DIR [--port 0] [--fault JSON]...``
  prints ``PORT=<n>`` as its first stdout line and serves until SIGTERM/SIGINT.
  Control it over HTTP (``GET /_stats``, ``POST /_faults``, ``POST /_reset``) or via
  :class:`OriginProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import fcntl
import fnmatch
import hashlib
import hmac
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, get_args

from aiohttp import web

HOST = "127.0.0.1"
CHUNK_SIZE = 256 * 1024
CONTROL_PATHS = frozenset({"/_stats", "/_faults", "/_reset"})

FaultKind = Literal["status", "reset", "truncate", "stall", "delay"]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
_BODY_FAULTS = frozenset({"reset", "truncate", "stall"})
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class FaultRule:
    """One fault to inject; rules are evaluated in insertion order for every request.

    Selection: a request *matches* if its path fits ``path`` (fnmatch glob on the URL path,
    ``*`` also spans ``/``) and its method is in ``methods``. Each rule numbers its own matching
    requests n = 1, 2, ...; it fires when n > ``skip`` and, with m = n - skip, all given
    selectors hold: ``m <= first``, ``m % every == 0``, ``rng.random() < probability``
    (RNG seeded with ``seed``, so runs are reproducible). No selector -> fires every time.

    Kinds: ``status`` (reply ``status`` with ``headers`` instead of content), ``reset`` (send
    headers + ``after_bytes`` of body, then RST the TCP connection), ``truncate`` (declare full
    Content-Length, send ``after_bytes``, close cleanly), ``stall`` (send ``after_bytes``, go
    silent for ``seconds``, then carry on), ``delay`` (sleep ``seconds`` before responding;
    delays of several rules add up and combine with one other fault).

    ``methods=None`` means GET+HEAD for status/delay and GET only for body faults, because a
    HEAD response has no body to damage (and must not consume a "first N GETs" budget).
    """

    kind: FaultKind
    path: str = "*"
    methods: tuple[str, ...] | None = None
    skip: int = 0
    first: int | None = None
    every: int | None = None
    probability: float | None = None
    seed: int = 0
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    after_bytes: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(_FAULT_KINDS)}")
        if self.kind in _BODY_FAULTS and self.methods and "HEAD" in self.methods:
            raise ValueError(f"{self.kind!r} damages a body; HEAD responses have none")
        if self.every is not None and self.every < 1:
            raise ValueError("every must be >= 1")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")

    @property
    def effective_methods(self) -> frozenset[str]:
        if self.methods is not None:
            return frozenset(m.upper() for m in self.methods)
        return frozenset({"GET"} if self.kind in _BODY_FAULTS else {"GET", "HEAD"})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["headers"] = dict(self.headers)
        d["methods"] = list(self.methods) if self.methods is not None else None
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        """Build from JSON (``POST /_faults``, ``--fault``); unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FaultRule keys: {sorted(unknown)}")
        kwargs = dict(data)
        if kwargs.get("methods") is not None:
            kwargs["methods"] = tuple(kwargs["methods"])
        if "headers" in kwargs:
            kwargs["headers"] = dict(kwargs["headers"])
        return cls(**kwargs)


class _ArmedRule:
    """A rule plus its per-rule request counter and RNG (mutable state lives here, not in the rule)."""

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.methods = rule.effective_methods
        self.seen = 0
        self.fired = 0
        self.rng = random.Random(rule.seed)

    def consider(self, method: str, path: str) -> bool:
        r = self.rule
        if method not in self.methods or not fnmatch.fnmatchcase(path, r.path):
            return False
        self.seen += 1
        m = self.seen - r.skip
        if m <= 0:
            return False
        if r.first is not None and m > r.first:
            return False
        if r.every is not None and m % r.every != 0:
            return False
        if r.probability is not None and self.rng.random() >= r.probability:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class RequestLog:
    """One served request, recorded when its status is decided (before the body is streamed)."""

    method: str
    path: str
    range: str | None
    status: int
    fault: FaultKind | None = None


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["ignore", "unsatisfiable"]:
    """Single byte range -> inclusive (start, end); RFC 9110: invalid or multi-range is ignored."""
    m = _RANGE_RE.match(header)
    if m is None:
        return "ignore"
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return "ignore"
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return "ignore"
    if start >= size:
        return "unsatisfiable"
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def _sha256_b64(path: Path) -> str:
    with path.open("rb") as f:
        return base64.b64encode(hashlib.file_digest(f, "sha256").digest()).decode("ascii")


def _unsent_kernel_bytes(sock: socket.socket) -> int:
    """Bytes still queued in the kernel send buffer (Linux TIOCOUTQ); 0 where unsupported."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:
        return 0
    return int(struct.unpack("i", buf)[0])


class Origin:
    """Static file origin on 127.0.0.1 with ranges, validators, auth, counters and faults.

    Counters and fault rules are guarded by a lock: handlers run on the server thread while tests
    read and program them from the test thread. Stats and faults survive ``stop()``/``start()``.
    ``rate_limit`` (bytes/s) and ``ranges`` may be changed while running.
    """

    def __init__(
        self,
        root: Path,
        *,
        ranges: bool = True,
        digest: bool = False,
        rate_limit: int | None = None,
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.root = Path(root).resolve()
        self.ranges = ranges
        self.digest = digest
        self.rate_limit = rate_limit
        self.token = token
        self.basic_auth = basic_auth
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._faults: list[_ArmedRule] = []
        self._bytes_sent = 0
        self._bytes_by_path: dict[str, int] = {}
        self._request_counts: dict[tuple[str, str], int] = {}
        self._requests: list[RequestLog] = []
        self._digest_cache: dict[tuple[str, int, int], str] = {}
        self._port = 0
        # Per-run state (one event loop per start()).
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._inflight: set[asyncio.Transport] = set()
        self._digest_pending: dict[tuple[str, int, int], asyncio.Future[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle (thread mode)

    def start(self, port: int | None = None) -> None:
        """Serve from a background thread. ``port=None`` reuses the previous port (0 the first time),
        so ``stop(); start()`` brings the origin back on the same URL."""
        if self._thread is not None:
            raise RuntimeError("origin already running")
        bind_port = self._port if port is None else port
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart(bind_port))
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        thread = threading.Thread(target=run, name=f"origin-{bind_port}", daemon=True)
        thread.start()
        ready.result(timeout=10)
        self._loop, self._thread = loop, thread

    def stop(self) -> None:
        """Go down like a crashed origin: stop listening and RST in-flight responses. Idempotent."""
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
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("origin was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    # ----------------------------------------------------------------- lifecycle (any loop)

    async def _astart(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._stopping = asyncio.Event()
        self._inflight = set()
        self._digest_pending = {}
        self._runner = runner

    async def _astop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._stopping is not None:
            self._stopping.set()
        for transport in list(self._inflight):
            self._abort(transport)
        await runner.cleanup()

    # ----------------------------------------------------------------- faults

    def add_fault(self, rule: FaultRule) -> None:
        with self._lock:
            self._faults.append(_ArmedRule(rule))

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        """Replace all rules (their counters restart from zero)."""
        with self._lock:
            self._faults = [_ArmedRule(r) for r in rules]

    def clear_faults(self) -> None:
        self.set_faults(())

    @property
    def faults(self) -> list[FaultRule]:
        with self._lock:
            return [a.rule for a in self._faults]

    def _pick_faults(self, method: str, path: str) -> tuple[float, FaultRule | None]:
        delay, chosen = 0.0, None
        with self._lock:
            for armed in self._faults:
                if armed.consider(method, path):
                    if armed.rule.kind == "delay":
                        delay += armed.rule.seconds
                    elif chosen is None:
                        chosen = armed.rule
        return delay, chosen

    # ----------------------------------------------------------------- stats

    @property
    def bytes_sent(self) -> int:
        """Body bytes handed to the transport (headers excluded), across all paths."""
        with self._lock:
            return self._bytes_sent

    def bytes_sent_for(self, path: str) -> int:
        with self._lock:
            return self._bytes_by_path.get("/" + path.lstrip("/"), 0)

    def overlap_bytes_for(self, path: str, overlap: int = 8192) -> int:
        """Bytes served twice on purpose: each ranged GET of a file without a published checksum
        starting past 0 re-reads up to `overlap` bytes its neighbour also fetched (a cross-check)."""
        want = "/" + path.lstrip("/")
        with self._lock:
            starts = [
                int(m.group(1))
                for r in self._requests
                if r.method == "GET" and r.path == want and r.range and r.status == 206
                for m in [re.match(r"\s*bytes\s*=\s*(\d+)-", r.range)]
                if m is not None
            ]
        return sum(min(overlap, s) for s in starts)

    def request_count(self, method: str, path: str) -> int:
        with self._lock:
            return self._request_counts.get((method.upper(), "/" + path.lstrip("/")), 0)

    @property
    def request_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._request_counts)

    @property
    def requests(self) -> list[RequestLog]:
        with self._lock:
            return list(self._requests)

    def reset_stats(self) -> None:
        with self._lock:
            self._bytes_sent = 0
            self._bytes_by_path.clear()
            self._request_counts.clear()
            self._requests.clear()

    def stats(self) -> dict[str, Any]:
        """JSON-able snapshot; the same document ``GET /_stats`` returns."""
        with self._lock:
            return {
                "bytes_sent": self._bytes_sent,
                "bytes_by_path": dict(self._bytes_by_path),
                "request_counts": {f"{m} {p}": n for (m, p), n in self._request_counts.items()},
                "requests": [asdict(r) for r in self._requests],
                "faults_fired": [a.fired for a in self._faults],
            }

    def _log(self, request: web.BaseRequest, status: int, fault: FaultKind | None = None) -> None:
        entry = RequestLog(request.method, request.path, request.headers.get("Range"), status, fault)
        with self._lock:
            self._requests.append(entry)

    def _count_bytes(self, path: str, n: int) -> None:
        with self._lock:
            self._bytes_sent += n
            self._bytes_by_path[path] = self._bytes_by_path.get(path, 0) + n

    # ----------------------------------------------------------------- request handling

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path in CONTROL_PATHS:
            return await self._control(request)
        transport = request.transport
        if transport is not None:
            self._inflight.add(transport)
        try:
            return await self._serve(request)
        finally:
            if transport is not None:
                self._inflight.discard(transport)

    async def _control(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path)
        if key == ("GET", "/_stats"):
            return web.json_response(self.stats())
        if key == ("POST", "/_reset"):
            self.reset_stats()
            return web.json_response({"ok": True})
        if key == ("GET", "/_faults"):
            return web.json_response([r.to_dict() for r in self.faults])
        if key == ("DELETE", "/_faults"):
            self.clear_faults()
            return web.json_response({"ok": True})
        if key == ("POST", "/_faults"):
            try:
                body = await request.json()
                items = body if isinstance(body, list) else [body]
                rules = [FaultRule.from_dict(item) for item in items]
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            self.set_faults(rules)
            return web.json_response({"ok": True, "rules": len(rules)})
        return web.json_response({"error": "unsupported control request"}, status=405)

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the origin stops, so stop() never waits on a stall."""
        if seconds <= 0 or self._stopping is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _simple(
        self,
        request: web.BaseRequest,
        status: int,
        text: str = "",
        headers: Mapping[str, str] | None = None,
        fault: FaultKind | None = None,
    ) -> web.Response:
        self._log(request, status, fault)
        body = b"" if request.method == "HEAD" else text.encode()
        return web.Response(status=status, body=body, headers=dict(headers or {}))

    def _auth_failure(self, request: web.BaseRequest) -> web.Response | None:
        if self.token is None and self.basic_auth is None:
            return None
        given = request.headers.get("Authorization")
        if given is None:
            scheme = "Bearer" if self.token is not None else 'Basic realm="origin"'
            return self._simple(request, 401, "unauthorized\n", {"WWW-Authenticate": scheme})
        accepted = []
        if self.token is not None:
            accepted.append(f"Bearer {self.token}")
        if self.basic_auth is not None:
            cred = base64.b64encode(":".join(self.basic_auth).encode()).decode()
            accepted.append(f"Basic {cred}")
        if any(hmac.compare_digest(given.encode(), a.encode()) for a in accepted):
            return None
        return self._simple(request, 403, "forbidden\n")

    def _resolve(self, url_path: str) -> Path | Literal["bad", "missing"]:
        parts = [p for p in url_path.split("/") if p]
        if any(p in ("..", ".") or "\\" in p or "\0" in p for p in parts):
            return "bad"
        candidate = self.root.joinpath(*parts)
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return "missing"
        if not resolved.is_relative_to(self.root):
            return "bad"  # symlink pointing outside root
        return resolved if resolved.is_file() else "missing"

    async def _digest_of(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._digest_cache.get(key)
        if cached is not None:
            return cached
        fut = self._digest_pending.get(key)
        if fut is None:  # first request hashes; concurrent range requests share the result
            fut = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, _sha256_b64, path))
            self._digest_pending[key] = fut
        value = await asyncio.shield(fut)
        self._digest_pending.pop(key, None)
        with self._lock:
            self._digest_cache[key] = value
        return value

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        with self._lock:
            self._request_counts[(method, path)] = self._request_counts.get((method, path), 0) + 1
        delay, fault = self._pick_faults(method, path)
        await self._sleep(delay)
        if fault is not None and fault.kind == "status":
            return self._simple(request, fault.status, f"injected {fault.status}\n", fault.headers, "status")
        if method not in ("GET", "HEAD"):
            return self._simple(request, 405, "method not allowed\n", {"Allow": "GET, HEAD"})
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        target = self._resolve(path)
        if target == "bad":
            return self._simple(request, 400, "bad path\n")
        if target == "missing":
            return self._simple(request, 404, "not found\n")

        st = target.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        headers = {"ETag": etag, "Last-Modified": last_modified, "Content-Type": "application/octet-stream"}
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
        if self.digest:
            headers["Repr-Digest"] = f"sha-256=:{await self._digest_of(target, st)}:"

        status, start, length = 200, 0, size
        range_header = request.headers.get("Range")
        if self.ranges and range_header is not None and self._if_range_ok(request, etag, st.st_mtime):
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                return self._simple(request, 416, "", {**headers, "Content-Range": f"bytes */{size}"})
            if parsed != "ignore":
                start, end = parsed
                status, length = 206, end - start + 1
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"

        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        body_fault = fault if fault is not None and fault.kind in _BODY_FAULTS else None
        if body_fault is not None:
            resp.force_close()  # the connection is unusable after a damaged body
        self._log(request, status, body_fault.kind if body_fault else None)
        await resp.prepare(request)
        if method == "HEAD":
            return resp
        with contextlib.suppress(ConnectionError):  # client went away, or we reset it
            await self._stream(request, resp, target, start, length, body_fault)
        return resp

    def _if_range_ok(self, request: web.BaseRequest, etag: str, mtime: float) -> bool:
        """If-Range: serve the range only if the validator still matches (strong etag or exact date)."""
        value = request.headers.get("If-Range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith('"'):
            return value == etag
        if value.startswith("W/"):
            return False
        try:
            return email.utils.parsedate_to_datetime(value).timestamp() == int(mtime)
        except (TypeError, ValueError):
            return False

    async def _stream(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        target: Path,
        start: int,
        length: int,
        fault: FaultRule | None,
    ) -> None:
        limit = length if fault is None else min(fault.after_bytes, length)
        sent = await self._send_range(request, resp, target, start, limit)
        if fault is None:
            return
        if fault.kind == "truncate":
            return  # force_close() makes aiohttp close cleanly (FIN) after this short body
        transport = request.transport
        if fault.kind == "reset":
            if transport is not None:
                await self._flush(transport)
                self._abort(transport)
            return
        # stall: go silent, then carry on (the client's read timeout should have fired by then)
        await self._sleep(fault.seconds)
        if self._stopping is not None and self._stopping.is_set():
            return
        await self._send_range(request, resp, target, start + sent, length - sent)

    async def _send_range(
        self, request: web.BaseRequest, resp: web.StreamResponse, target: Path, start: int, n: int
    ) -> int:
        """Stream ``n`` bytes from ``start`` in bounded chunks, paced by ``rate_limit``."""
        loop = asyncio.get_running_loop()
        url_path, sent = request.path, 0
        t0 = loop.time()
        with target.open("rb") as f:
            fd = f.fileno()
            while sent < n:
                rate = self.rate_limit
                chunk = self.chunk_size if not rate else max(1024, min(self.chunk_size, rate // 20))
                data = await loop.run_in_executor(None, os.pread, fd, min(chunk, n - sent), start + sent)
                if not data:
                    break  # file shrank underneath us
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                # Counted before the await: write() hands the bytes to the transport synchronously and
                # may then yield in drain(), by which time the client can already have read them.
                self._count_bytes(url_path, len(data))
                sent += len(data)
                await resp.write(data)
                if rate:
                    ahead = sent / rate - (loop.time() - t0)
                    if ahead > 0:
                        await self._sleep(ahead)
                if self._stopping is not None and self._stopping.is_set():
                    raise ConnectionResetError("origin stopped")
        return sent

    @staticmethod
    async def _flush(transport: asyncio.Transport, timeout: float = 2.0) -> None:
        """Wait until written bytes have left both asyncio's buffer and the kernel's, so an RST that
        follows does not discard them and the client deterministically sees ``after_bytes``."""
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not transport.is_closing():
            pending = transport.get_write_buffer_size()
            if sock is not None:
                pending += _unsent_kernel_bytes(sock)
            if pending == 0:
                return
            await asyncio.sleep(0.005)

    @staticmethod
    def _abort(transport: asyncio.Transport) -> None:
        """Close with SO_LINGER=0 so the peer gets a TCP RST (connection reset), not a clean FIN."""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


# --------------------------------------------------------------------- subprocess mode


class OriginProcess:
    """Drive ``python -m tests.support.origin`` from a test: start, read PORT, control, SIGTERM/SIGKILL."""

    def __init__(
        self,
        root: Path,
        *,
        ranges: bool = True,
        digest: bool = False,
        rate_limit: int | None = None,
        token: str | None = None,
        faults: Sequence[FaultRule] = (),
    ) -> None:
        self.root = Path(root).resolve()
        self.args: list[str] = ["--root", str(self.root)]
        if not ranges:
            self.args.append("--no-ranges")
        if digest:
            self.args.append("--digest")
        if rate_limit:
            self.args += ["--rate-limit", str(rate_limit)]
        if token is not None:
            self.args += ["--token", token]
        for rule in faults:
            self.args += ["--fault", json.dumps(rule.to_dict())]
        self.proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    def start(self, port: int | None = None, timeout: float = 10.0) -> None:
        """Spawn the server; ``port=None`` reuses the previous port (0 the first time)."""
        if self.proc is not None:
            raise RuntimeError("already running")
        repo_root = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
        bind = self._port if port is None else port
        cmd = [sys.executable, "-m", "tests.support.origin", *self.args, "--port", str(bind)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("PORT="):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"origin subprocess did not start (got {line!r}, rc={proc.returncode})")
        self._port = int(line.removeprefix("PORT="))
        self.proc = proc

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_stats")
        return result

    def reset_stats(self) -> None:
        self._call("POST", "/_reset", {})

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        self._call("POST", "/_faults", [r.to_dict() for r in rules])

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (0 on a clean shutdown)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return rc

    def kill(self) -> None:
        """SIGKILL: the origin dies without closing connections gracefully."""
        if self.proc is not None:
            self.proc.kill()
        self.stop()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _serve_until_signal(origin: Origin, port: int) -> None:
    await origin._astart(port)
    print(f"PORT={origin.port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await origin._astop()


def _basic(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.origin", description="Fault-injectable static HTTP origin."
    )
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--no-ranges", action="store_true", help="ignore Range, never advertise it")
    parser.add_argument("--digest", action="store_true", help="send Repr-Digest: sha-256=:...:")
    parser.add_argument("--rate-limit", type=int, default=None, help="bytes/s per response")
    parser.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    parser.add_argument("--basic", type=_basic, default=None, help="require basic auth USER:PASSWORD")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    parser.add_argument(
        "--fault", action="append", default=[], metavar="JSON", help="FaultRule as JSON; repeatable"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")
    try:
        rules = [FaultRule.from_dict(json.loads(f)) for f in args.fault]
    except (ValueError, TypeError) as exc:
        parser.error(f"bad --fault: {exc}")
    origin = Origin(
        args.root,
        ranges=not args.no_ranges,
        digest=args.digest,
        rate_limit=args.rate_limit,
        token=args.token,
        basic_auth=args.basic,
        chunk_size=args.chunk_size,
    )
    origin.set_faults(rules)
    asyncio.run(_serve_until_signal(origin, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
