"""The engine end to end through the CLI, against a real Range-capable origin on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, popen_cli, run_cli, write_random
from tests.support.origin import FaultRule, Origin

MiB = 1 << 20


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_http_single_file_parallel_chunks(home: Path, origin: Origin, origin_root: Path) -> None:
    data = write_random(origin_root / "model.safetensors", 40 * MiB + 12345)
    url = origin.url_for("/model.safetensors")
    proc = run_cli(home, "pull", url, MODELCACHE_CHUNK_SIZE=str(4 * MiB))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == home / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    assert (path / "model.safetensors").read_bytes() == data
    ranged = [r for r in origin.requests if r.method == "GET" and r.range]
    assert len(ranged) >= 10  # really fetched in parallel chunks
    # each byte once, plus the 8 KiB overlap every later request re-reads to cross-check its neighbour
    overlaps = origin.overlap_bytes_for("/model.safetensors")
    assert 0 < overlaps <= 8192 * len(ranged)
    assert origin.bytes_sent_for("/model.safetensors") == len(data) + overlaps
    # warm: a hit, nothing fetched
    origin.reset_stats()
    again = run_cli(home, "pull", url, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["hit"] is True
    assert origin.bytes_sent == 0
    assert run_cli(home, "path", url).stdout.strip() == str(path)
    assert not list((home / ".modelcache" / "staging").iterdir())


def test_source_digest_is_checked(home: Path, origin_root: Path) -> None:
    write_random(origin_root / "w.bin", 3 * MiB)
    with Origin(origin_root, digest=True) as o:
        proc = run_cli(home, "pull", o.url_for("/w.bin"), "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    show = json.loads(run_cli(home, "show", rec["key"], "--json").stdout)
    assert show["files"][0]["sha256"] == hashlib.sha256((origin_root / "w.bin").read_bytes()).hexdigest()


def test_wrong_source_digest_is_an_integrity_error(home: Path, origin: Origin, origin_root: Path) -> None:
    write_random(origin_root / "w.bin", 1 * MiB)
    bogus = "sha-256=:" + "A" * 43 + "=:"
    origin.add_fault(
        FaultRule(
            "status",
            path="/w.bin",
            methods=("HEAD",),
            status=200,
            headers={"Repr-Digest": bogus, "Content-Length": str(MiB), "Accept-Ranges": "bytes"},
        )
    )
    proc = run_cli(home, "pull", origin.url_for("/w.bin"))
    line = assert_one_line_error(proc, 4)
    assert "sha256" in line
    assert not (home / "models").exists() or not list((home / "models").iterdir())


@pytest.mark.parametrize("kind", ["tar.gz", "tgz", "tar", "zip"])
def test_archives_are_unpacked(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "m"
    write_random(src / "weights" / "a.bin", 2 * MiB, seed=1)
    (src / "config.json").write_text('{"x": 1}')
    name = f"model.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(origin_root / name, "w") as zf:
            for p in src.rglob("*"):
                zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(origin_root / name, "w:gz" if "gz" in kind else "w") as tf:
            tf.add(src, arcname=".")
    proc = run_cli(home, "pull", origin.url_for("/" + name))
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(Path(proc.stdout.strip())) == tree_digest(src)
    assert run_cli(home, "verify", "--full").returncode == 0


def test_server_without_ranges(home: Path, origin_root: Path) -> None:
    data = write_random(origin_root / "x.bin", 5 * MiB)
    with Origin(origin_root, ranges=False) as o:
        proc = run_cli(home, "pull", o.url_for("/x.bin"))
        assert proc.returncode == 0, proc.stderr
        assert all(r.range is None for r in o.requests)
    assert (Path(proc.stdout.strip()) / "x.bin").read_bytes() == data


@pytest.mark.parametrize(
    "rule",
    [
        FaultRule("reset", first=3, after_bytes=100_000),
        FaultRule("status", first=3, status=500),
        FaultRule("status", first=2, status=503, methods=("HEAD",)),
        FaultRule("truncate", first=3, after_bytes=50_000),
        FaultRule("stall", first=1, after_bytes=10_000, seconds=4),
    ],
    ids=["reset", "500", "503-on-head", "truncate", "stall"],
)
def test_faults_recover(home: Path, origin: Origin, origin_root: Path, rule: FaultRule) -> None:
    data = write_random(origin_root / "f.bin", 12 * MiB)
    origin.add_fault(rule)
    proc = run_cli(
        home, "pull", origin.url_for("/f.bin"), MODELCACHE_CHUNK_SIZE=str(4 * MiB), MODELCACHE_CONNECTIONS="4"
    )
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "f.bin").read_bytes() == data
    assert "retry" in proc.stderr or rule.methods == ("HEAD",)


def test_persistent_faults_end_in_exit_6_and_nothing_published(
    home: Path, origin: Origin, origin_root: Path
) -> None:
    write_random(origin_root / "f.bin", 2 * MiB)
    origin.add_fault(FaultRule("reset", methods=("GET",), after_bytes=1000))
    proc = run_cli(home, "pull", origin.url_for("/f.bin"))
    line = assert_one_line_error(proc, 6)
    assert "gave up" in line
    assert run_cli(home, "path", origin.url_for("/f.bin")).returncode == 3
    listing = json.loads(run_cli(home, "list", "--json").stdout)
    assert [m["state"] for m in listing] == ["partial"]  # kept for resume, never shown complete
    removed = run_cli(home, "rm", listing[0]["key"])  # and it can be discarded by the key `list` shows
    assert removed.returncode == 0 and "removed partial download" in removed.stdout, removed.stderr
    assert json.loads(run_cli(home, "list", "--json").stdout) == []


def test_bad_inputs_are_one_line_errors(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    cases: list[tuple[list[str], int, str]] = [
        (["pull", "foo://bucket/x"], 2, "unknown URI scheme"),
        (["pull", "http://"], 2, "malformed"),
        (["pull", "https://host:notaport/x"], 2, "malformed"),
        (["pull", "http://127.0.0.1:9/model.bin"], 6, "cannot connect"),
        (["pull", origin.url_for("/missing.bin")], 3, "not found"),
        (["pull", str(tmp_path / "nope")], 3, "no such file"),
        (["gc", "--max-size", "ten gigs"], 2, "invalid size"),
        (["path", "file:///not/cached"], 3, "not cached"),
        (["rm", "file:///not/cached"], 3, "not cached"),
    ]
    for args, code, fragment in cases:
        proc = run_cli(home, *args)
        line = assert_one_line_error(proc, code)
        assert fragment in line, (args, line)


def _evil_tar(path: Path, member: str, *, symlink: str | None = None) -> None:
    with tarfile.open(path, "w") as tf:
        good = tarfile.TarInfo("ok.txt")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(member)
        if symlink is not None:
            info.type = tarfile.SYMTYPE
            info.linkname = symlink
            tf.addfile(info)
        else:
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))


@pytest.mark.parametrize(
    ("member", "symlink"),
    [("../escape.txt", None), ("a/../../escape.txt", None), ("/tmp/escape-abs.txt", None), ("link", "/etc")],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_unsafe_archives_rejected(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path, member: str, symlink: str | None
) -> None:
    _evil_tar(origin_root / "evil.tar", member, symlink=symlink)
    before = set(tmp_path.rglob("*"))
    proc = run_cli(home, "pull", origin.url_for("/evil.tar"))
    line = assert_one_line_error(proc, 4)
    assert "unsafe archive member" in line
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(home)}
    assert after <= before  # nothing written outside the cache root
    assert not Path("/tmp/escape-abs.txt").exists()
    assert not list((home / ".modelcache" / "staging").iterdir())
    assert run_cli(home, "path", origin.url_for("/evil.tar")).returncode == 3


def test_unsafe_zip_rejected(home: Path, origin: Origin, origin_root: Path) -> None:
    with zipfile.ZipFile(origin_root / "evil.zip", "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr("../../zip-escape.txt", "evil")
    proc = run_cli(home, "pull", origin.url_for("/evil.zip"))
    assert "unsafe archive member" in assert_one_line_error(proc, 4)


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _model_tar(path: Path, src: Path, *, big: int = 12 * MiB) -> None:
    """config.json first (as tools write it), then two weight files."""
    (src / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text('{"model_type": "t"}')
    write_random(src / "w1.bin", big, seed=2)
    write_random(src / "w2.bin", big, seed=3)
    with tarfile.open(path, "w") as tf:
        for name in ("config.json", "w1.bin", "w2.bin"):
            tf.add(src / name, arcname=name)


def test_tar_is_unpacked_while_it_downloads(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """The first member lands in staging while most of the archive is still on the wire, and the
    archive is fetched once (no second pass over the network, none over a finished download)."""
    src = tmp_path / "m"
    _model_tar(origin_root / "model.tar", src)
    size = (origin_root / "model.tar").stat().st_size
    url = origin.url_for("/model.tar")
    origin.rate_limit = 2 * MiB  # per response: 2 connections, ~6 s for the whole archive
    proc = popen_cli(home, "pull", url, MODELCACHE_CONNECTIONS="2")
    unpacked = home / ".modelcache" / "staging" / _key(url) / "files" / "config.json"
    seen_at: int | None = None
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if unpacked.exists():
                seen_at = origin.bytes_sent_for("/model.tar")
                break
            time.sleep(0.02)
        origin.rate_limit = None
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert seen_at is not None and seen_at < size // 2, (seen_at, size)
    assert tree_digest(Path(out.strip())) == tree_digest(src)
    assert origin.bytes_sent_for("/model.tar") <= size + origin.overlap_bytes_for("/model.tar")
    assert not list((home / ".modelcache" / "staging").iterdir())
    assert run_cli(home, "verify", "--full").returncode == 0


def test_bomb_found_while_downloading_stops_the_download(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """A member over the unpack cap at the front stops the pull long before the archive is in,
    with exit 4 and no second attempt."""
    filler = write_random(tmp_path / "filler.bin", 16 * MiB, seed=4)
    with tarfile.open(origin_root / "bomb.tar.gz", "w:gz") as tf:
        zeros = tarfile.TarInfo("zeros.bin")
        zeros.size = 80 * MiB
        tf.addfile(zeros, io.BytesIO(bytes(zeros.size)))
        more = tarfile.TarInfo("filler.bin")
        more.size = len(filler)
        tf.addfile(more, io.BytesIO(filler))
    size = (origin_root / "bomb.tar.gz").stat().st_size
    origin.rate_limit = 1 * MiB
    proc = run_cli(
        home,
        "pull",
        origin.url_for("/bomb.tar.gz"),
        MODELCACHE_CONNECTIONS="2",
        MODELCACHE_MAX_UNPACK_BYTES=str(32 * MiB),
    )
    line = assert_one_line_error(proc, 4)
    assert "unpacks to more than" in line
    assert origin.bytes_sent_for("/bomb.tar.gz") < size // 2
    assert not list((home / ".modelcache" / "staging").iterdir())
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_tar_resumed_after_kill_is_unpacked_again(
    home: Path, origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """kill -9 once members are unpacked: the resumed pull keeps the downloaded bytes, unpacks the
    archive afresh and publishes exactly the source tree."""
    src = tmp_path / "m"
    _model_tar(origin_root / "model.tar", src)
    size = (origin_root / "model.tar").stat().st_size
    url = origin.url_for("/model.tar")
    origin.rate_limit = 2 * MiB
    proc = popen_cli(home, "pull", url, MODELCACHE_CONNECTIONS="2")
    unpacked = home / ".modelcache" / "staging" / _key(url) / "files" / "w1.bin"
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not unpacked.exists():
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert unpacked.exists()
    first = origin.bytes_sent_for("/model.tar")
    assert first < size
    origin.rate_limit = None
    again = run_cli(home, "pull", url)
    assert again.returncode == 0, again.stderr
    assert tree_digest(Path(again.stdout.strip())) == tree_digest(src)
    # bytes already written were kept (plus one overlap per request and the killed requests' tails)
    assert origin.bytes_sent_for("/model.tar") < size + first // 2 + 4 * MiB
    assert run_cli(home, "verify", "--full").returncode == 0


def test_file_source_directory(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "local-model"
    write_random(src / "model.bin", 3 * MiB)
    (src / "tok" / "vocab.json").parent.mkdir()
    (src / "tok" / "vocab.json").write_text("{}")
    (src / "empty.txt").write_text("")
    proc = run_cli(home, "pull", str(src), "--exclude", "*.txt")
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip())
    assert tree_digest(out) == {k: v for k, v in tree_digest(src).items() if not k.endswith(".txt")}
    listing = json.loads(run_cli(home, "list", "--json").stdout)
    assert listing[0]["uri"] == f"file://{src}"
    assert {"key", "uri", "path", "size_bytes", "state", "revision", "last_used_at", "pinned"} <= listing[
        0
    ].keys()


def test_pvc_uri_reads_the_mounted_claim(home: Path, tmp_path: Path) -> None:
    mount = tmp_path / "mnt-pvc"
    write_random(mount / "models" / "m1" / "w.bin", MiB)
    proc = run_cli(home, "pull", "pvc://my-claim/models/m1", MODELCACHE_PVC_ROOT=str(mount))
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(Path(proc.stdout.strip())) == tree_digest(mount / "models" / "m1")
    # '..' cannot climb out of the claim's mount: it resolves to <mount>/etc, which does not exist
    line = assert_one_line_error(
        run_cli(home, "pull", "pvc://my-claim/../../etc", MODELCACHE_PVC_ROOT=str(mount)), 3
    )
    assert f"{mount}/etc" in line


def test_revision_flag_rejected_where_meaningless(home: Path, origin: Origin, origin_root: Path) -> None:
    write_random(origin_root / "r.bin", 1000)
    line = assert_one_line_error(run_cli(home, "pull", origin.url_for("/r.bin"), "--revision", "v2"), 2)
    assert "--revision does not apply" in line


def test_kserve_host_headers_env(home: Path, origin_root: Path) -> None:
    write_random(origin_root / "p.bin", 2 * MiB)
    with Origin(origin_root, token="s3cr3t-t0ken") as o:
        url = o.url_for("/p.bin")
        denied = run_cli(home, "pull", url)
        assert "s3cr3t" not in denied.stderr
        assert_one_line_error(denied, 6)
        ok = run_cli(home, "pull", url, **{"127.0.0.1-headers": '{"Authorization": "Bearer s3cr3t-t0ken"}'})
        assert ok.returncode == 0, ok.stderr
        bad = run_cli(home.parent / "h2", "pull", url, **{"127.0.0.1-headers": "nope"})
        assert "must be a JSON object" in assert_one_line_error(bad, 2)


def test_more_bad_inputs_are_one_line_errors_without_secrets(home: Path, tmp_path: Path) -> None:
    """Found by review: each of these once printed a traceback, a Rich box, or a secret."""
    afile = tmp_path / "a-file"
    afile.write_text("x")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    src = tmp_path / "src"
    write_random(src / "w.bin", 1000)
    cases: list[tuple[list[str], int, str]] = [
        (["pull", "ftp://user:secretpw@127.0.0.1/x"], 2, "unknown URI scheme"),
        (["pull", "https://user:secretpw@127.0.0.1:99999/x"], 2, "malformed"),
        (["pull", "http://u:SEC@RETPW@127.0.0.1:9/x.bin"], 6, "cannot connect"),
        (["pull", "https://ho st/x"], 2, "no host"),
        (["pull", "https://127.0.0.1/\x1b[31mred"], 2, "control characters"),
        (["--home", str(afile), "list"], 2, "not a directory"),
        (["gc", "--max-size", "1e400"], 2, "out of range"),
        (["gc", "--max-size", "99999999999999999999999Ei"], 2, "larger than"),
        (["bogus"], 2, "No such command"),
        (["pull", "--connections", "0", "x"], 2, "--connections"),
        (["pull"], 2, "Missing argument"),
        (["import", str(empty)], 4, "not a valid bundle"),
        (["initialize", str(src), ""], 2, "empty DEST_DIR"),
        (["initialize", str(src), str(afile)], 2, "not a directory"),
        (["pull", "s3://Bad_Bucket/x"], 2, "not a valid S3 bucket name"),
    ]
    for args, code, fragment in cases:
        proc = run_cli(home, *args)
        line = assert_one_line_error(proc, code)
        assert fragment in line, (args, line)
        assert "secretpw" not in proc.stderr + proc.stdout and "RETPW" not in proc.stderr + proc.stdout


def test_export_to_a_directory_and_a_damaged_manifest(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "w.bin", 1000)
    key = json.loads(run_cli(home, "pull", str(src), "--json").stdout)["key"]
    line = assert_one_line_error(run_cli(home, "export", key, "-o", str(tmp_path)), 2)
    assert "must name a file" in line
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.part"))
    (home / ".modelcache" / "manifests" / f"{key}.json").write_text("{bad")
    assert "damaged" in assert_one_line_error(run_cli(home, "show", key), 4)
    assert run_cli(home, "rm", key, "--force").returncode == 0
