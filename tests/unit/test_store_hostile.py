"""Hostile state on disk: manifests, lock files, a busy index. Real files, our own code unmocked."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcache.errors import ConflictError, UsageError
from modelcache.store import Store
from modelcache.store.core import check_root
from modelcache.store.index import IndexRow, classify
from modelcache.store.locks import HOST, FileLock, is_held, parse_lock, process_start
from modelcache.store.manifest import FileEntry, Manifest, ManifestError
from modelcache.uri import storage_key

GOOD_SHA = "0" * 64


def _manifest(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "key": "0123456789abcdef",
        "uri": "file:///m",
        "created_at": 1.0,
        "files": [{"path": "a.bin", "size": 1, "sha256": GOOD_SHA}],
    }
    d.update(over)
    return d


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "x",
        _manifest(key="../../etc"),
        _manifest(key=None),
        _manifest(uri=5),
        _manifest(created_at=float("nan")),
        _manifest(created_at="now"),
        _manifest(files={"a": 1}),
        _manifest(files=["a.bin"]),
        _manifest(files=[{"path": "../../outside", "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "/etc/shadow", "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a/./b", "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a\x00b", "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a\rb", "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "x" * 300, "size": 1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a.bin", "size": -1, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a.bin", "size": True, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a.bin", "size": 1.5, "sha256": GOOD_SHA}]),
        _manifest(files=[{"path": "a.bin", "size": 1, "sha256": "zz"}]),
        _manifest(files=[{"path": "a.bin", "size": 1, "sha256": GOOD_SHA, "mtime_ns": "x"}]),
        _manifest(files=[{"path": "a", "size": 1, "sha256": GOOD_SHA}] * 2),
        _manifest(
            files=[
                {"path": "a", "size": 1, "sha256": GOOD_SHA},
                {"path": "a/b", "size": 1, "sha256": GOOD_SHA},
            ]
        ),
        _manifest(pinned="yes"),
        _manifest(source=[1]),
        _manifest(revision=7),
    ],
)
def test_invalid_manifests_are_integrity_errors(bad: object) -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(bad)
    assert err.value.exit_code == 4 and isinstance(err.value, ValueError)


def test_valid_manifest_round_trips() -> None:
    m = Manifest.from_dict(
        _manifest(files=[{"path": "d/a.bin", "size": 0, "sha256": GOOD_SHA, "mtime_ns": 5}])
    )
    assert m.files == [FileEntry("d/a.bin", 0, GOOD_SHA, 5)]
    assert Manifest.from_dict(m.to_dict()) == m


# -- locks -------------------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize(
    "content", [b"", b"garbage\xff", b"[1, 2]", b'{"token": 5}', b'{"pid": "x", "host": 1}', b"{" * 5000]
)
def test_garbage_lock_is_stale_with_a_log_line(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.lock"
    path.write_bytes(content)
    assert not parse_lock(content, 0).valid
    assert is_held(path)  # young garbage may be a lock being written: held, for now
    _age(path, 60)
    assert not is_held(path)
    lock = FileLock(path)
    with caplog.at_level(logging.WARNING, logger="modelcache"):
        t0 = time.monotonic()
        assert lock.acquire(timeout=5, poll=0.05)
    assert time.monotonic() - t0 < 2
    lock.release()
    assert "unreadable content" in caplog.text and "treating it as stale" in caplog.text


def test_young_garbage_goes_stale_after_stale_after(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    path.write_bytes(b"\x00\x01 not json")
    lock = FileLock(path, stale_after=0.5)
    assert not lock.try_acquire()
    assert lock.acquire(timeout=5, poll=0.05)  # nobody rewrites it: stale after 0.5 s, not never
    lock.release()


def test_reused_pid_on_this_host_is_not_a_live_owner(tmp_path: Path) -> None:
    """The PID in the file is alive (it is ours) but belongs to another process or a dead heartbeat."""
    start = process_start(os.getpid())
    assert start is not None
    other_start = {"token": "t1", "host": HOST, "pid": os.getpid(), "start": start + 12345}
    old_beat = {"token": "t2", "host": HOST, "pid": os.getpid()}  # no start recorded: heartbeat decides
    for record, age in ((other_start, 0.0), (old_beat, 60.0)):
        path = tmp_path / f"{record['token']}.lock"
        path.write_text(json.dumps(record))
        _age(path, age)
        assert not is_held(path)
        lock = FileLock(path)
        assert lock.try_acquire()  # at once, not after stale_after of watching
        lock.release()
    fresh = tmp_path / "fresh.lock"
    fresh.write_text(json.dumps({"token": "t3", "host": HOST, "pid": os.getpid(), "start": start}))
    assert is_held(fresh)
    assert not FileLock(fresh).try_acquire()


def test_symlinked_or_fifo_lock_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text(json.dumps({"token": "v", "host": HOST, "pid": os.getpid()}))
    link = tmp_path / "l.lock"
    link.symlink_to(victim)
    os.utime(link, (time.time() - 60, time.time() - 60), follow_symlinks=False)
    lock = FileLock(link)
    assert lock.acquire(timeout=3, poll=0.05)
    lock.release()
    assert victim.exists()  # the link was removed, never its target
    fifo = tmp_path / "f.lock"
    os.mkfifo(fifo)
    assert is_held(fifo)  # young and unreadable: held for now, but reading it did not block


# -- index -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (11, "database disk image is malformed", "corrupt"),
        (26, "file is not a database", "corrupt"),
        (13, "database or disk is full", "full"),
        (5, "database is locked", "busy"),
        (6, "database table is locked", "busy"),
        (10 | (12 << 8), "disk I/O error", "unavailable"),
        (None, "file is not a database", "corrupt"),
        (None, "database or disk is full", "full"),
        (None, "no such column: x", "other"),
    ],
)
def test_sqlite_errors_are_classified(code: int | None, message: str, kind: str) -> None:
    assert classify(code, message) == kind


def test_busy_index_is_exit_7_and_is_kept(tmp_path: Path) -> None:
    """A temporary error never discards the index: LRU times and pins live only there."""
    store = Store(tmp_path / "c")
    store.ensure()
    rows = [
        IndexRow(storage_key(f"file:///m{i}"), f"file:///m{i}", None, 1, 1, 1.0, 100.0 + i, False)
        for i in range(3)
    ]
    for r in rows:
        store.index.upsert(r)
        store.model_dir(r.key).mkdir(parents=True)
    store.index.close()
    blocker = sqlite3.connect(store.index.path, isolation_level=None)
    blocker.execute("PRAGMA locking_mode=EXCLUSIVE")
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("UPDATE models SET pinned = pinned")
    try:
        busy = Store(tmp_path / "c")
        busy.index.timeout = 0.2
        with pytest.raises(ConflictError):
            busy.repair()
        with pytest.raises(ConflictError):
            busy.lookup(rows[0].key)
        busy.touch(rows[0].key)  # best-effort: `path` still answers
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert not list((tmp_path / "c" / ".modelcache").glob("*.corrupt"))
    after = Store(tmp_path / "c").index.all()
    assert sorted((r.key, r.last_used_at) for r in after) == sorted((r.key, r.last_used_at) for r in rows)


def test_lookup_is_by_key_and_never_compares_the_stored_uri(tmp_path: Path) -> None:
    """Manifests and the index hold the redacted URI; the key is the exact URI's."""
    exact = "https://user:s3cret@host.example/m.bin?sig=abc"
    store = Store(tmp_path / "c")
    files = tmp_path / "files"
    files.mkdir()
    (files / "m.bin").write_bytes(b"x")
    m = Manifest(storage_key(exact), exact, time.time(), [FileEntry("m.bin", 1, GOOD_SHA)])
    rec = store.publish(files, m)
    assert store.lookup(exact) == rec
    assert store.lookup("https://user:other@host.example/m.bin?sig=abc") is None
    at_rest = store.manifest_path(rec.key).read_text() + repr(store.index.all())
    assert "s3cret" not in at_rest and "sig=abc" not in at_rest
    published = store.model_dir(rec.key) / "m.bin"
    assert published.stat().st_mode & 0o222 == 0  # read-only
    assert store.manifest(rec.key).files[0].mtime_ns == published.stat().st_mtime_ns
    assert store.changed_files(rec.key) == []


@pytest.mark.parametrize(
    "text", ["/tmp/a\x00b", "/tmp/a\rb", "/tmp/a\nb", "/" + "x" * 4000, "/tmp/" + "y" * 256]
)
def test_unusable_roots_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        check_root(Path(text))


def test_unknown_user_home_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown user"):
        Store("~no-such-user-modelcache-test/cache")


# -- fuzzing: manifests on disk ----------------------------------------------------------------
HOSTILE_PATHS = [
    "ok.bin",
    "sub/ok.bin",
    "../../../outside/victim.bin",
    "../victim.bin",
    "/etc/passwd",
    "a/../../b",
    "",
    ".",
    "a//b",
    "a\x00b",
    "a\\..\\b",
    "\x1b[31mred",
    "x" * 300,
    "sub",
]
entries = st.fixed_dictionaries(
    {
        "path": st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=20)),
        "size": st.one_of(
            st.integers(-5, 1 << 70), st.floats(allow_nan=True), st.text(max_size=3), st.booleans()
        ),
        "sha256": st.one_of(st.just(GOOD_SHA), st.text(max_size=70)),
    },
    optional={"mtime_ns": st.one_of(st.integers(-1, 1 << 64), st.none(), st.text(max_size=3))},
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10,
)


def _documents(key: str) -> st.SearchStrategy[bytes]:
    structured = st.fixed_dictionaries(
        {
            "key": st.one_of(st.just(key), st.text(max_size=20), json_values),
            "uri": st.one_of(st.just("file:///m\x1b[2J\r"), json_values),
            "created_at": st.one_of(st.floats(), st.integers(), json_values),
            "files": st.one_of(st.lists(entries, max_size=4), json_values),
        },
        optional={"pinned": json_values, "source": json_values, "revision": json_values},
    )
    return st.one_of(
        structured.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.just(b"[" * 100_000),
    )


def _cli(*args: str) -> tuple[int, str, str]:
    """The real entry point, in-process (a process per example would not fit the time budget)."""
    from modelcache.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["modelcache", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                return int(exc.code or 0), out.getvalue(), err.getvalue()
    finally:
        sys.argv = argv
    return 0, out.getvalue(), err.getvalue()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("fuzz")
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok.bin").write_bytes(b"ok")
    (src / "sub" / "ok.bin").write_bytes(b"ok")
    code, out, err = _cli("--home", str(base / "tpl" / "cache"), "-q", "pull", str(src))
    assert code == 0, err
    return base, Path(out.strip().splitlines()[-1]).name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_never_crash_or_escape(template: tuple[Path, str], data: st.DataObject) -> None:
    base, key = template
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base / "tpl", work, symlinks=True)
    outside = work / "outside"
    outside.mkdir()
    (outside / "victim.bin").write_bytes(b"precious")
    home = work / "cache"
    (home / ".modelcache" / "manifests" / f"{key}.json").write_bytes(data.draw(_documents(key)))
    before = _snapshot(outside)
    for args in (
        ["verify"],
        ["verify", "--full"],
        ["show", key],
        ["list"],
        ["path", key],
        ["rm", "--force", key],
    ):
        code, out, err = _cli("--home", str(home), *args)
        assert code in (0, 3, 4), (args, code, err)
        assert "Traceback" not in err and "internal error" not in err, err
        assert "\x1b" not in out + err and "\r" not in out + err
    assert _snapshot(outside) == before
    assert sorted(p.name for p in work.iterdir()) == ["cache", "outside"]
