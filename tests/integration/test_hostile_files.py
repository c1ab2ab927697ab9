"""Hostile archives, bundles and source trees through the real CLI (issue 9).

Every case checks the promises, not only the exit code: one line on stderr and no traceback,
nothing written next to the cache root (a sentinel directory there stays empty), no partial
download left in staging and no model published.
"""

from __future__ import annotations

import ctypes
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcache.safepath import NAME_MAX, PATH_MAX
from tests.conftest import assert_one_line_error, cli_env, run_cli, write_random
from tests.support.archives import (
    M,
    MiB,
    gzip_tar_bomb,
    tar_bytes,
    write_tar,
    zip_bomb,
    zip_bytes,
    zip_encrypted_flag,
    zip_lying_size,
    zip_with_nul_name,
)
from tests.support.origin import Origin

# From <home>/.modelcache/staging/<key>/files, five levels up is the test's tmp dir: these names aim
# at the sentinel directory next to the home.
UP = "../../../../../sentinel"


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    d = tmp_path / "sentinel"
    d.mkdir()
    return d


def assert_untouched(home: Path, sentinel: Path) -> None:
    assert not list(sentinel.iterdir()), list(sentinel.iterdir())
    staging = home / ".modelcache" / "staging"
    assert not staging.exists() or not list(staging.iterdir()), list(staging.iterdir())
    models = home / "models"
    assert not models.exists() or not list(models.iterdir())


def refused(home: Path, sentinel: Path, code: int, *args: str, **env: str) -> str:
    line = assert_one_line_error(run_cli(home, *args, **env), code)
    assert_untouched(home, sentinel)
    return line


# ------------------------------------------------------------------------------------------------
# tar / zip archives (pulled from a local path: the same extract path as http/s3/... archives)
# ------------------------------------------------------------------------------------------------
OK = M("ok.txt", data=b"ok")
TAR_CASES: dict[str, tuple[list[M], str]] = {
    "dotdot": ([OK, M(f"{UP}/dotdot.txt", data=b"x")], "'..'"),
    "absolute": ([OK, M("/tmp/modelcache-abs-escape.txt", data=b"x")], "absolute"),
    "file-then-dir": ([M("a", data=b"file"), M("a/b", data=b"under a file")], "both a file and a directory"),
    "dir-then-file": ([M("a", "dir"), M("a/b", data=b"x"), M("a", data=b"file")], "both a file"),
    "file-then-dir-entry": ([M("a", data=b"file"), M("a/", "dir")], "both a file and a directory"),
    "duplicate": ([M("w.bin", data=b"one"), M("./w.bin", data=b"two")], "listed twice"),
    "long-segment": ([OK, M("d/" + "x" * (NAME_MAX + 1), data=b"x")], "longer than"),
    "long-path": ([OK, M("/".join(["y" * 200] * 6), data=b"x")], "longer than"),
    "percent-00": ([OK, M("w.bin%00.txt", data=b"x")], "%00"),
    "control-char": ([OK, M("w\x1b[31m.bin", data=b"x")], "control character"),
    "backslash": ([OK, M("..\\..\\w.bin", data=b"x")], "backslash"),
    "dot-file": ([OK, M(".", data=b"x")], "no file name"),
    "dotdot-file": ([OK, M("..", data=b"x")], "'..'"),
    "symlink": ([OK, M("link", "sym", target=f"{UP}")], "link not allowed"),
    "hardlink": ([OK, M("hard", "hard", target="/etc/passwd")], "link not allowed"),
    "fifo": ([OK, M("fifo", "fifo")], "special file"),
    "chardev": ([OK, M("null", "chr")], "special file"),
    "only-root-entries": ([M("./", "dir"), M(".", "dir")], "holds no files"),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_hostile_tar_members(home: Path, tmp_path: Path, sentinel: Path, case: str) -> None:
    members, fragment = TAR_CASES[case]
    archive = write_tar(tmp_path / f"{case}.tar", members)
    line = refused(home, sentinel, 4, "pull", str(archive))
    assert fragment in line, line
    assert not Path("/tmp/modelcache-abs-escape.txt").exists()


def test_tar_names_the_members_it_refuses_printably(home: Path, tmp_path: Path, sentinel: Path) -> None:
    archive = write_tar(tmp_path / "esc.tar", [M("evil\u202e\u2028name\x7f", data=b"x")])
    line = refused(home, sentinel, 4, "pull", str(archive))
    assert "\u202e" not in line and "\u2028" not in line and "\\u202e" in line


def test_zip_entries_without_type_bits_are_regular_files(home: Path, tmp_path: Path) -> None:
    """DOS/Windows zips (and many tools) leave the Unix mode empty or give permissions only."""
    archive = tmp_path / "plain.zip"
    archive.write_bytes(
        zip_bytes([("perm-only.txt", b"a", 0o644), ("no-mode.txt", b"b", 0), ("dir/", b"", 0o755)])
    )
    proc = run_cli(home, "pull", str(archive))
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert (out / "perm-only.txt").read_bytes() == b"a" and (out / "no-mode.txt").read_bytes() == b"b"


ZIP_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nul-in-name": (zip_with_nul_name, "NUL"),
    "encrypted": (zip_encrypted_flag, "encrypted"),
    "lying-size": (
        lambda p: zip_lying_size(p, 100, b"z" * 5000),
        "not a valid zip",
    ),  # zipfile stops at the declared size
    "duplicate": (lambda p: _zip(p, [("a.txt", b"1", None), ("a.txt", b"2", None)]), "listed twice"),
    "file-then-dir": (lambda p: _zip(p, [("a", b"1", None), ("a/b", b"2", None)]), "both a file"),
    "symlink": (lambda p: _zip(p, [("ok", b"", None), ("l", b"/etc/passwd", 0o120777)]), "link not allowed"),
    "fifo": (lambda p: _zip(p, [("f", b"", 0o010644)]), "special file"),
    "dotdot": (lambda p: _zip(p, [("ok", b"", None), (f"{UP}/z.txt", b"x", None)]), "'..'"),
    "long-name": (lambda p: _zip(p, [("n" * (PATH_MAX + 10), b"x", None)]), "longer than"),
}


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    path.write_bytes(zip_bytes(entries))
    return path


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_hostile_zip_members(home: Path, tmp_path: Path, sentinel: Path, case: str) -> None:
    build, fragment = ZIP_CASES[case]
    archive = build(tmp_path / f"{case}.zip")
    assert fragment in refused(home, sentinel, 4, "pull", str(archive))


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_decompression_bomb_refused_before_unpacking(
    home: Path, tmp_path: Path, sentinel: Path, kind: str
) -> None:
    """2 MB that unpack to 2 GiB: refused from the declared sizes, before a byte is written."""
    build = gzip_tar_bomb if kind == "tar.gz" else zip_bomb
    archive = build(tmp_path / f"bomb.{kind}", 2048 * MiB)
    assert archive.stat().st_size < 3 * MiB
    line = refused(home, sentinel, 4, "pull", str(archive))
    assert "decompression bomb" in line and "MODELCACHE_MAX_UNPACK_RATIO" in line


def test_unpack_caps_are_configurable(home: Path, tmp_path: Path, sentinel: Path) -> None:
    many = write_tar(tmp_path / "many.tar", [M(f"f{i}", data=b"x") for i in range(60)])
    line = refused(home, sentinel, 4, "pull", str(many), MODELCACHE_MAX_UNPACK_FILES="50")
    assert "more than 50 members" in line
    big = tmp_path / "big.tar"
    big.write_bytes(tar_bytes([M("w.bin", data=os.urandom(200_000))]))
    line = refused(home, sentinel, 4, "pull", str(big), MODELCACHE_MAX_UNPACK_BYTES="100000")
    assert "MODELCACHE_MAX_UNPACK_BYTES" in line
    # a bad setting is bad input; the downloaded archive stays for the next (fixed) pull to reuse
    bad = run_cli(home, "pull", str(big), MODELCACHE_MAX_UNPACK_RATIO="lots")
    assert "not a non-negative number" in assert_one_line_error(bad, 2)
    # a tiny archive may always unpack to 64 MiB, whatever its ratio (8 MiB of zeros gzip to 8 KiB)
    fine = tmp_path / "fine.tar.gz"
    fine.write_bytes(gzip.compress(tar_bytes([M("zeros.bin", data=bytes(8 * MiB))])))
    proc = run_cli(home, "pull", str(fine))
    assert proc.returncode == 0, proc.stderr
    assert not list(sentinel.iterdir())


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_archive_larger_than_free_space_is_exit_5(tmp_path: Path, sentinel: Path) -> None:
    home = tmp_path / "small"
    assert _mount_tmpfs(home, "16m")
    try:
        archive = tmp_path / "zeros.tar.gz"
        members = [M("a.bin", data=bytes(10 * MiB)), M("b.bin", data=bytes(10 * MiB))]
        archive.write_bytes(gzip.compress(tar_bytes(members)))
        # 40 KiB that unpack to 20 MiB (under the cap) do not fit in 16 MiB: a tar is unpacked while
        # it downloads, so the member that does not fit is refused before it is written
        line = refused(home, sentinel, 5, "pull", str(archive))
        assert "no space left to unpack" in line and "'b.bin' needs 10.0 MiB" in line and "free" in line
    finally:
        subprocess.run(["umount", str(home)], check=False)


# ------------------------------------------------------------------------------------------------
# bundles: export of a tampered cache, import of hostile bundles
# ------------------------------------------------------------------------------------------------
def _cached(home: Path, tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "model-src"
    write_random(src / "w.bin", 4096, seed=1)
    (src / "config.json").write_text("{}")
    out = json.loads(run_cli(home, "pull", str(src), "--json").stdout)
    return str(out["key"]), Path(str(out["path"]))


def _tamper_manifest(home: Path, key: str, edit: Callable[[dict[str, object]], None]) -> None:
    path = home / ".modelcache" / "manifests" / f"{key}.json"
    data = json.loads(path.read_text())
    edit(data)
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data))


def test_export_refuses_a_tampered_manifest(home: Path, tmp_path: Path, sentinel: Path) -> None:
    secret = sentinel / "shadow"
    secret.write_text("root:SECRET-HASH:19000::::::\n")
    key, model = _cached(home, tmp_path)
    bundle = tmp_path / "out.tar"
    depth = len(model.relative_to(tmp_path).parts)
    escapes = ["../" * depth + "sentinel/shadow", str(secret), "w.bin/../../" + key + "/w.bin"]
    for path in escapes:

        def entry(data: dict[str, object], path: str = path) -> None:
            files = data["files"]
            assert isinstance(files, list)
            files.append({"path": path, "size": secret.stat().st_size, "sha256": "0" * 64})

        _tamper_manifest(home, key, entry)
        proc = run_cli(home, "export", key, "-o", str(bundle))
        assert_one_line_error(proc, 4)
        assert not bundle.exists() and not list(tmp_path.glob("out.tar*"))
        _tamper_manifest(home, key, lambda d: d.update(files=d["files"][:-1]))  # type: ignore[index]

    # a model file swapped for a symlink to the secret (same size, so only the link gives it away)
    (model / "w.bin").chmod(0o644)
    os.chmod(model, 0o755)
    (model / "w.bin").unlink()
    (model / "w.bin").symlink_to(secret)
    size = secret.stat().st_size
    _tamper_manifest(
        home,
        key,
        lambda d: [f.update(size=size) for f in d["files"] if f["path"] == "w.bin"],  # type: ignore[attr-defined,union-attr]
    )
    assert_one_line_error(run_cli(home, "export", key, "-o", str(bundle)), 4)
    assert not bundle.exists()


def _bundle(
    path: Path, manifest: object, members: list[M], *, manifest_name: str = "modelcache-bundle.json"
) -> Path:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    path.write_bytes(tar_bytes([M(manifest_name, data=data), *members]))
    return path


def _manifest(files: dict[str, bytes]) -> dict[str, object]:
    import hashlib

    from modelcache.uri import storage_key

    uri = "https://example.invalid/model"
    return {
        "key": storage_key(uri),
        "uri": uri,
        "created_at": 1.0,
        "files": [
            {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in files.items()
        ],
    }


BUNDLE_CASES: dict[str, Callable[[], tuple[object, list[M]]]] = {
    "member-dotdot": lambda: (_manifest({"w.bin": b"w"}), [M(f"model/{UP}/w.bin", data=b"w")]),
    "member-not-listed": lambda: (
        _manifest({"w.bin": b"w"}),
        [M("model/w.bin", data=b"w"), M("model/x", data=b"")],
    ),
    "member-outside-prefix": lambda: (_manifest({"w.bin": b"w"}), [M("w.bin", data=b"w")]),
    "manifest-dotdot": lambda: (_manifest({f"{UP}/w.bin": b"w"}), [M(f"model/{UP}/w.bin", data=b"w")]),
    "manifest-absolute": lambda: (_manifest({"/tmp/w.bin": b"w"}), [M("model//tmp/w.bin", data=b"w")]),
    "manifest-duplicate": lambda: (
        {**_manifest({"w.bin": b"w"}), "files": _manifest({"w.bin": b"w"})["files"] * 2},  # type: ignore[operator]
        [M("model/w.bin", data=b"w")],
    ),
    "manifest-file-and-dir": lambda: (_manifest({"a": b"1", "a/b": b"2"}), [M("model/a", data=b"1")]),
    "member-twice": lambda: (_manifest({"w.bin": b"w"}), [M("model/w.bin", data=b"w")] * 2),
    "member-symlink": lambda: (_manifest({"w.bin": b"w"}), [M("model/w.bin", "sym", target="/etc/passwd")]),
    "member-size-lie": lambda: (_manifest({"w.bin": b"w"}), [M("model/w.bin", data=b"ww")]),
    "second-manifest": lambda: (
        _manifest({"w.bin": b"w"}),
        [M("model/w.bin", data=b"w"), M("modelcache-bundle.json", data=b"{}")],
    ),
    "manifest-not-json": lambda: (b"{not json", []),
    "manifest-deep": lambda: (b"[" * 100_000 + b"]" * 100_000, []),
    "manifest-wrong-types": lambda: ({"key": 5, "uri": [], "files": "x", "created_at": "now"}, []),
    "manifest-huge-size": lambda: (
        {**_manifest({}), "files": [{"path": "w", "size": 1e400, "sha256": "0" * 64}]},
        [],
    ),
    "manifest-bomb": lambda: (
        {**_manifest({}), "files": [{"path": "w.bin", "size": 2 << 30, "sha256": "0" * 64}]},
        [M("model/w.bin", data=b"w")],
    ),
    "key-not-uri": lambda: (
        {**_manifest({"w.bin": b"w"}), "key": "0123456789abcdef"},
        [M("model/w.bin", data=b"w")],
    ),
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_hostile_bundles_are_refused(home: Path, tmp_path: Path, sentinel: Path, case: str) -> None:
    manifest, members = BUNDLE_CASES[case]()
    bundle = _bundle(tmp_path / f"{case}.tar", manifest, members)
    refused(home, sentinel, 4, "import", str(bundle))
    assert json.loads(run_cli(home, "list", "--json").stdout) == []


def test_good_bundle_still_imports(home: Path, tmp_path: Path) -> None:
    files = {"w.bin": b"weights", "tok/vocab.json": b"{}"}
    members = [M("model/", "dir"), *(M(f"model/{p}", data=d) for p, d in files.items())]
    proc = run_cli(home, "import", str(_bundle(tmp_path / "ok.tar", _manifest(files), members)))
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "tok" / "vocab.json").read_bytes() == b"{}"


# ------------------------------------------------------------------------------------------------
# file:// and pvc:// source trees: symlinks, unreadable entries, more files than open-file limit
# ------------------------------------------------------------------------------------------------
def test_links_inside_the_source_are_copied_links_out_are_refused(
    home: Path, tmp_path: Path, sentinel: Path
) -> None:
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("SECRET")
    src = tmp_path / "src"
    write_random(src / "real" / "w.bin", 5000, seed=2)
    (src / "latest.bin").symlink_to("real/w.bin")
    (src / "alias").symlink_to("real")
    (src / "dangling").symlink_to("nowhere")
    os.mkfifo(src / "a-fifo")
    proc = run_cli(home, "pull", str(src))
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    w = (src / "real" / "w.bin").read_bytes()
    assert (out / "latest.bin").read_bytes() == w and (out / "alias" / "w.bin").read_bytes() == w
    assert not (out / "dangling").exists() and not (out / "a-fifo").exists()
    assert not any(p.is_symlink() for p in out.rglob("*"))

    for name, target in [("leak", secret), ("up", Path("..")), ("etc", Path("/etc"))]:
        evil = tmp_path / f"evil-{name}"
        write_random(evil / "w.bin", 100)
        (evil / name).symlink_to(target)
        line = refused(home / name, sentinel, 4, "pull", str(evil))
        assert "points outside" in line
    loop = tmp_path / "loop"
    (loop / "d").mkdir(parents=True)
    (loop / "d" / "again").symlink_to("..")
    (loop / "f").write_text("x")
    assert "loop" in refused(home / "loop", sentinel, 4, "pull", str(loop))


def test_pvc_links_stay_inside_the_claim(home: Path, tmp_path: Path, sentinel: Path) -> None:
    mount = tmp_path / "mnt-pvc"
    write_random(mount / "shared" / "tok.json", 100)
    write_random(mount / "models" / "m1" / "w.bin", 1000)
    (mount / "models" / "m1" / "tok.json").symlink_to("../../shared/tok.json")  # inside the claim
    proc = run_cli(home, "pull", "pvc://claim/models/m1", MODELCACHE_PVC_ROOT=str(mount))
    assert proc.returncode == 0, proc.stderr
    write_random(tmp_path / "elsewhere" / "m2" / "w.bin", 100)
    (mount / "escape").symlink_to(tmp_path)  # the URI's path itself leaves the claim
    line = refused(
        home / "b", sentinel, 4, "pull", "pvc://claim/escape/elsewhere/m2", MODELCACHE_PVC_ROOT=str(mount)
    )
    assert "outside" in line
    (mount / "models" / "m3").mkdir()
    (mount / "models" / "m3" / "host").symlink_to(tmp_path / "elsewhere" / "m2" / "w.bin")
    assert "points outside" in refused(
        home / "c", sentinel, 4, "pull", "pvc://claim/models/m3", MODELCACHE_PVC_ROOT=str(mount)
    )


def _without_dac_override() -> None:
    """Run as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file modes apply (CI is root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # PR_CAPBSET_DROP = 24
        libc.prctl(24, cap, 0, 0, 0)


def _run(home: Path, *args: str, preexec: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", *args],
        capture_output=True,
        text=True,
        env=cli_env(home),
        timeout=120,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec,
    )


@pytest.mark.parametrize("what", ["file", "directory"])
def test_unreadable_source_entries_are_exit_6(home: Path, tmp_path: Path, sentinel: Path, what: str) -> None:
    src = tmp_path / "src"
    write_random(src / "ok.bin", 100)
    write_random(src / "sub" / "hidden.bin", 100)
    (src / ("sub/hidden.bin" if what == "file" else "sub")).chmod(0)
    try:
        proc = _run(home, "pull", str(src), preexec=_without_dac_override)
        if os.geteuid() == 0 and proc.returncode == 0:
            pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
        line = assert_one_line_error(proc, 6)
        assert "hidden.bin" in line or "sub" in line
        assert_untouched(home, sentinel)
    finally:
        (src / "sub").chmod(0o755)
        (src / "sub" / "hidden.bin").chmod(0o644)


def test_more_files_than_the_open_file_limit(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:04d}.txt").write_text(str(i))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = _run(home, "pull", str(src), preexec=low_limit)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert len(list(out.iterdir())) == 400 and (out / "f0399.txt").read_text() == "399"


def test_hostile_names_in_a_source_tree(home: Path, tmp_path: Path, sentinel: Path) -> None:
    src = tmp_path / "names"
    write_random(src / "ok.bin", 10)
    (src / "new\nline.bin").write_text("x")
    assert "control character" in refused(home, sentinel, 4, "pull", str(src))
    shutil.rmtree(src)


def test_bundle_round_trip_after_hostile_attempts(home: Path, tmp_path: Path) -> None:
    """The checks do not get in the way of the real thing."""
    key, _ = _cached(home, tmp_path)
    bundle = tmp_path / "b.tar"
    assert run_cli(home, "export", key, "-o", str(bundle)).returncode == 0
    with tarfile.open(bundle) as tf:
        assert sorted(tf.getnames()) == ["model/config.json", "model/w.bin", "modelcache-bundle.json"]
    proc = run_cli(tmp_path / "other", "import", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert io.BytesIO((Path(proc.stdout.strip()) / "config.json").read_bytes()).read() == b"{}"


def test_bundle_of_a_model_whose_uri_had_a_password(
    home: Path, tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    """The manifest keeps only the redacted URI, so import cannot recompute the key; it still imports,
    and the password is in neither bundle nor the other cache."""
    write_random(origin_root / "w.bin", 1000)
    uri = origin.url_for("/w.bin").replace("http://", "http://user:s3cr3tpw@")
    proc = run_cli(home, "pull", uri, "--json")
    assert proc.returncode == 0, proc.stderr
    key = json.loads(proc.stdout)["key"]
    bundle = tmp_path / "b.tar"
    assert run_cli(home, "export", key, "-o", str(bundle)).returncode == 0
    assert b"s3cr3tpw" not in bundle.read_bytes()
    other = tmp_path / "other"
    proc = run_cli(other, "import", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run_cli(other, "list", "--json").stdout)[0]["key"] == key
