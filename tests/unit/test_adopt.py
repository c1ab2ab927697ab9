"""Adopting folders KServe's agent left in `models/<key>/` (store/adopt.py): decisions and executor."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from modelcache.errors import ConflictError
from modelcache.store import Store
from modelcache.store import adopt as ad
from modelcache.store.core import UNHASHED_SHA256
from modelcache.uri import storage_key

URI = "s3://bucket/llama"
KEY = storage_key(URI)


def kserve_folder(root: Path, files: dict[str, bytes]) -> Path:
    """A folder as KServe's agent leaves it: files under models/<key>/, no manifest, no index."""
    base = root / "models" / KEY
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


def listing(files: dict[str, bytes], with_sha: bool = True) -> ad.Listing:
    return ad.Listing(
        files=tuple(
            ad.ListedFile(p, len(d), hashlib.sha256(d).hexdigest() if with_sha else None)
            for p, d in files.items()
        ),
        scheme="s3",
    )


FILES = {"config.json": b"{}", "weights/model.safetensors": b"w" * 5000}


def test_decide_adopts_a_match_and_keeps_extra_files() -> None:
    folder = ad.Folder(
        KEY,
        (
            ad.FoundFile(".cache/huggingface/x.lock", 0, 1),
            ad.FoundFile("config.json", 2, 1),
            ad.FoundFile("weights/model.safetensors", 5000, 1),
        ),
    )
    assert ad.decide(folder, listing(FILES), mounted=True).action == "adopt"
    assert ad.decide(folder, None, mounted=False).action == "wait"


def test_decide_never_replaces_a_mounted_folder() -> None:
    short = ad.Folder(
        KEY, (ad.FoundFile("config.json", 2, 1), ad.FoundFile("weights/model.safetensors", 10, 1))
    )
    mounted = ad.decide(short, listing(FILES), mounted=True)
    assert mounted.action == "wait" and "a pod mounts it" in mounted.reason
    assert "size 10 != 5000" in mounted.reason
    assert ad.decide(short, listing(FILES), mounted=False).action == "replace"
    link = ad.Folder(KEY, (ad.FoundFile("config.json", 2, 1),), ("x: symlink",))
    assert (
        ad.decide(link, ad.Listing(files=(ad.ListedFile("config.json", 2),)), mounted=False).action
        == "replace"
    )


def test_archive_listing_adopts_a_non_empty_folder() -> None:
    arch = ad.Listing(files=(ad.ListedFile("model.tar.gz", 99),), archive=True)
    assert ad.decide(ad.Folder(KEY, (ad.FoundFile("a", 1, 1),)), arch, False).action == "adopt"
    assert ad.decide(ad.Folder(KEY, ()), arch, False).action == "replace"


def test_throttle_delay() -> None:
    assert ad.throttle_delay(100, 0.0, 100.0) == 1.0
    assert ad.throttle_delay(100, 2.0, 100.0) == 0.0
    assert ad.throttle_delay(100, 0.0, 0) == 0.0


def test_adopt_in_place_then_hash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    base = kserve_folder(tmp_path, {**FILES, ".cache/huggingface/download/x.metadata": b"meta"})
    inode = os.stat(base).st_ino
    assert ad.foreign_keys(store) == [KEY]
    assert store.lookup(URI) is None
    folder = ad.scan(store, KEY)
    assert [f.path for f in folder.files] == [
        ".cache/huggingface/download/x.metadata",
        "config.json",
        "weights/model.safetensors",
    ]
    rec = ad.adopt(store, folder, listing(FILES), URI)
    assert rec.path == base and os.stat(base).st_ino == inode  # never moved
    assert ad.foreign_keys(store) == []
    assert store.lookup(URI) is not None
    assert store.verify(KEY) == [] and store.verify(KEY, full=True) == []
    m = store.manifest(KEY)
    assert ad.needs_hashing(m)
    assert {f.path for f in m.files if f.sha256 == UNHASHED_SHA256} == {
        ".cache/huggingface/download/x.metadata"
    }
    sleeps: list[float] = []
    problems = ad.hash_adopted(store, KEY, rate=1000.0, sleep=sleeps.append, clock=lambda: 0.0)
    assert problems == []
    assert sleeps and max(sleeps) > 4.0  # ~5 KB at 1000 B/s: throttled
    m = store.manifest(KEY)
    assert not ad.needs_hashing(m) and all(f.sha256 != UNHASHED_SHA256 for f in m.files)
    assert store.verify(KEY, full=True) == []
    assert os.stat(base).st_ino == inode


def test_hash_finds_bytes_that_differ_from_the_source(tmp_path: Path) -> None:
    store = Store(tmp_path)
    kserve_folder(tmp_path, {"config.json": b"{}", "weights/model.safetensors": b"x" * 5000})
    ad.adopt(store, ad.scan(store, KEY), listing(FILES), URI)
    problems = ad.hash_adopted(store, KEY, rate=0)
    assert problems == ["weights/model.safetensors: sha256 differs from the source's"]
    assert ad.needs_hashing(store.manifest(KEY))


def test_adopt_refuses_a_folder_that_changed_since_the_scan(tmp_path: Path) -> None:
    store = Store(tmp_path)
    base = kserve_folder(tmp_path, FILES)
    folder = ad.scan(store, KEY)
    (base / "late.bin").write_bytes(b"late")
    with pytest.raises(ConflictError):
        ad.adopt(store, folder, listing(FILES), URI)
    assert ad.foreign_keys(store) == [KEY]


def test_scan_reports_symlinks_without_following(tmp_path: Path) -> None:
    store = Store(tmp_path)
    base = kserve_folder(tmp_path, FILES)
    (base / "evil").symlink_to("/etc/passwd")
    folder = ad.scan(store, KEY)
    assert folder.problems == ("evil: symlink",)
