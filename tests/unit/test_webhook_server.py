"""The webhook's TLS server under hostile clients: the real listener and aiohttp app on 127.0.0.1
with real TLS clients and no apiserver (a fixed cluster state stands in for the cluster reads).

Timing assertions only bound from above, generously: the machine may be loaded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from modelcache import certs
from modelcache.webhook import registration
from modelcache.webhook.admission import Cluster, EventNote, Obj, Options, Reads
from modelcache.webhook.limits import Limits
from modelcache.webhook.listener import Listener
from modelcache.webhook.server import Webhook, serve

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


# -- certificates and clients ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca("webhook-test-ca")
    leaf = certs.issue(ca, "127.0.0.1", hosts=["127.0.0.1"], server=True)
    paths = {"ca": tmp / "ca.crt", "cert": tmp / "tls.crt", "key": tmp / "tls.key"}
    paths["ca"].write_bytes(ca.cert_pem)
    leaf.write(paths["cert"], paths["key"])
    return paths


def server_context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["cert"], pki["key"])
    return context


def client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def review_body(kind: str = "LocalModelCache", uid: str = "u-1", obj: Obj | None = None) -> bytes:
    request = {
        "uid": uid,
        "kind": {"group": "serving.kserve.io", "version": "v1alpha1", "kind": kind},
        "operation": "CREATE",
        "name": "x",
        "object": obj
        if obj is not None
        else {
            "metadata": {"name": "x"},
            "spec": {"sourceModelUri": "x", "modelSize": "1Gi", "nodeGroups": ["g"]},
        },
        "oldObject": None,
    }
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def http_request(body: bytes, path: str = registration.PATH_CACHES, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def post_blocking(port: int, context: ssl.SSLContext, body: bytes, timeout: float = 60.0) -> tuple[int, Obj]:
    """One request on a fresh connection with the stdlib's blocking client."""
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    try:
        conn.request("POST", registration.PATH_CACHES, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class Client:
    """An asyncio TLS client speaking raw HTTP, so it can misbehave at any byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext | None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    async def response(self, timeout: float = 30.0) -> tuple[int, Obj]:
        """(status, JSON body) of the next response."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:]) if k.lower() == "content-length"
        )
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return status, json.loads(body)

    async def closed_within(self, seconds: float, trickle: bytes = b"") -> float | None:
        """Seconds until the server closed the connection (None: still open after `seconds`),
        sending `trickle` one byte every 0.2 s meanwhile (a slowloris)."""
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            try:
                if sent < len(trickle):
                    self.writer.write(trickle[sent : sent + 1])
                    sent += 1
                    await self.writer.drain()
                data = await asyncio.wait_for(self.reader.read(4096), 0.2)
                if not data:
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                return time.monotonic() - start
        return None

    def close(self) -> None:
        self.writer.transport.abort()


class FixedCluster:
    """The cluster edge replaced by a fixed state; `gate` (if set) holds every decision."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.waiting = 0

    async def read(self, request: Obj, needs: Reads) -> Cluster:
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
        return Cluster()

    async def record(self, note: EventNote) -> None:
        return None


@contextlib.asynccontextmanager
async def running(
    pki: dict[str, Path], limits: Limits, reader: FixedCluster | None = None
) -> AsyncIterator[Listener]:
    webhook = Webhook(reader or FixedCluster(), Options())
    async with serve(webhook, server_context(pki), "127.0.0.1", 0, limits) as listener:
        yield listener


FAST = Limits(tls_handshake_timeout=1.0, header_timeout=1.0, body_timeout=1.0, idle_timeout=1.0)


# -- timeouts ---------------------------------------------------------------------------------------
def test_every_phase_has_a_deadline(pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with running(pki, FAST) as listener:
            ctx = client_context(pki)
            # no TLS handshake at all (a plain TCP connection that says nothing)
            raw = await Client.connect(listener.port, None)
            # a handshake, then headers at 5 bytes/s: trickling does not extend the deadline
            slow_headers = await Client.connect(listener.port, ctx)
            # complete headers, then a body that never comes
            slow_body = await Client.connect(listener.port, ctx)
            slow_body.writer.write(http_request(b"{" + b" " * 99)[:-90])
            # a normal request, then an idle keep-alive connection
            idle = await Client.connect(listener.port, ctx)
            idle.writer.write(http_request(review_body()))
            status, body = await idle.response()
            assert status == 200 and body["response"]["uid"] == "u-1"
            results = await asyncio.gather(
                raw.closed_within(30),
                slow_headers.closed_within(30, trickle=http_request(review_body())),
                slow_body.closed_within(30, trickle=b" " * 200),
                idle.closed_within(30),
            )
            assert all(r is not None for r in results), results
            assert listener.open_connections == 0
            timed_out = listener.stats.timed_out
            assert timed_out["handshake"] == 1 and timed_out["headers"] == 1
            assert timed_out["body"] == 1 and timed_out["idle"] == 1

    with caplog.at_level(logging.DEBUG, logger="modelcache"):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]


def test_at_the_cap_slow_clients_make_room_and_busy_ones_refuse(pki: dict[str, Path]) -> None:
    """Idle or slow clients at the cap are evicted for a new connection (oldest first); when
    every slot is busy with our own work a new connection is closed at once, never queued."""

    async def go() -> None:
        gate = asyncio.Event()
        limits = Limits(max_connections=2, header_timeout=60, idle_timeout=60)
        reader = FixedCluster(gate)
        async with running(pki, limits, reader) as listener:
            ctx = client_context(pki)
            first, second = await Client.connect(listener.port, ctx), await Client.connect(listener.port, ctx)
            second.writer.write(b"POST / HTTP/1.1\r\n")  # slow headers, newer than `first`
            third = await Client.connect(listener.port, ctx)  # evicts `first` (the oldest)
            assert await first.closed_within(30) is not None
            assert await second.closed_within(0.5) is None
            third.writer.write(http_request(review_body()))  # becomes busy (the gate holds it)
            fourth = await Client.connect(listener.port, ctx)  # evicts `second`
            fourth.writer.write(http_request(review_body(uid="u-4")))
            assert await second.closed_within(30) is not None
            for _ in range(300):  # wait (no timing) until both requests wait in the cluster read
                if reader.waiting == 2:
                    break
                await asyncio.sleep(0.1)
            assert reader.waiting == 2 and listener.stats.evicted == 2
            # both slots busy with our own work: a fifth connection is closed at once
            with pytest.raises((OSError, ssl.SSLError, asyncio.IncompleteReadError)):
                fifth = await Client.connect(listener.port, ctx)
                fifth.writer.write(http_request(review_body()))
                await fifth.response(timeout=30)
            assert listener.stats.refused >= 1
            gate.set()
            assert (await third.response())[1]["response"]["uid"] == "u-1"
            assert (await fourth.response())[1]["response"]["uid"] == "u-4"
            for client in (second, third, fourth):
                client.close()

    asyncio.run(go())


# -- bodies -----------------------------------------------------------------------------------------
MALFORMED: list[tuple[str, bytes, str]] = [
    ("request is a number", b'{"request": 5}', "request must be an object"),
    ("not JSON", b"\x00\xffnot json", "not"),
    ("deep lists", b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    ("deep objects", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "nested deeper"),
    ("deep inside a request", review_body(obj={"spec": json.loads("[" * 150 + "]" * 150)}), "nested deeper"),
    ("a list", b"[]", "expected an AdmissionReview object"),
    ("no uid", json.dumps({"request": {"kind": {"kind": "Pod"}, "operation": "CREATE"}}).encode(), "uid"),
    (
        "kind is a string",
        json.dumps({"request": {"uid": "u", "kind": "Pod", "operation": "CREATE"}}).encode(),
        "kind",
    ),
    ("object is a list", review_body().replace(b'"object": {', b'"object": [1], "x": {'), "request.object"),
    ("v1beta1", review_body().replace(b"admission.k8s.io/v1", b"admission.k8s.io/v1beta1"), "apiVersion"),
    ("empty", b"", "not JSON"),
    ("NaN", b'{"request": NaN}', "request must be an object"),
]


@pytest.mark.parametrize(("name", "body", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_get_400_with_one_line_and_no_traceback(
    pki: dict[str, Path], caplog: pytest.LogCaptureFixture, name: str, body: bytes, reason: str
) -> None:
    async def go() -> tuple[int, Obj]:
        async with running(pki, Limits()) as listener:
            client = await Client.connect(listener.port, client_context(pki))
            client.writer.write(http_request(body))
            answer = await client.response()
            client.close()
            return answer

    with caplog.at_level(logging.DEBUG, logger="modelcache"):
        status, answer = asyncio.run(go())
    assert status == 400, answer
    assert reason in answer["error"] and "\n" not in answer["error"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert len([r for r in caplog.records if "not an AdmissionReview" in r.getMessage()]) == 1


def test_body_limits(pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    limits = Limits(max_body_bytes=256 * 1024, large_body_budget_bytes=300 * 1024)

    async def go() -> None:
        async with running(pki, limits) as listener:
            ctx = client_context(pki)
            # declared too large: refused before reading
            big = await Client.connect(listener.port, ctx)
            big.writer.write(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
            assert (await big.response())[0] == 413
            # chunked, no length: counted while reading
            chunked = await Client.connect(listener.port, ctx)
            chunk = b" " * 100_000
            chunked.writer.write(b"POST /validate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunked.writer.write(
                b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
            )
            assert (await chunked.response())[0] == 413
            # large bodies share a budget: a second large one while the first is held gets 503
            held = await Client.connect(listener.port, ctx)
            held.writer.write(http_request(b" " * 200_000)[:-1000])
            await asyncio.sleep(0.2)
            second = await Client.connect(listener.port, ctx)
            second.writer.write(http_request(b" " * 200_000))
            status, answer = await second.response()
            assert status == 503 and "retry" in answer["error"]
            # small ones never wait for it
            small = await Client.connect(listener.port, ctx)
            small.writer.write(http_request(review_body()))
            assert (await small.response())[0] == 200
            for client in (big, chunked, held, second, small):
                client.close()

    with caplog.at_level(logging.DEBUG, logger="modelcache"):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.exc_info]


def test_garbage_http_is_one_log_line(pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[int]:
        statuses = []
        async with running(pki, Limits()) as listener:
            for garbage in (
                b"\x16\x03\x01garbage\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n",
            ):
                client = await Client.connect(listener.port, client_context(pki))
                client.writer.write(garbage)
                head = await asyncio.wait_for(client.reader.read(200), 30)
                statuses.append(int(head.split()[1]))
                client.close()
        return statuses

    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(go()) == [400, 400]
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("modelcache")]
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()]


# -- the flood, against the server as its own process -------------------------------------------
@contextlib.contextmanager
def server_process(pki: dict[str, Path], limits: Limits, log: Path) -> Iterator[tuple[int, psutil.Process]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    argv = [sys.executable, "-m", "tests.unit.webhook_process", str(pki["cert"]), str(pki["key"])]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*argv, json.dumps(asdict(limits))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), log.read_text()
        yield int(line.split()[1]), psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _open_tls(port: int, context: ssl.SSLContext) -> ssl.SSLSocket | None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        return context.wrap_socket(sock, server_hostname="127.0.0.1")
    except (OSError, ssl.SSLError):  # evicted during the handshake (others are newer)
        sock.close()
        return None


def _established(proc: psutil.Process, port: int) -> int:
    return sum(1 for c in proc.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)


def test_a_flood_of_idle_and_slow_connections_stays_bounded(pki: dict[str, Path], tmp_path: Path) -> None:
    """1,000 idle TLS connections and 1,000 sending headers at a crawl: the server keeps at most
    `max_connections`, its memory stays bounded, every one of them is closed within the
    timeouts, and a normal AdmissionReview is answered in the middle of it."""
    limits = Limits(tls_handshake_timeout=5, header_timeout=5, body_timeout=5, idle_timeout=5)
    ctx = client_context(pki)
    with server_process(pki, limits, tmp_path / "server.log") as (port, proc):
        assert post_blocking(port, ctx, review_body())[0] == 200  # warm: everything imported
        before = proc.memory_info().rss
        peak, most = before, 0
        sockets: list[ssl.SSLSocket] = []
        started = time.monotonic()
        for i in range(2000):
            sock = _open_tls(port, ctx)
            if sock is not None:
                if i >= 1000:  # slow headers: the start of a request line, the rest never hurries
                    with contextlib.suppress(OSError, ssl.SSLError):
                        sock.send(b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sockets.append(sock)
            if i % 100 == 99:
                peak = max(peak, proc.memory_info().rss)
                most = max(most, _established(proc, port))
        opened = time.monotonic() - started
        # in the middle of it: the apiserver's request still gets through
        status, answer = post_blocking(port, ctx, review_body(uid="under-load"))
        assert status == 200 and answer["response"]["uid"] == "under-load"
        # everyone is closed within the timeouts (generous bound), however they trickle
        selector = selectors.DefaultSelector()
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = set(sockets)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                ready = key.fileobj
                assert isinstance(ready, ssl.SSLSocket)
                try:
                    if ready.recv(4096):
                        continue
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (OSError, ssl.SSLError):
                    pass
                selector.unregister(ready)
                open_.discard(ready)
            for sock in list(open_)[:200]:  # a slowloris keeps sending, a byte at a time
                with contextlib.suppress(OSError, ssl.SSLError):
                    sock.send(b"X")
        closed_after = time.monotonic() - started
        peak = max(peak, proc.memory_info().rss)
        after = proc.memory_info().rss
        for sock in sockets:
            sock.close()
        remaining = len(open_)
    stats = (tmp_path / "server.log").read_text()
    print(
        f"\nflood: {len(sockets)} TLS connections opened in {opened:.1f}s, "
        f"all closed after {closed_after:.1f}s; server RSS before {before / MiB:.1f} MiB, "
        f"peak {peak / MiB:.1f} MiB (+{(peak - before) / MiB:.1f}), after {after / MiB:.1f} MiB; "
        f"at most {most} established (cap {limits.max_connections})"
    )
    assert remaining == 0, f"{remaining} connections still open"
    assert most <= limits.max_connections + 2
    # ~280 KB per connection held: the cap bounds it (2,000 unbounded would be ~560 MB)
    assert peak - before < 200 * MiB, stats
    assert "Traceback" not in stats
