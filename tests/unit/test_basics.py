"""Pure pieces: quantities, URIs and keys, chunk planning, eviction plans."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from modelcache.errors import UsageError
from modelcache.quantity import format_bytes, parse_quantity
from modelcache.store.evict import Candidate, plan_eviction
from modelcache.transfer import (
    RequestTimes,
    backoff,
    next_chunk_size,
    request_floor,
    split_point,
    unknown_size_room,
)
from modelcache.uri import parse_uri, redact, storage_key, sub_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500Mi", 500 * 2**20),
        ("10Gi", 10 * 2**30),
        ("1.7T", 1_700_000_000_000),
        ("123", 123),
        ("1k", 1000),
        ("0.5Ki", 512),
        ("1e3", 1000),
        ("1.5", 2),
    ],
)
def test_quantities(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "10GB", "-1Gi", "1.2.3", "Gi", "1e3Gi"])
def test_bad_quantities(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_quantity(bad)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_storage_key_is_kserve_compatible() -> None:
    uri = "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert storage_key(uri) == hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert storage_key(uri + "/") != storage_key(uri)  # exact string, as KServe
    assert parse_uri(uri).key == storage_key(uri)


def test_local_paths_become_file_uris(tmp_path: object) -> None:
    m = parse_uri("/tmp/some model")
    assert m.uri == "file:///tmp/some model" and m.scheme == "file"


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("foo://x/y", "unknown URI scheme"),
        ("http://", "no host"),
        ("https://host", "no path"),
        ("file://host/x", "take no host"),
        ("http://h:99999/x", "malformed"),
        ("", "empty"),
        ("s3:/bucket", "malformed"),
        ("http://h/a\nb", "control characters"),
    ],
)
def test_bad_uris(bad: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_uri(bad)


def test_sub_path_matching() -> None:
    assert sub_path("s3://b/m", "s3://b/m/") == ""
    assert sub_path("s3://b/m/v1/", "s3://b/m") == "/v1"
    assert sub_path("s3://b/model2", "s3://b/m") is None


def test_redact() -> None:
    assert redact("https://user:pw@h/x") == "https://***@h/x"
    assert "secret" not in redact("https://h/x?X-Amz-Signature=secret&a=1")


def test_chunk_sizes_shrink_towards_the_end() -> None:
    mib = 2**20
    assert next_chunk_size(100 * 2**30, 16) == 64 * mib  # capped while much is left
    assert next_chunk_size(320 * mib, 16) == 10 * mib  # 1/(2 x connections) of what is left
    assert next_chunk_size(10 * mib, 16) == 1 * mib  # never below the floor...
    assert next_chunk_size(1000, 16) == 1000  # ...unless less than that is left


def test_unknown_size_room_keeps_a_reserve_and_the_known_files_room() -> None:
    GiB, MiB = 1 << 30, 1 << 20
    # default reserve: 5% of the filesystem, at most 1 GiB
    assert unknown_size_room(50 * GiB, 500 * GiB, 0, None) == (49 * GiB, GiB)
    assert unknown_size_room(10 * MiB, 100 * MiB, 0, None) == (5 * MiB, 5 * MiB)
    # the known files' remaining bytes are set aside first; never negative
    assert unknown_size_room(50 * GiB, 500 * GiB, 9 * GiB, None) == (40 * GiB, GiB)
    assert unknown_size_room(GiB, 500 * GiB, 9 * GiB, None) == (0, GiB)
    # an explicit reserve (the agent's --reserve, MODELCACHE_RESERVE) wins, 0 included
    assert unknown_size_room(50 * GiB, 500 * GiB, 0, 0) == (50 * GiB, 0)
    assert unknown_size_room(50 * GiB, 500 * GiB, 0, 10 * GiB) == (40 * GiB, 10 * GiB)


def test_request_floor_follows_latency_times_rate() -> None:
    mib = 2**20
    assert request_floor([]) == 1 * mib  # nothing measured yet: the smallest
    loopback = [(0.001, 20 * mib)] * 5  # nginx next door: 1 ms, 20 MiB/s
    assert request_floor(loopback) == 1 * mib
    s3 = [(0.03, 40 * mib)] * 5  # 30 ms to the first byte at 40 MiB/s: 19 MiB -> capped
    assert request_floor(s3) == 16 * mib
    busy = [(0.012, 40 * mib)] * 5 + [(2.0, 40 * mib)]  # one outlier does not move the median
    assert request_floor(busy) == 7 * mib


def test_request_times_separate_latency_from_transfer() -> None:
    mib = 2**20
    times = RequestTimes()
    # asked at 0, first 1 MiB block at 0.125 s, 9 MiB more by 0.125 + 9/40 s: 40 MiB/s, 100 ms latency
    times.add(0.0, 0.125, mib, 0.125 + 9 / 40, 10 * mib)
    ((latency, rate),) = times.samples
    assert abs(rate - 40 * mib) < 1 and abs(latency - 0.1) < 1e-9
    times.add(0.0, 0.01, mib, 0.02, mib + 100)  # too short to tell: ignored
    times.add(0.0, 0.0, 0, 0.5, 0)  # nothing arrived: ignored
    assert len(times.samples) == 1


def test_guided_chunks_tile_a_file_exactly() -> None:
    """Simulate allocation as the runner does: chunks must tile [0, size) with no gap or overlap."""
    size, pos, pieces = 2 * 2**30 + 12345, 0, []
    while pos < size:
        n = next_chunk_size(size - pos, 16)
        pieces.append((pos, min(size, pos + n)))
        pos = pieces[-1][1]
    assert pieces[0][0] == 0 and pieces[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert pieces[0][1] - pieces[0][0] > pieces[-1][1] - pieces[-1][0]
    assert len(pieces) < 300


def test_split_point() -> None:
    mib = 2**20
    cut = split_point(0, 0, 64 * mib)
    assert cut is not None and 0 < cut < 64 * mib
    assert split_point(0, 60 * mib, 64 * mib) is None  # too little left to be worth a request


def test_backoff_is_bounded_and_grows() -> None:
    assert all(0 <= backoff(1, 0.5) <= 0.5 for _ in range(50))
    assert max(backoff(10, 0.5, cap=3) for _ in range(200)) <= 3


def test_eviction_plan_lru_and_protection() -> None:
    models = [
        Candidate("old", 40, last_used_at=1),
        Candidate("pinned", 40, last_used_at=0, pinned=True),
        Candidate("busy", 40, last_used_at=0.5, in_use=True),
        Candidate("mid", 40, last_used_at=2),
        Candidate("new", 40, last_used_at=3),
    ]
    plan = plan_eviction(models, 130)
    assert plan.evict == ["old", "mid"]
    assert plan.satisfied and plan.total_after == 120
    assert plan_eviction(models, 1000).evict == []
    impossible = plan_eviction(models, 50)
    assert set(impossible.evict) == {"old", "mid", "new"} and not impossible.satisfied
