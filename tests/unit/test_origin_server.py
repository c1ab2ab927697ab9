"""The test origin itself must be trustworthy: every behaviour is checked from a real client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # `tests.*` importable without a conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.origin import FaultRule, Origin, OriginProcess, RequestLog

pytestmark = pytest.mark.timeout(30)

SIZE = 1024 * 1024 + 123  # not a multiple of the chunk size
DATA = random.Random(1234).randbytes(SIZE)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "model.bin").write_bytes(DATA)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "small.txt").write_bytes(b"hello world\n")
    (tmp_path / "empty").write_bytes(b"")
    return tmp_path


@pytest.fixture
def origin(root: Path) -> Iterator[Origin]:
    with Origin(root, chunk_size=64 * 1024) as o:
        yield o


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """Plain blocking client; does not raise on HTTP errors so statuses can be asserted."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@contextlib.contextmanager
def raw_get(
    port: int, target: str, headers: dict[str, str] | None = None
) -> Iterator[http.client.HTTPResponse]:
    """http.client sends the target verbatim (no normalisation of ``..``), unlike urllib/aiohttp."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", target, headers=headers or {})
        yield conn.getresponse()
    finally:
        conn.close()


async def read_until_error(
    url: str, timeout: aiohttp.ClientTimeout | None = None
) -> tuple[bytes, BaseException | None]:
    """Read a body with aiohttp in small pieces; return what arrived and the error that ended it."""
    got = bytearray()
    async with aiohttp.ClientSession(timeout=timeout or aiohttp.ClientTimeout(total=10)) as session:
        try:
            async with session.get(url) as resp:
                assert resp.status == 200
                while chunk := await resp.content.read(16 * 1024):
                    got += chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            return bytes(got), exc
    return bytes(got), None


# ---------------------------------------------------------------------------- plain serving


def test_get_and_head_headers_and_counters(origin: Origin) -> None:
    status, headers, body = fetch(origin.url_for("model.bin"))
    assert status == 200 and body == DATA
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"') and not headers["ETag"].startswith("W/")
    assert headers["Last-Modified"].endswith("GMT")
    assert "Repr-Digest" not in headers

    status, head_headers, body = fetch(origin.url_for("model.bin"), method="HEAD")
    assert status == 200 and body == b""
    assert head_headers["Content-Length"] == str(SIZE)
    assert head_headers["ETag"] == headers["ETag"]

    assert fetch(origin.url_for("sub/small.txt"))[2] == b"hello world\n"
    assert fetch(origin.url_for("empty"))[:1] == (200,)

    assert origin.bytes_sent == SIZE + 12
    assert origin.bytes_sent_for("/model.bin") == SIZE
    assert origin.bytes_sent_for("sub/small.txt") == 12
    assert origin.request_count("GET", "/model.bin") == 1
    assert origin.request_count("HEAD", "/model.bin") == 1
    assert origin.requests[:2] == [
        RequestLog("GET", "/model.bin", None, 200),
        RequestLog("HEAD", "/model.bin", None, 200),
    ]
    origin.reset_stats()
    assert origin.bytes_sent == 0 and origin.requests == [] and origin.request_counts == {}


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, SIZE - 1),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=-99999999", 0, SIZE - 1),
        ("bytes=5-99999999", 5, SIZE - 1),
        ("bytes=7-7", 7, 7),
    ],
)
def test_single_ranges(origin: Origin, range_header: str, start: int, end: int) -> None:
    status, headers, body = fetch(origin.url_for("model.bin"), {"Range": range_header})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == DATA[start : end + 1]
    assert origin.bytes_sent == end - start + 1
    assert origin.requests == [RequestLog("GET", "/model.bin", range_header, 206)]


@pytest.mark.parametrize("range_header", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
def test_unsatisfiable_range_is_416(origin: Origin, range_header: str) -> None:
    status, headers, body = fetch(origin.url_for("model.bin"), {"Range": range_header})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{SIZE}"
    assert body == b""
    assert fetch(origin.url_for("empty"), {"Range": "bytes=0-"})[0] == 416


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-9", "bytes=9-1", "items=0-1", "bytes=x-y"])
def test_multi_or_invalid_range_gets_full_200(origin: Origin, range_header: str) -> None:
    status, headers, body = fetch(origin.url_for("model.bin"), {"Range": range_header})
    assert status == 200 and body == DATA and "Content-Range" not in headers


def test_range_head_reports_partial_length(origin: Origin) -> None:
    status, headers, body = fetch(origin.url_for("model.bin"), {"Range": "bytes=10-19"}, method="HEAD")
    assert (status, headers["Content-Length"], headers["Content-Range"], body) == (
        206,
        "10",
        f"bytes 10-19/{SIZE}",
        b"",
    )
    assert origin.bytes_sent == 0


def test_if_range(origin: Origin) -> None:
    _, headers, _ = fetch(origin.url_for("model.bin"), method="HEAD")
    etag, last_modified = headers["ETag"], headers["Last-Modified"]
    url = origin.url_for("model.bin")
    assert fetch(url, {"Range": "bytes=0-9", "If-Range": etag})[0] == 206
    assert fetch(url, {"Range": "bytes=0-9", "If-Range": last_modified})[0] == 206
    status, _, body = fetch(url, {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert status == 200 and body == DATA
    assert fetch(url, {"Range": "bytes=0-9", "If-Range": "W/" + etag})[0] == 200
    # A mismatching validator also beats an otherwise unsatisfiable range.
    assert fetch(url, {"Range": f"bytes={SIZE}-", "If-Range": '"stale"'})[0] == 200


def test_etag_changes_with_content(origin: Origin, root: Path) -> None:
    etag1 = fetch(origin.url_for("sub/small.txt"), method="HEAD")[1]["ETag"]
    (root / "sub" / "small.txt").write_bytes(b"changed content\n")
    etag2 = fetch(origin.url_for("sub/small.txt"), method="HEAD")[1]["ETag"]
    assert etag1 != etag2
    status, _, body = fetch(origin.url_for("sub/small.txt"), {"Range": "bytes=0-3", "If-Range": etag1})
    assert (status, body) == (200, b"changed content\n")


def test_parallel_range_download_reassembles(origin: Origin) -> None:
    async def main() -> bytes:
        parts = 8
        step = -(-SIZE // parts)
        async with aiohttp.ClientSession() as session:

            async def part(i: int) -> bytes:
                start, end = i * step, min(SIZE, (i + 1) * step) - 1
                async with session.get(
                    origin.url_for("model.bin"), headers={"Range": f"bytes={start}-{end}"}
                ) as resp:
                    assert resp.status == 206
                    return await resp.read()

            return b"".join(await asyncio.gather(*(part(i) for i in range(parts))))

    assert asyncio.run(main()) == DATA
    assert origin.bytes_sent_for("model.bin") == SIZE
    assert origin.request_count("GET", "/model.bin") == 8


def test_missing_directory_and_path_escape(
    origin: Origin, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert fetch(origin.url_for("nope.bin"))[0] == 404
    assert fetch(origin.url_for("sub"))[0] == 404
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_bytes(b"secret")
    (root / "link").symlink_to(outside)
    for target in ("/../secret", "/sub/../../secret", "/%2e%2e/secret", "/sub/%2E%2E/model.bin"):
        with raw_get(origin.port, target) as resp:
            assert resp.status == 400, target
            assert b"secret" not in resp.read()
    with raw_get(origin.port, "/link") as resp:
        assert resp.status == 400
    assert fetch(origin.url_for("model.bin"), method="DELETE")[0] == 405


def test_bearer_and_basic_auth(root: Path) -> None:
    with Origin(root, token="s3cret", basic_auth=("user", "pw")) as o:
        url = o.url_for("sub/small.txt")
        status, headers, _ = fetch(url)
        assert status == 401 and "WWW-Authenticate" in headers
        assert fetch(url, {"Authorization": "Bearer wrong"})[0] == 403
        assert fetch(url, {"Authorization": "Bearer s3cret"})[0] == 200
        good = base64.b64encode(b"user:pw").decode()
        bad = base64.b64encode(b"user:nope").decode()
        assert fetch(url, {"Authorization": f"Basic {good}"})[0] == 200
        assert fetch(url, {"Authorization": f"Basic {bad}"})[0] == 403
        assert o.bytes_sent == 24


def test_repr_digest(root: Path) -> None:
    expected = "sha-256=:" + base64.b64encode(hashlib.sha256(DATA).digest()).decode() + ":"
    with Origin(root, digest=True) as o:
        assert fetch(o.url_for("model.bin"), method="HEAD")[1]["Repr-Digest"] == expected
        # Repr-Digest describes the whole representation, so ranges carry the same value.
        status, headers, _ = fetch(o.url_for("model.bin"), {"Range": "bytes=0-0"})
        assert status == 206 and headers["Repr-Digest"] == expected
        assert len(o._digest_cache) == 1  # hashed once, then cached


def test_ranges_disabled(root: Path) -> None:
    with Origin(root, ranges=False) as o:
        status, headers, body = fetch(o.url_for("model.bin"), {"Range": "bytes=0-9"})
        assert status == 200 and body == DATA
        assert "Accept-Ranges" not in headers and "Content-Range" not in headers


def test_rate_limit_paces_body(root: Path) -> None:
    with Origin(root, rate_limit=1_000_000) as o:
        t0 = time.monotonic()
        status, _, body = fetch(o.url_for("model.bin"), {"Range": "bytes=0-299999"})
        elapsed = time.monotonic() - t0
    assert status == 206 and len(body) == 300_000
    assert 0.25 <= elapsed < 2.0


# ---------------------------------------------------------------------------- faults


def test_status_fault_first_n_then_recovers(origin: Origin) -> None:
    origin.add_fault(FaultRule("status", path="*.bin", first=2, status=503, headers={"Retry-After": "1"}))
    url = origin.url_for("model.bin")
    first = fetch(url)
    assert (first[0], first[1]["Retry-After"]) == (503, "1")
    assert fetch(url, method="HEAD")[0] == 503  # status faults hit HEAD too
    assert fetch(url)[0] == 200
    assert fetch(origin.url_for("sub/small.txt"))[0] == 200  # glob did not match
    assert [r.status for r in origin.requests if r.path == "/model.bin"] == [503, 503, 200]
    assert origin.requests[0].fault == "status"
    assert origin.stats()["faults_fired"] == [2]


def test_status_fault_every_skip_and_probability(origin: Origin) -> None:
    url = origin.url_for("sub/small.txt")
    origin.add_fault(FaultRule("status", every=3, status=500))
    assert [fetch(url)[0] for _ in range(6)] == [200, 200, 500, 200, 200, 500]

    origin.set_faults([FaultRule("status", skip=1, first=1, status=429)])
    assert [fetch(url)[0] for _ in range(3)] == [200, 429, 200]

    def run() -> list[int]:
        origin.set_faults([FaultRule("status", probability=0.5, seed=7)])
        return [fetch(url)[0] for _ in range(12)]

    outcome = run()
    assert set(outcome) == {200, 503}
    assert run() == outcome  # seeded: reproducible
    origin.clear_faults()
    assert fetch(url)[0] == 200


def test_reset_fault_aborts_connection_after_bytes(origin: Origin) -> None:
    origin.add_fault(FaultRule("reset", first=1, after_bytes=200_000))
    got, exc = asyncio.run(read_until_error(origin.url_for("model.bin")))
    assert isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientOSError), exc
    assert got == DATA[:200_000]
    assert origin.bytes_sent_for("model.bin") == 200_000
    assert origin.requests[-1] == RequestLog("GET", "/model.bin", None, 200, "reset")
    # Rule exhausted: the retry gets everything.
    assert asyncio.run(read_until_error(origin.url_for("model.bin"))) == (DATA, None)


def test_reset_fault_is_a_tcp_reset(origin: Origin) -> None:
    origin.add_fault(FaultRule("reset", after_bytes=0))
    with raw_get(origin.port, "/model.bin") as resp:
        assert resp.status == 200
        with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
            resp.read()


def test_truncate_fault_gives_short_body(origin: Origin) -> None:
    origin.add_fault(FaultRule("truncate", first=2, after_bytes=1000))
    got, exc = asyncio.run(read_until_error(origin.url_for("model.bin")))
    assert isinstance(exc, aiohttp.ClientPayloadError), exc
    assert got == DATA[:1000]

    with raw_get(origin.port, "/model.bin", {"Range": "bytes=10-"}) as resp:
        assert resp.status == 206 and resp.getheader("Content-Length") == str(SIZE - 10)
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    assert info.value.partial == DATA[10:1010]
    assert origin.bytes_sent == 2000


def test_stall_fault_trips_client_read_timeout(origin: Origin) -> None:
    origin.add_fault(FaultRule("stall", after_bytes=70_000, seconds=30))
    t0 = time.monotonic()
    got, exc = asyncio.run(
        read_until_error(origin.url_for("model.bin"), aiohttp.ClientTimeout(total=10, sock_read=0.3))
    )
    assert isinstance(exc, TimeoutError), exc
    assert got == DATA[:70_000]
    assert time.monotonic() - t0 < 3
    t1 = time.monotonic()
    origin.stop()  # must not wait out the 30 s stall
    assert time.monotonic() - t1 < 3


def test_stall_then_resumes_for_patient_client(origin: Origin) -> None:
    origin.add_fault(FaultRule("stall", after_bytes=1000, seconds=0.3))
    t0 = time.monotonic()
    assert fetch(origin.url_for("model.bin"))[2] == DATA
    assert time.monotonic() - t0 >= 0.3


def test_delay_fault_applies_to_get_and_head(origin: Origin) -> None:
    origin.add_fault(FaultRule("delay", seconds=0.25, first=2))
    for method in ("HEAD", "GET"):
        t0 = time.monotonic()
        assert fetch(origin.url_for("sub/small.txt"), method=method)[0] == 200
        assert time.monotonic() - t0 >= 0.25
    t0 = time.monotonic()
    fetch(origin.url_for("sub/small.txt"))
    assert time.monotonic() - t0 < 0.25


def test_body_faults_skip_head_requests(origin: Origin) -> None:
    origin.add_fault(FaultRule("reset", first=1))
    assert fetch(origin.url_for("model.bin"), method="HEAD")[0] == 200  # not counted
    got, exc = asyncio.run(read_until_error(origin.url_for("model.bin")))
    assert exc is not None and got == b""
    with pytest.raises(ValueError):
        FaultRule("truncate", methods=("GET", "HEAD"))


def test_fault_rule_json_roundtrip() -> None:
    rule = FaultRule(
        "status", path="/a/*", methods=("GET",), every=2, status=429, headers={"Retry-After": "0"}
    )
    assert FaultRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    with pytest.raises(ValueError):
        FaultRule.from_dict({"kind": "status", "bogus": 1})
    with pytest.raises(ValueError):
        FaultRule.from_dict({"kind": "explode"})


# ---------------------------------------------------------------------------- lifecycle


def test_stop_then_start_on_same_port(origin: Origin) -> None:
    port = origin.port
    assert fetch(origin.url_for("sub/small.txt"))[0] == 200
    origin.stop()
    assert not origin.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    origin.start()
    assert origin.port == port
    assert fetch(origin.url_for("sub/small.txt"))[0] == 200
    assert origin.request_count("GET", "/sub/small.txt") == 2  # stats survive a restart


def test_stop_resets_inflight_download(root: Path) -> None:
    with Origin(root, rate_limit=200_000) as o:

        async def main() -> tuple[bytes, BaseException | None]:
            task = asyncio.create_task(read_until_error(o.url_for("model.bin")))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(o.stop)
            return await task

        got, exc = asyncio.run(main())
        assert exc is not None and 0 < len(got) < SIZE


def test_subprocess_mode(root: Path) -> None:
    faults = [FaultRule("status", first=1, status=503)]
    with OriginProcess(root, digest=True, faults=faults) as proc:
        url = f"{proc.url}/model.bin"
        assert fetch(url)[0] == 503
        status, headers, body = fetch(url, {"Range": "bytes=0-9"})
        assert (status, body) == (206, DATA[:10]) and headers["Repr-Digest"].startswith("sha-256=:")

        stats = proc.stats()
        assert stats["bytes_sent"] == 10
        assert stats["bytes_by_path"] == {"/model.bin": 10}
        assert stats["request_counts"] == {"GET /model.bin": 2}
        assert [(r["status"], r["range"], r["fault"]) for r in stats["requests"]] == [
            (503, None, "status"),
            (206, "bytes=0-9", None),
        ]

        proc.set_faults([FaultRule("truncate", after_bytes=5)])
        with raw_get(proc.port, "/model.bin") as resp, pytest.raises(http.client.IncompleteRead):
            resp.read()
        proc.set_faults([])
        proc.reset_stats()
        assert fetch(url)[2] == DATA
        assert proc.stats()["bytes_sent"] == SIZE
        bad = fetch(f"{proc.url}/_faults", {"Content-Type": "application/json"}, method="POST")
        assert bad[0] == 400
        assert proc.stop() == 0  # SIGTERM -> clean exit

        port = proc.port
        proc.start()  # back up on the same port: a fresh process, so the CLI faults are re-armed
        assert proc.port == port
        assert [fetch(url)[0] for _ in range(2)] == [503, 200]
        proc.kill()  # SIGKILL: origin vanishes
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
