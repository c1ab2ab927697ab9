"""The webhook's TLS listener: bounded connections, each phase of each connection on a deadline.

Why not `aiohttp.web.TCPSite`: aiohttp has no header- or body-read timeout, and asyncio's SSL server
allocates a 256 KiB read buffer per accepted socket before any byte arrives, so idle or 1 byte/s
clients pile up without limit (1,000 of them took the server from 70 MB to 940 MB). Here we accept
sockets ourselves (`loop.sock_accept`), decide on the spot whether there is room, and only then
hand the socket to asyncio's TLS (`loop.connect_accepted_socket`) and aiohttp's protocol.

Every connection is in one phase with one deadline (a single timer per connection):

    HANDSHAKE -> HEADERS -> BODY -> BUSY -> IDLE -> HEADERS ...
    (TLS)       (request     (request  (our      (keep-alive,
                 line and     body)     decision, waiting for the
                 headers)               response) next request)

A connection that overstays its phase is aborted (IDLE ones are closed politely). At the cap a new
connection evicts the connection that has been waiting longest in a phase the *client* controls
(HANDSHAKE, HEADERS, BODY, IDLE): a slow or idle client loses its slot, a request the apiserver is
sending right now gets it, so a flood of slow clients cannot lock the apiserver out. Only when every
slot is BUSY (our own work) is the new connection closed at once, never queued.

Bodies: the size cap is checked against Content-Length before reading and while reading; bodies
over `small_body_bytes` (rare: big UPDATEs) also share one byte budget, so the cap times the
connection limit is never held in memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from modelcache.webhook.limits import Limits

log = logging.getLogger("modelcache.webhook")

#: The request body, read by the listener's middleware before the handler runs.
BODY: web.RequestKey[bytes] = web.RequestKey("modelcache_body", bytes)


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    HEADERS = "headers"
    BODY = "body"
    BUSY = "busy"
    IDLE = "idle"


#: Phases whose length the client controls: a connection in one of them may be evicted.
_EVICTABLE = frozenset({Phase.HANDSHAKE, Phase.HEADERS, Phase.BODY, Phase.IDLE})
#: How long a politely closed connection may take to finish its TLS shutdown.
_SHUTDOWN_GRACE = 5.0


@dataclass(eq=False)
class _Conn:
    phase: Phase
    since: float
    timer: asyncio.TimerHandle | None = None
    handshake: asyncio.Task[None] | None = None
    transport: asyncio.Transport | None = None
    closing: bool = False  # closed politely, waiting for the TLS shutdown
    closed: bool = False


@dataclass
class Stats:
    """Counters for logs and tests."""

    accepted: int = 0
    refused: int = 0  # at the cap with every slot busy: closed at once
    evicted: int = 0
    timed_out: dict[str, int] = field(default_factory=lambda: {p.value: 0 for p in Phase})
    too_large: int = 0
    over_budget: int = 0


class _Guard(asyncio.Protocol):
    """Sits between asyncio's TLS transport and aiohttp's RequestHandler: forwards everything and
    tells the listener when a connection starts, receives bytes and ends."""

    def __init__(self, listener: Listener, conn: _Conn, inner: RequestHandler) -> None:
        self._listener = listener
        self._conn = conn
        self._inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._listener._handshaken(self._conn, transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._conn.phase is Phase.IDLE and data:
            self._listener._set_phase(self._conn, Phase.HEADERS)
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()  # aiohttp lets the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener._forget(self._conn)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _reset(sock: socket.socket) -> None:
    """Close with RST: no TIME_WAIT, nothing buffered, the client learns at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OneLine(logging.Filter):
    """Turns a record's traceback into `: ExcType: message` on the same line. aiohttp logs a
    full traceback for every malformed request line or header; a hostile client must not be able
    to write tracebacks into our log (and a bad request is not our error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {_one_line(record.exc_info[1])}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


#: aiohttp's per-connection logger, kept to one line per event (see `OneLine`).
http_log = logging.getLogger("modelcache.webhook.http")
http_log.addFilter(OneLine())


def _error(status: int, reason: str) -> web.Response:
    response = web.json_response({"error": reason}, status=status)
    response.force_close()  # the rest of the body (if any) is not worth reading
    return response


class Listener:
    """Accepts TLS connections for an aiohttp server within `Limits` (see the module docstring)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.stats = Stats()
        self._conns: set[_Conn] = set()
        self._by_transport: dict[asyncio.BaseTransport, _Conn] = {}
        self._budget_used = 0
        self._noted = float("-inf")
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._factory: Callable[[], RequestHandler] | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- public ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def handler_options(self) -> dict[str, Any]:
        """aiohttp RequestHandler options matching our limits (pass to `web.AppRunner`)."""
        return {
            # aiohttp's own keep-alive timer is a backstop behind ours
            "keepalive_timeout": self.limits.idle_timeout + self.limits.header_timeout,
            "lingering_time": 1.0,  # unread body after an error response: drain briefly, then close
            "max_line_size": 8190,
            "max_field_size": 8190,
            "max_headers": 64,
            "auto_decompress": False,  # the apiserver never compresses; a gzip bomb stays a 400
            "logger": http_log,
        }

    async def start(
        self, factory: Callable[[], RequestHandler], ssl_context: ssl.SSLContext, host: str, port: int
    ) -> None:
        """Listen on host:port (port 0: any free port, see `port`) and serve with `factory`
        (an aiohttp `web.Server`, i.e. `AppRunner.server`)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(min(1024, self.limits.max_connections * 2))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock, self._factory, self._ssl = sock, factory, ssl_context
        self._accepting = loop.create_task(self._accept_loop())

    async def close(self) -> None:
        """Stop accepting and abort connections still handshaking. Established connections are
        aiohttp's to close (`AppRunner.cleanup` lets running requests finish)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
        handshakes = [c.handshake for c in self._conns if c.handshake is not None]
        for task in handshakes:
            task.cancel()
        await asyncio.gather(*handshakes, return_exceptions=True)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Reads the body within the limits, then runs the handler as BUSY and sends the response
        before the connection goes IDLE (so it is never evicted half-way through a response)."""
        conn = self._by_transport.get(request.transport) if request.transport is not None else None
        if conn is not None:
            self._set_phase(conn, Phase.BODY)
        reserved = 0
        try:
            body, reserved, refusal = await self._read_body(request)
            if refusal is not None:
                response: web.StreamResponse = refusal
            else:
                request[BODY] = body
                if conn is not None:
                    self._set_phase(conn, Phase.BUSY)
                response = await handler(request)
            with contextlib.suppress(ConnectionError):  # the client left: nothing to tell it
                await response.prepare(request)
                await response.write_eof()
            return response
        finally:
            self._budget_used -= reserved
            if conn is not None:
                self._set_phase(conn, Phase.IDLE)

    # -- bodies ---------------------------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> tuple[bytes, int, web.Response | None]:
        """(body, bytes reserved from the large-body budget, error response or None)."""
        if not request.body_exists:
            return b"", 0, None
        limit = self.limits.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            self.stats.too_large += 1
            return b"", 0, _error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        reserved = 0
        if declared is None or declared > self.limits.small_body_bytes:
            want = limit if declared is None else declared
            if self._budget_used + want > self.limits.large_body_budget_bytes:
                self.stats.over_budget += 1
                response = _error(503, "too many large requests at once; retry")
                response.headers["Retry-After"] = "1"
                return b"", 0, response
            self._budget_used += want
            reserved = want
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    self.stats.too_large += 1
                    return b"", reserved, _error(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
        except Exception as exc:  # connection lost, bad chunked encoding: nothing we can use
            return b"", reserved, _error(400, f"could not read the request body: {_one_line(exc)}")
        return b"".join(chunks), reserved, None

    # -- connections ----------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._conns) >= self.limits.max_connections and not self._evict_one():
                self.stats.refused += 1
                self._note(f"all {len(self._conns)} connections busy: refused one")
                _reset(sock)
                continue
            self.stats.accepted += 1
            conn = _Conn(Phase.HANDSHAKE, loop.time())
            self._conns.add(conn)
            self._arm(conn)
            conn.handshake = loop.create_task(self._handshake(conn, sock))

    async def _handshake(self, conn: _Conn, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self._factory is not None and self._ssl is not None
        factory = self._factory
        try:
            await loop.connect_accepted_socket(
                lambda: _Guard(self, conn, factory()),
                sock,
                ssl=self._ssl,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout,
                ssl_shutdown_timeout=_SHUTDOWN_GRACE,
            )
        except asyncio.CancelledError:  # evicted, timed out or shutting down: the transport is closed
            self._forget(conn)
        except Exception as exc:  # a failed handshake is the client's problem, not ours
            log.debug("TLS handshake failed: %s", exc)
            self._forget(conn)
        else:
            if conn.transport is None:  # closed during the handshake without an error
                self._forget(conn)
        finally:
            conn.handshake = None

    def _handshaken(self, conn: _Conn, transport: asyncio.Transport) -> None:
        conn.transport = transport
        self._by_transport[transport] = conn
        self._set_phase(conn, Phase.HEADERS)

    def _set_phase(self, conn: _Conn, phase: Phase) -> None:
        if conn.closed or conn.closing:
            return
        conn.phase = phase
        conn.since = asyncio.get_running_loop().time()
        self._arm(conn)

    def _arm(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        timeout = {
            Phase.HANDSHAKE: self.limits.tls_handshake_timeout,
            Phase.HEADERS: self.limits.header_timeout,
            Phase.BODY: self.limits.body_timeout,
            Phase.BUSY: self.limits.request_timeout,
            Phase.IDLE: self.limits.idle_timeout,
        }[conn.phase]
        conn.timer = asyncio.get_running_loop().call_later(timeout, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.closed:
            return
        if conn.phase is Phase.IDLE and not conn.closing and conn.transport is not None:
            # an idle client did nothing wrong: close politely (TLS close_notify), abort if the
            # shutdown itself drags on
            self.stats.timed_out[Phase.IDLE.value] += 1
            conn.closing = True
            conn.transport.close()
            conn.timer = asyncio.get_running_loop().call_later(_SHUTDOWN_GRACE, self._expire, conn)
            return
        if not conn.closing:
            self.stats.timed_out[conn.phase.value] += 1
            self._note(f"a connection stayed in {conn.phase.value} longer than allowed")
        self._drop(conn)

    def _evict_one(self) -> bool:
        candidates = [c for c in self._conns if (c.phase in _EVICTABLE or c.closing) and not c.closed]
        if not candidates:
            return False
        # closing ones first, then the one waiting longest on its client
        victim = min(candidates, key=lambda c: (not c.closing, c.since))
        self.stats.evicted += 1
        self._note(f"{len(self._conns)} connections open: evicted one in {victim.phase.value}")
        self._drop(victim)
        return True

    def _drop(self, conn: _Conn) -> None:
        """Abort a connection now; it no longer counts against the cap."""
        if conn.handshake is not None:
            conn.handshake.cancel()  # asyncio aborts the half-made TLS transport
        elif conn.transport is not None:
            conn.transport.abort()
        self._forget(conn)

    def _note(self, what: str) -> None:
        """One log line per minute at most: a flood of bad clients must not flood the log."""
        now = asyncio.get_running_loop().time()
        if now - self._noted < 60.0:
            return
        self._noted = now
        s = self.stats
        log.warning(
            "connection limits at work (%s); so far %d evicted, %d refused, timed out: %s",
            what,
            s.evicted,
            s.refused,
            ", ".join(f"{k} {v}" for k, v in s.timed_out.items() if v) or "none",
        )

    def _forget(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._conns.discard(conn)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)
