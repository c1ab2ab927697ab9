"""Cache-aware storage initializer: a drop-in for KServe's storage-initializer entrypoint.

`modelcache initialize SRC DEST [SRC DEST ...] [--cache-dir DIR]`, same positional pairs as KServe's
`initializer-entrypoint`. With a cache dir (an RWX volume shared by many pods on many nodes) a hit
exposes the cached model at DEST — hard links when DEST is on the cache's filesystem, else a copy
(copy_file_range, so the kernel moves the bytes) — and a miss downloads into the cache first, once,
however many pods start together: the engine's per-model O_EXCL lock works across hosts on NFS.
Without a cache dir the model is downloaded straight into DEST through the same engine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelcache.engine import pull
from modelcache.errors import UsageError
from modelcache.sources.base import SourceOptions
from modelcache.store import Store
from modelcache.uri import redact

log = logging.getLogger("modelcache")


@dataclass(frozen=True)
class InitResult:
    uri: str
    dest: Path
    hit: bool
    method: str  # hardlink | copy | download
    seconds: float
    bytes: int


def _link_or_copy(src_dir: Path, dest: Path) -> str:
    """Expose every file of src_dir under dest; returns how ("hardlink" or "copy")."""
    method = "hardlink"
    for src in sorted(src_dir.rglob("*")):
        rel = src.relative_to(src_dir)
        target = dest / rel
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        if method == "hardlink":
            try:
                os.link(src, target)
                continue
            except OSError:  # EXDEV (another filesystem), EPERM (fs refuses links): copy from now on
                method = "copy"
        shutil.copyfile(src, target)
    return method


def _move_tree(src_dir: Path, dest: Path) -> None:
    for src in sorted(src_dir.iterdir()):
        target = dest / src.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(src, target)


def kserve_patterns(env: Mapping[str, str]) -> SourceOptions:
    """KServe's STORAGE_ALLOW_PATTERNS / STORAGE_IGNORE_PATTERNS (JSON lists) as include/exclude globs."""

    def load(name: str) -> tuple[str, ...]:
        raw = env.get(name, "").strip()
        if not raw:
            return ()
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"{name} must be a JSON list of glob patterns") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{name} must be a JSON list of glob patterns")
        return tuple(value)

    return SourceOptions(include=load("STORAGE_ALLOW_PATTERNS"), exclude=load("STORAGE_IGNORE_PATTERNS"))


async def initialize(uri: str, dest: Path, *, cache_dir: Path | None) -> InitResult:
    t0 = time.monotonic()
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"--cache-dir {cache_dir} exists and is not a directory")
    options = kserve_patterns(os.environ)
    dest = dest.absolute()
    dest.mkdir(parents=True, exist_ok=True)
    if cache_dir is not None:
        store = Store(cache_dir)
        result = await pull(store, uri, options=options)
        with store.lease(result.record.key):  # nobody may evict it while we link or copy
            method = _link_or_copy(result.record.path, dest)
        res = InitResult(uri, dest, result.hit, method, time.monotonic() - t0, result.record.size_bytes)
    else:
        # No cache: the engine still does the work (parallel, verified), in a private store inside
        # DEST that is moved into place and removed, so nothing is written outside DEST.
        private = dest / ".modelcache-initialize"
        if private.exists():
            shutil.rmtree(private)
        try:
            result = await pull(Store(private), uri, options=options)
            _move_tree(result.record.path, dest)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        res = InitResult(uri, dest, False, "download", time.monotonic() - t0, result.record.size_bytes)
    log.info(
        "initialize %s -> %s: %s via %s, %.2f s",
        redact(uri),
        dest,
        "cache hit" if res.hit else "cache miss" if cache_dir else "no cache",
        res.method,
        res.seconds,
    )
    return res


def pairs(args: list[str]) -> list[tuple[str, Path]]:
    if len(args) < 2 or len(args) % 2:
        raise UsageError(
            "usage: modelcache initialize SRC_URI DEST_DIR [SRC_URI DEST_DIR ...] [--cache-dir DIR]"
        )
    out = []
    for i in range(0, len(args), 2):
        dest = args[i + 1]
        if not dest.strip():
            raise UsageError(f"empty DEST_DIR for {redact(args[i])}")
        if Path(dest).exists() and not Path(dest).is_dir():
            raise UsageError(f"DEST_DIR {dest} exists and is not a directory")
        out.append((args[i], Path(dest)))
    return out
