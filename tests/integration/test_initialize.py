"""The cache-aware storage initializer: many pods on one cold shared cache download once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import popen_cli, run_cli, write_random
from tests.integration.test_pull import tree_digest
from tests.support.origin import Origin

MiB = 1 << 20


@pytest.fixture
def model_tar(tmp_path: Path, origin_root: Path) -> Path:
    import tarfile

    src = tmp_path / "model-src"
    write_random(src / "model.safetensors", 12 * MiB)
    write_random(src / "tokenizer" / "vocab.bin", 300_000, seed=3)
    (src / "config.json").write_text('{"model_type": "llama"}')
    with tarfile.open(origin_root / "model.tar", "w") as tf:
        tf.add(src, arcname=".")
    return src


def test_eight_pods_one_download(tmp_path: Path, origin_root: Path, model_tar: Path) -> None:
    cache = tmp_path / "shared-rwx"
    with Origin(origin_root, rate_limit=4 * MiB) as origin:
        url = origin.url_for("/model.tar")
        procs = [
            popen_cli(
                tmp_path / "unused",
                "initialize",
                url,
                str(tmp_path / f"pod{i}" / "mnt-models"),
                "--cache-dir",
                str(cache),
                MODELCACHE_CONNECTIONS="4",
            )
            for i in range(8)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        sent = origin.bytes_sent_for("/model.tar") - origin.overlap_bytes_for("/model.tar")
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert sent == (origin_root / "model.tar").stat().st_size  # the origin served it once (+ overlaps)
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["hit"] for r in results) == [False] + [True] * 7
    want = tree_digest(model_tar)
    for i in range(8):
        assert tree_digest(tmp_path / f"pod{i}" / "mnt-models") == want
    assert {r["method"] for r in results} == {"hardlink"}  # same filesystem here
    assert (tmp_path / "pod0" / "mnt-models" / "config.json").stat().st_nlink > 1
    assert any("cache hit" in o[1] for o in outs) and any("cache miss" in o[1] for o in outs)


def test_without_cache_dir_downloads_straight_to_dest(
    tmp_path: Path, origin: Origin, model_tar: Path
) -> None:
    dest = tmp_path / "mnt" / "models"
    proc = run_cli(tmp_path / "unused", "initialize", origin.url_for("/model.tar"), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(dest) == tree_digest(model_tar)
    assert not (tmp_path / "unused").exists()  # no cache was created anywhere


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_other_filesystem_gets_a_copy(tmp_path: Path, origin: Origin, model_tar: Path) -> None:
    dest = tmp_path / "emptydir"
    dest.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(dest)]).returncode == 0
    try:
        proc = run_cli(
            tmp_path / "u",
            "initialize",
            origin.url_for("/model.tar"),
            str(dest / "models"),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["method"] == "copy"
        assert tree_digest(dest / "models") == tree_digest(model_tar)
    finally:
        subprocess.run(["umount", "-l", str(dest)], check=False)


def test_bad_arguments(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "initialize", "http://127.0.0.1:9/x.tar")
    assert proc.returncode == 2 and "usage: modelcache initialize" in proc.stderr


def test_kserve_allow_and_ignore_patterns(
    tmp_path: Path, origin: Origin, model_tar: Path, origin_root: Path
) -> None:
    (origin_root / "loose").mkdir()
    for name in ("a.json", "b.bin", "c.txt"):
        (origin_root / "loose" / name).write_text(name)
    dest = tmp_path / "d"
    proc = run_cli(
        tmp_path / "u",
        "initialize",
        str(origin_root / "loose"),
        str(dest),
        STORAGE_ALLOW_PATTERNS='["*.json", "*.bin"]',
        STORAGE_IGNORE_PATTERNS='["b.*"]',
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["a.json"]
    bad = run_cli(
        tmp_path / "u", "initialize", str(origin_root / "loose"), str(dest), STORAGE_ALLOW_PATTERNS="*.json"
    )
    assert bad.returncode == 2 and "JSON list" in bad.stderr
