"""Error paths keep their promises: hostile trees, races, shared files, full disks, bad arguments.

Real processes (`run_cli`) on real files; full disks are small tmpfs mounts (root only).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, popen_cli, run_cli, write_random
from tests.integration.test_pull import tree_digest
from tests.support.origin import Origin

MiB = 1 << 20
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"
)


def _pull(home: Path, src: Path) -> str:
    proc = run_cli(home, "-q", "pull", str(src), "--json")
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["key"])


def _model(tmp_path: Path, name: str, size: int = 64 * 1024, files: int = 2) -> Path:
    src = tmp_path / name
    for i in range(files):
        write_random(src / ("sub" if i % 2 else "") / f"f{i}.bin", size, seed=i + len(name))
    return src


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, str], Path]]:
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        assert r.returncode == 0, r.stderr
        mounted.append(path)
        return path

    yield mount
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], check=False)


def _fill(path: Path) -> None:
    """Fill the filesystem holding `path` to the last byte."""
    for name, block in (("filler", 65536), ("filler2", 1)):  # then the tail smaller than a block
        fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * block)
        except OSError:
            pass
        finally:
            os.close(fd)
    with pytest.raises(OSError):
        (path / "probe").write_bytes(b"x")


# -- 1. our own tree never follows a symlink; manifests from disk are validated -----------------
def test_symlinked_model_dir_is_refused_and_removable(home: Path, tmp_path: Path) -> None:
    src = _model(tmp_path, "m")
    key = _pull(home, src)
    model = home / "models" / key
    elsewhere = tmp_path / "elsewhere"
    model.rename(elsewhere)
    model.symlink_to(elsewhere)
    for args in (("path", key), ("path", str(src)), ("pull", str(src)), ("show", key), ("rm", key)):
        assert "symlink" in assert_one_line_error(run_cli(home, *args), 4), args
    verify = run_cli(home, "verify")
    assert verify.returncode == 4 and "symlink" in verify.stdout
    proc = run_cli(home, "rm", "--force", key)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.lexists(model) and tree_digest(elsewhere) == tree_digest(src)  # target untouched
    again = run_cli(home, "pull", str(src), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["hit"] is False


def test_symlinked_staging_is_removed_not_followed(home: Path, tmp_path: Path) -> None:
    src = _model(tmp_path, "m")
    from modelcache.uri import parse_uri

    key = parse_uri(str(src)).key
    trap = tmp_path / "trap"
    trap.mkdir()
    (home / ".modelcache" / "staging").mkdir(parents=True)
    (home / ".modelcache" / "staging" / key).symlink_to(trap)
    proc = run_cli(home, "pull", str(src))
    assert proc.returncode == 0, proc.stderr
    assert "symlink" in proc.stderr
    assert list(trap.iterdir()) == []
    assert tree_digest(home / "models" / key) == tree_digest(src)


def test_tampered_manifest_never_touches_paths_outside(home: Path, tmp_path: Path) -> None:
    src = _model(tmp_path, "m")
    key = _pull(home, src)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    mpath = home / ".modelcache" / "manifests" / f"{key}.json"
    m = json.loads(mpath.read_text())
    m["files"].append({"path": "../../../victim.bin", "size": 8, "sha256": "0" * 64})
    mpath.write_text(json.dumps(m))
    verify = run_cli(home, "verify", "--full")
    assert verify.returncode == 4 and "'..' would leave" in verify.stdout
    assert "damaged" in assert_one_line_error(run_cli(home, "show", key), 4)
    init = run_cli(tmp_path / "u", "initialize", str(src), str(tmp_path / "dest"), "--cache-dir", str(home))
    assert init.returncode == 0, init.stderr  # a damaged manifest is discarded and the model pulled again
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    mpath.write_text("{not json")
    assert run_cli(home, "verify").returncode == 4
    assert run_cli(home, "rm", key).returncode == 0
    assert victim.read_bytes() == b"precious"


# -- 2. initialize takes the lease before it looks the model up --------------------------------
def test_initialize_leases_before_lookup_and_rm_cannot_empty_dest(tmp_path: Path, origin_root: Path) -> None:
    cache = tmp_path / "cache"
    data = write_random(origin_root / "m.bin", 6 * MiB)
    with Origin(origin_root, rate_limit=3 * MiB) as origin:
        url = origin.url_for("/m.bin")
        from modelcache.uri import storage_key

        leases = cache / ".modelcache" / "leases" / storage_key(url)
        proc = popen_cli(tmp_path / "u", "initialize", url, str(tmp_path / "d0"), "--cache-dir", str(cache))
        deadline = time.monotonic() + 30
        while not list((cache / ".modelcache" / "staging").glob("*/*")):  # the download is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert list(leases.glob("*.lease"))  # already leased: nobody may remove it after the hit
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert (tmp_path / "d0" / "m.bin").read_bytes() == data
    # Many files (a long link phase) and `rm --force` hammering it: exit 0 always means a full DEST.
    src = _model(tmp_path, "many", size=1024, files=300)
    want = tree_digest(src)
    for i in range(3):
        _pull(cache, src)
        init = popen_cli(
            tmp_path / "u", "initialize", str(src), str(tmp_path / f"r{i}"), "--cache-dir", str(cache)
        )
        while init.poll() is None:
            run_cli(cache, "rm", "--force", str(src))
        assert init.returncode == 0, init.communicate()
        assert tree_digest(tmp_path / f"r{i}") == want


# -- 3. pods cannot change the cache through their hard links ----------------------------------
def test_pod_writing_through_its_hard_link_never_reaches_the_next_pod(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = _model(tmp_path, "m")
    want = tree_digest(src)
    d0, d1 = tmp_path / "pod0", tmp_path / "pod1"
    first = run_cli(tmp_path / "u", "initialize", str(src), str(d0), "--cache-dir", str(cache))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["method"] == "hardlink"
    f0 = d0 / "f0.bin"
    assert f0.stat().st_nlink > 1 and f0.stat().st_mode & 0o222 == 0  # shared inode, read-only
    if os.geteuid() == 0:  # a non-root pod cannot write through its link at all
        r = subprocess.run(["sh", "-c", f"echo x >> '{f0}'"], user=65534, capture_output=True)
        assert r.returncode != 0 and tree_digest(d0) == want
    with open(f0, "ab") as f:  # root can: the cached copy changes with it
        f.write(b"tampered")
    second = run_cli(tmp_path / "u", "initialize", str(src), str(d1), "--cache-dir", str(cache))
    assert second.returncode == 0, second.stderr
    assert "changed after it was published" in second.stderr
    assert json.loads(second.stdout.splitlines()[-1])["hit"] is False  # discarded, downloaded again
    assert tree_digest(d1) == want
    assert run_cli(cache, "verify", "--full").returncode == 0
    # Same size, new mtime (an in-place write): noticed too.
    f1 = d1 / "sub" / "f1.bin"
    with open(f1, "r+b") as f:
        f.write(b"Z")
    third = run_cli(tmp_path / "u", "initialize", str(src), str(tmp_path / "pod2"), "--cache-dir", str(cache))
    assert third.returncode == 0 and "changed after it was published" in third.stderr
    assert tree_digest(tmp_path / "pod2") == want


# -- 4. leases and locks whose owner is gone ---------------------------------------------------
def test_reused_pid_lease_and_garbage_lock_go_stale(home: Path, tmp_path: Path) -> None:
    src = _model(tmp_path, "m")
    key = _pull(home, src)
    lease = home / ".modelcache" / "leases" / key / "x.lease"
    lease.parent.mkdir(parents=True)
    # Our own PID is alive, on this host: only the stopped heartbeat says the owner is gone.
    lease.write_text(json.dumps({"token": "t", "host": os.uname().nodename, "pid": os.getpid()}))
    old = time.time() - 120
    os.utime(lease, (old, old))
    assert json.loads(run_cli(home, "list", "--json").stdout)[0]["in_use"] is False
    assert run_cli(home, "rm", key).returncode == 0
    lock = home / ".modelcache" / "locks" / f"{key}.lock"
    lock.write_bytes(b"\x00garbage{")
    os.utime(lock, (old, old))
    t0 = time.monotonic()
    proc = run_cli(home, "pull", str(src), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 10
    assert "unreadable content" in proc.stderr and "treating it as stale" in proc.stderr


# -- 5. a full disk: reads work, writes are exit 5, the index is kept ---------------------------
@needs_root
def test_full_disk_reads_work_writes_exit_5_index_kept(
    tmp_path: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    home = tmpfs(tmp_path / "small", "8m")
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    ka, kb = _pull(home, a), _pull(home, b)
    run_cli(home, "path", str(a))  # a is now the most recently used
    before = {m["key"]: m["last_used_at"] for m in json.loads(run_cli(home, "list", "--json").stdout)}
    _fill(home)
    for args in (("path", str(a)), ("path", kb), ("list", "--json"), ("list",), ("verify",), ("show", ka)):
        proc = run_cli(home, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert "no space" in assert_one_line_error(run_cli(home, "pin", ka), 5)
    assert not list(home.glob(".modelcache/*.corrupt"))
    after = {m["key"]: m["last_used_at"] for m in json.loads(run_cli(home, "list", "--json").stdout)}
    assert after == before  # LRU times survive (nothing rebuilt); `path` did not fail either
    assert run_cli(home, "rm", kb).returncode == 0  # removing is what frees a full disk
    for p in home.glob("filler*"):
        p.unlink()
    assert run_cli(home, "pin", ka).returncode == 0
    assert [m["key"] for m in json.loads(run_cli(home, "list", "--json").stdout)] == [ka]


# -- 6. initialize onto a full filesystem ------------------------------------------------------
@needs_root
def test_initialize_onto_full_dest_is_exit_5_and_dest_clean(
    tmp_path: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    src = _model(tmp_path, "m", size=3 * MiB, files=2)
    dest = tmpfs(tmp_path / "dest", "4m")
    cache = tmp_path / "cache"
    proc = run_cli(tmp_path / "u", "initialize", str(src), str(dest / "models"), "--cache-dir", str(cache))
    assert "free" in assert_one_line_error(proc, 5)
    assert list(dest.iterdir()) == []
    proc = run_cli(tmp_path / "u", "initialize", str(src), str(dest))  # no cache: the engine downloads
    assert_one_line_error(proc, 5)
    assert list(dest.iterdir()) == []
    assert run_cli(cache, "verify").returncode == 0  # the cached copy is fine


# -- 7. a missing manifest is one model's problem ----------------------------------------------
def test_verify_reports_missing_manifest_and_goes_on(home: Path, tmp_path: Path) -> None:
    ka, kb = _pull(home, _model(tmp_path, "a")), _pull(home, _model(tmp_path, "b"))
    (home / ".modelcache" / "manifests" / f"{ka}.json").unlink()
    proc = run_cli(home, "verify")
    assert "manifest missing" in assert_one_line_error(proc, 4)
    lines = proc.stdout.splitlines()
    assert any(ln.split()[:2] == ["FAILED", ka] for ln in lines)
    assert any(ln.split()[:2] == ["ok", kb] for ln in lines)
    assert any("manifest missing" in ln for ln in lines)
    assert "manifest missing" in assert_one_line_error(run_cli(home, "show", ka), 4)


# -- 8. bad arguments are exit 2; --debug keeps the exit code; output is escaped -----------------
def test_bad_paths_and_names_are_usage_errors(tmp_path: Path) -> None:
    home = tmp_path / "c"
    long = "/" + "x" * 200 + "/y" * 2000
    assert_one_line_error(run_cli(home, "path", "/tmp/x", MODELCACHE_HOME="~no-such-user-mc"), 2)
    assert_one_line_error(run_cli(home, "list", MODELCACHE_HOME="~no-such-user-mc"), 2)
    cases: list[tuple[str, ...]] = [
        ("--home", "~no-such-user-mc/x", "list"),
        ("--home", long, "list"),
        ("--home", str(tmp_path / "a\rb"), "path", "/tmp/x"),
        ("pull", "http://127.0.0.1:9/a\rb.bin"),
        ("initialize", "http://127.0.0.1:9/m.bin", str(tmp_path / "d\re")),
        ("initialize", "http://127.0.0.1:9/m.bin", long),
        ("initialize", "http://127.0.0.1:9/m.bin", str(tmp_path / "d"), "--cache-dir", "~no-such-user-mc"),
    ]
    for args in cases:
        assert_one_line_error(run_cli(home, *args), 2)
    assert not (tmp_path / "d").exists()


def test_debug_adds_a_traceback_and_keeps_the_exit_code(home: Path, tmp_path: Path) -> None:
    for args, code in (
        (("show", "/no/such/model"), 3),
        (("--home", "~no-such-user-mc", "list"), 2),
        (("pull", "bad://x"), 2),
    ):
        plain = run_cli(home, *args)
        debug = run_cli(home, "--debug", *args)
        assert plain.returncode == debug.returncode == code, (args, debug.stderr)
        assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr


def test_control_characters_are_escaped_in_every_output(home: Path, tmp_path: Path) -> None:
    src = _model(tmp_path, "m")
    key = _pull(home, src)
    evil = "file:///x\x1b[2J\rFAKE\x07"
    db = sqlite3.connect(home / ".modelcache" / "index.db")
    db.execute("UPDATE models SET uri = ?", (evil,))
    db.commit()
    db.close()
    mpath = home / ".modelcache" / "manifests" / f"{key}.json"
    m = json.loads(mpath.read_text())
    m["uri"] = evil
    mpath.write_text(json.dumps(m))
    (home / "models" / key / "x\x1b]0;title\x07\r.bin").write_bytes(b"stray")
    outputs = [
        run_cli(home, *args)
        for args in (
            ("list",),
            ("list", "--json"),
            ("verify",),
            ("show", key),
            ("pin", key),
            ("rm", "--force", key),
        )
    ]
    assert [p.returncode for p in outputs] == [0, 0, 4, 0, 0, 0], [p.stderr for p in outputs]
    for p in outputs:
        assert not any(c in p.stdout + p.stderr for c in "\x1b\r\x07"), (p.stdout, p.stderr)
    assert "\\x1b" in outputs[2].stdout  # shown escaped, not dropped


# -- 9. secrets are not kept at rest; lookups go by the exact URI's key --------------------------
def test_lookup_by_key_with_only_the_redacted_uri_at_rest(
    home: Path, origin: Origin, origin_root: Path
) -> None:
    data = write_random(origin_root / "m.bin", MiB)
    url = origin.url_for("/m.bin").replace("http://", "http://user:hunter2pw@") + "?sig=sekr3tsig"
    pulled = run_cli(home, "pull", url, "--json")
    assert pulled.returncode == 0, pulled.stderr
    path = run_cli(home, "path", url)
    assert path.returncode == 0 and (Path(path.stdout.strip()) / "m.bin").read_bytes() == data
    other = url.replace("hunter2pw", "otherpass")
    assert run_cli(home, "path", other).returncode == 3  # another exact URI, another key
    for f in (home / ".modelcache").rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert b"hunter2pw" not in blob and b"sekr3tsig" not in blob, f
