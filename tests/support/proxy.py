"""A real HTTP forward proxy on 127.0.0.1 for proxy tests (absolute-form requests and CONNECT).

Small on purpose: one upstream connection per request (`Connection: close` both ways), every
request recorded (method, target, whether Proxy-Authorization came), and it only ever connects to
127.0.0.1 so a test can never send anything off the machine through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str  # absolute URL, or host:port for CONNECT
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    port: int = 0
    requests: list[ProxiedRequest] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> ForwardProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [ln for ln in lines[1:] if ln]
        auth = next(
            (h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-authorization:")),
            None,
        )
        self.requests.append(ProxiedRequest(method, target, auth))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = await self._connect(host, int(port), writer)
            if upstream is None:
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self._pipe_both(reader, writer, *upstream)
            return
        parts = urlsplit(target)
        upstream = await self._connect(parts.hostname or "", parts.port or 80, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        keep = [h for h in headers if h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP]
        up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1"))
        up_writer.write(("\r\n".join([*keep, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
        length = next(
            (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0
        )
        if length:
            up_writer.write(await reader.readexactly(length))
        await up_writer.drain()
        try:
            resp_head = await up_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            up_writer.close()
            return
        resp_lines = [ln for ln in resp_head.decode("latin-1").split("\r\n") if ln]
        resp_keep = [resp_lines[0]] + [
            h for h in resp_lines[1:] if h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP
        ]
        writer.write(("\r\n".join([*resp_keep, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
        await _pipe(up_reader, writer)
        up_writer.close()

    async def _connect(
        self, host: str, port: int, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        if host != HOST:  # never leave the machine
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return None
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return None

    async def _pipe_both(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade"}
)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        dst.close()
