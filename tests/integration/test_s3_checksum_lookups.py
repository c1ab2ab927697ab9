"""The s3 source's checksum HEADs (stdlib threads, best effort) against an endpoint that drips.

A read timeout restarts with every byte, so a server sending its headers one byte at a time would
hold each lookup, and the pull, for as long as it likes. The lookups share one deadline; what is
unanswered then is given up (the bytes are still hashed), and no worker thread outlives it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from modelcache.sources import open_source
from modelcache.sources import s3 as s3mod
from modelcache.sources.base import RemoteFile, SourceOptions
from modelcache.uri import parse_uri


@pytest.fixture
def dripping_endpoint() -> Iterator[str]:
    """Accepts anything and answers one header byte every 50 ms, for at most 30 s per connection."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 10_000
            deadline = time.monotonic() + 30
            for i in range(len(head)):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    conn.sendall(head[i : i + 1])
                except OSError:
                    return
                time.sleep(0.05)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()


def test_dripping_checksum_heads_are_given_up_at_the_deadline(
    dripping_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3mod, "CHECKSUM_DEADLINE", 1.0)
    env = {
        "AWS_ENDPOINT_URL": dripping_endpoint,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    src = open_source(parse_uri("s3://models/m/"), SourceOptions(env=env, read_timeout=30))
    assert isinstance(src, s3mod.S3Source)
    src.store()  # addresses the endpoint (no request is made)
    files = [RemoteFile(f"w{i}.bin", 10, etag='"e"', locator=f"m/w{i}.bin") for i in range(3)]

    t0 = time.monotonic()
    got = asyncio.run(src._with_checksums(files))
    took = time.monotonic() - t0

    assert got == files  # nothing learnt, nothing invented
    assert took < 5, took  # the deadline, not the 30 s read timeout that every dripped byte restarts
    deadline = time.monotonic() + 3
    while any(t.name.startswith("s3-head") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("s3-head")]
