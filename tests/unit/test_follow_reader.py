"""FollowReader: a thread reads a staging file in order while the download is still writing it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from modelcache.errors import TransientSourceError
from modelcache.transfer import FollowReader


def _reader(tmp_path: Path, data: bytes) -> FollowReader:
    path = tmp_path / "f"
    path.write_bytes(data)
    return FollowReader(path, len(data))


def test_reads_wait_for_the_written_prefix_and_are_full(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    r = _reader(tmp_path, data)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(r.read(10_000)))
    t.start()
    r.advance(5_000)
    time.sleep(0.1)
    assert t.is_alive()  # half of what it asked for is there: a short read would look like EOF to tarfile
    r.advance(len(data))
    t.join(5)
    assert got == [data[:10_000]]
    assert r.read(10_000) == data[10_000:]  # the end: as much as there is
    assert r.read(1) == b""
    r.close()


def test_seek_and_tell_within_the_file(tmp_path: Path) -> None:
    data = b"0123456789"
    r = _reader(tmp_path, data)
    r.advance(len(data))
    assert r.seek(-3, 2) == 7 and r.read() == b"789"
    assert r.seek(2) == 2 and r.read(3) == b"234" and r.tell() == 5
    r.close()


def test_abort_wakes_a_waiting_reader_with_the_error(tmp_path: Path) -> None:
    r = _reader(tmp_path, bytes(1000))
    errors: list[BaseException] = []

    def read() -> None:
        try:
            r.read(500)
        except TransientSourceError as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.05)
    r.abort(TransientSourceError("stopped"))
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    with pytest.raises(TransientSourceError):
        r.read(1)
    r.close()
