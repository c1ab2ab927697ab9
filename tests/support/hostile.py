"""A lying HTTP origin on 127.0.0.x, written on raw asyncio streams so it can lie about anything.

Real servers and proxies get ranges, lengths and validators wrong; attackers do it on purpose.
Each `mode` below is one such lie. The server holds two versions of one file (`v1`, `v2`: same
size, different bytes, ETags `"v1"`/`"v2"`) and answers HEAD/GET for any path with them.

    with HostileOrigin("wrong-range") as o:
        url = o.url("model.bin")
        ... o.requests  (method, path, headers) of everything it was asked

Modes (see `_respond`):
  honest                   correct 200/206 answers, strong ETag, Last-Modified, Accept-Ranges
  wrong-range              206 whose Content-Range (and bytes) are another range than asked
  range-without-request    206 + Content-Range to a GET that asked for no range
  unparseable-range        206 with a Content-Range that does not parse
  total-lies               206 whose Content-Range total differs from HEAD's size
  ignore-range             200 with the whole file to every ranged GET
  get-bigger               HEAD says N; a plain GET sends N + 4096 bytes
  get-smaller              HEAD says N; every GET sends a shorter body with a matching length
  etag-after-head          HEAD says v1; every GET serves v2 (and its ETag), ignoring If-Range
  etag-midway              the first 3 GETs serve v1, then v2 with ETag v2, ignoring If-Range
  etag-midway-persistent   like etag-midway, but flips v1/v2 every 3 GETs (never settles)
  same-etag-other-bytes    every third GET serves v2's bytes under ETag v1 (a lying cache)
  modified-midway          no ETag; Last-Modified changes after 3 GETs (v2 bytes from then on)
  overlong-chunked         chunked body that runs 4096 bytes past the asked range
  wrong-digest             Repr-Digest of other bytes than served
  trickle                  GET bodies at 1 byte every 0.2 s
  trickle-headers          the response headers themselves at 1 byte every 0.2 s
  no-headers               accepts, reads the request, never answers
  redirect-other-host      302 to the same path on `other` (a second listener on 127.0.0.2)
  redirect-file            302 to file:///etc/passwd
  redirect-loop            302 to itself, forever
  redirect-https-to-http   only meaningful for TLS origins; here: 302 to http:// (same host)
  endless                  no size anywhere: HEAD without Content-Length, GET a chunked body that
                           does not end (it stops after ENDLESS_CAP bytes, so a client that does
                           not bound it gets a complete 256 MiB file rather than a full disk)
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

MODES = (
    "honest",
    "wrong-range",
    "range-without-request",
    "unparseable-range",
    "total-lies",
    "ignore-range",
    "get-bigger",
    "get-smaller",
    "etag-after-head",
    "etag-midway",
    "etag-midway-persistent",
    "same-etag-other-bytes",
    "modified-midway",
    "overlong-chunked",
    "wrong-digest",
    "trickle",
    "trickle-headers",
    "no-headers",
    "redirect-other-host",
    "redirect-file",
    "redirect-loop",
    "endless",
)
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
MiB = 1 << 20
ENDLESS_CAP = 256 * MiB


def content(version: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes for version 1 or 2."""
    out = bytearray()
    seed = hashlib.sha256(f"v{version}".encode()).digest()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest() * 64
        i += 1
    return bytes(out[:size])


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    host: str


@dataclass
class HostileOrigin:
    mode: str
    size: int = 3 * MiB + 12345
    host: str = "127.0.0.1"
    other_host: str = "127.0.0.2"
    requests: list[Seen] = field(default_factory=list)
    gets: int = 0
    body_bytes: int = 0  # body bytes written by `endless` GETs

    def __post_init__(self) -> None:
        assert self.mode in MODES, self.mode
        self.v1, self.v2 = content(1, self.size), content(2, self.size)
        self.port = 0
        self.other_port = 0
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        main = await asyncio.start_server(self._serve, self.host, 0)
        other = await asyncio.start_server(self._serve, self.other_host, 0)
        self._servers = [main, other]
        self.port = main.sockets[0].getsockname()[1]
        self.other_port = other.sockets[0].getsockname()[1]

    def url(self, name: str = "model.bin") -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def seen(self, host: str | None = None) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if host is None or r.host == host]

    # -- protocol ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            local = writer.get_extra_info("sockname")[0]
            with self._lock:
                self.requests.append(Seen(method, path, headers, local))
                if method == "GET":
                    self.gets += 1
                n = self.gets
            await self._respond(writer, method, path, headers, local, n)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: str, headers: dict[str, str], body: bytes = b""
    ) -> None:
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((head + "Connection: close\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, path: str, req: dict[str, str], local: str, n: int
    ) -> None:
        mode = self.mode
        if mode == "no-headers":
            await asyncio.sleep(3600)
            return
        if mode == "trickle-headers":  # each byte resets a read timeout; only a deadline helps
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\nX-Pad: {'p' * 400}\r\n\r\n"
            deadline = time.monotonic() + 60
            for ch in head.encode():
                if time.monotonic() > deadline:
                    return
                writer.write(bytes([ch]))
                await writer.drain()
                await asyncio.sleep(0.2)
            return
        if mode == "redirect-other-host" and local == self.host:
            where = f"http://{self.other_host}:{self.other_port}{path}"
            await self._send(writer, "302 Found", {"Location": where, "Content-Length": "0"})
            return
        if mode == "redirect-file":
            await self._send(writer, "302 Found", {"Location": "file:///etc/passwd", "Content-Length": "0"})
            return
        if mode == "redirect-loop":
            await self._send(writer, "302 Found", {"Location": path, "Content-Length": "0"})
            return
        if mode == "endless":
            if method == "HEAD":
                await self._send(writer, "200 OK", {})
                return
            await self._send(writer, "200 OK", {"Transfer-Encoding": "chunked"})
            piece = self.v1[: 256 * 1024]
            while self.body_bytes < ENDLESS_CAP:
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
                with self._lock:
                    self.body_bytes += len(piece)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return

        # Which version this request sees, and under which validator. HEADs follow the origin's
        # current state (`n` = GETs so far), so a fresh snapshot after a change sees the change.
        version, etag_version = 1, 1
        is_get = method == "GET"
        if (
            (mode == "etag-after-head" and is_get)
            or (mode in ("etag-midway", "modified-midway") and n > 3)
            or (mode == "etag-midway-persistent" and (n - 1) // 3 % 2 == 1)
        ):
            version = etag_version = 2
        elif mode == "same-etag-other-bytes" and is_get and n % 3 == 0:
            version = 2
        data = self.v1 if version == 1 else self.v2
        size = len(data)
        base: dict[str, str] = {"Accept-Ranges": "bytes"}
        if mode == "modified-midway":
            base["Last-Modified"] = email.utils.formatdate(1_700_000_000 + 1000 * etag_version, usegmt=True)
        else:
            base["ETag"] = f'"v{etag_version}"'
            base["Last-Modified"] = email.utils.formatdate(1_700_000_000, usegmt=True)
        if mode == "wrong-digest":
            other = hashlib.sha256(self.v2).digest()
            base["Repr-Digest"] = f"sha-256=:{base64.b64encode(other).decode()}:"

        if method == "HEAD":
            await self._send(writer, "200 OK", {**base, "Content-Length": str(size)})
            return
        rng = _RANGE_RE.match(req.get("range", ""))
        if rng is None:
            if mode == "range-without-request":  # a partial answer to a whole-file request
                part = data[1000:]
                cr = f"bytes 1000-{size - 1}/{size}"
                headers = {**base, "Content-Length": str(len(part)), "Content-Range": cr}
                await self._send(writer, "206 Partial Content", headers, part)
                return
            if mode == "get-bigger":
                body = data + b"\0" * 4096
                await self._send(writer, "200 OK", {**base, "Content-Length": str(len(body))}, body)
                return
            if mode == "get-smaller":
                body = data[: size // 2]
                await self._send(writer, "200 OK", {**base, "Content-Length": str(len(body))}, body)
                return
            await self._body(writer, "200 OK", base, data)
            return
        start = int(rng.group(1))
        end = min(int(rng.group(2)) if rng.group(2) else size - 1, size - 1)
        if mode == "ignore-range":
            await self._body(writer, "200 OK", base, data)
            return
        if mode == "wrong-range":
            start, end = min(start + 1000, end), end
        body = data[start : end + 1]
        cr = f"bytes {start}-{end}/{size}"
        if mode == "unparseable-range":
            cr = f"bytes {start}+{end}"
        elif mode == "total-lies":
            cr = f"bytes {start}-{end}/{size + 1}"
        elif mode == "get-smaller":
            body = body[: max(1, len(body) // 2)]
            cr = f"bytes {start}-{start + len(body) - 1}/{size}"
        if mode == "overlong-chunked":
            headers = {**base, "Content-Range": cr, "Transfer-Encoding": "chunked"}
            await self._send(writer, "206 Partial Content", headers)
            payload = body + b"\x01" * 4096
            for i in range(0, len(payload), 65536):
                piece = payload[i : i + 65536]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        await self._body(writer, "206 Partial Content", {**base, "Content-Range": cr}, body)

    async def _body(
        self, writer: asyncio.StreamWriter, status: str, base: dict[str, str], body: bytes
    ) -> None:
        headers = {**base, "Content-Length": str(len(body))}
        if self.mode != "trickle":
            await self._send(writer, status, headers, body)
            return
        await self._send(writer, status, headers)
        deadline = time.monotonic() + 60  # bounded: the client gives up long before
        for i in range(len(body)):
            if time.monotonic() > deadline:
                return
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.2)
