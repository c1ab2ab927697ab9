"""Cache-aware storage initializer: a drop-in for KServe's storage-initializer entrypoint.

`modelcache initialize SRC DEST [SRC DEST ...] [--cache-dir DIR]`, same positional pairs as KServe's
`initializer-entrypoint`. With a cache dir (an RWX volume shared by many pods on many nodes) a hit
exposes the cached model at DEST — hard links when DEST is on the cache's filesystem, else a copy
(copy_file_range, so the kernel moves the bytes) — and a miss downloads into the cache first, once,
however many pods start together: the engine's per-model O_EXCL lock works across hosts on NFS.
Without a cache dir the model is downloaded straight into DEST through the same engine.

Pods must not be able to change the cache through their hard links. Published files are read-only
(a non-root pod cannot open them for writing) and the manifest records each file's size and mtime
at publish; every hit re-checks both with one lstat per file before exposing anything. A model a
root pod wrote to is taken out of the cache (under the download lock) and downloaded again, so
the next pod never gets the tampered bytes. Reflinks/copies would make that impossible but cost
a full copy per pod on filesystems without reflink (ext4, NFS), which is what RWX volumes are.

Every hit and miss against a cache dir is appended to the cache's usage log (`stats.py`: one file
per process, no locks, safe on NFS), which `modelcache stats` and its Prometheus textfile read.

The lease on the model is taken before the lookup, so `rm`/`gc` cannot remove it between "hit"
and the links; whatever fails, DEST is left as we found it (and a full disk is exit 5).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelcache.engine import PullResult, pull
from modelcache.errors import InsufficientSpaceError, IntegrityError, NotFoundError, UsageError
from modelcache.safepath import UnsafeNameError, join_under, printable
from modelcache.sources.base import SourceOptions
from modelcache.stats import Event, record
from modelcache.store import Store
from modelcache.store.core import check_root
from modelcache.store.manifest import FileEntry
from modelcache.uri import parse_uri, redact

ATTEMPTS = 3  # hits that vanish or turn out tampered before we give up (each one re-downloads)

log = logging.getLogger("modelcache")


@dataclass(frozen=True)
class InitResult:
    uri: str
    dest: Path
    hit: bool
    method: str  # hardlink | copy | download
    seconds: float
    bytes: int


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _undo(created: list[Path]) -> None:
    """Remove what we made under DEST, deepest first (files, then the directories we created)."""
    for p in reversed(created):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def _check_free(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if free < needed:
        raise InsufficientSpaceError(
            f"copying the model into {printable(str(dest))} needs {needed} bytes but only {free} are free"
        )


def _expose(src_dir: Path, files: list[FileEntry], dest: Path) -> str:
    """Expose every manifest entry of src_dir under dest; returns how ("hardlink" or "copy").

    Driven by the (validated) manifest, never by walking the cache, and never through a symlink.
    On any failure DEST loses everything this call put there; ENOSPC/EDQUOT is exit 5.
    """
    same_fs = os.stat(src_dir).st_dev == os.stat(dest).st_dev
    # MODELCACHE_INITIALIZE_LINKS=0: copy even on one filesystem, for pods that run as root and are
    # not trusted (a root pod can write through a hard link and hide it by restoring the mtime).
    links = os.environ.get("MODELCACHE_INITIALIZE_LINKS", "1").strip().lower() not in ("0", "false", "no")
    method = "hardlink" if same_fs and links else "copy"
    if method == "copy":
        _check_free(dest, sum(f.size for f in files))
    created: list[Path] = []
    try:
        for i, f in enumerate(files):
            src = join_under(src_dir, f.path, "manifest entry")
            if not stat.S_ISREG(os.lstat(src).st_mode):
                raise IntegrityError(f"{printable(f.path)} in the cache is not a regular file")
            target = join_under(dest, f.path, "manifest entry")
            missing: list[Path] = []
            parent = target.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                d.mkdir()
                created.append(d)
            if os.path.lexists(target):
                _remove(target)
            created.append(target)
            if method == "hardlink":
                try:
                    os.link(src, target, follow_symlinks=False)
                    continue
                except OSError as exc:  # EPERM, EMLINK, a filesystem without links: copy from now on
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    method = "copy"
                    _check_free(dest, sum(e.size for e in files[i:]))
            shutil.copyfile(src, target, follow_symlinks=False)
    except OSError as exc:
        _undo(created)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(
                f"no space left on the device holding {printable(str(dest))}"
            ) from exc
        raise
    except BaseException:
        _undo(created)
        raise
    return method


async def _from_cache(
    store: Store, uri: str, key: str, dest: Path, options: SourceOptions
) -> tuple[PullResult, str]:
    """Pull (a hit or a download), check the cached files are unchanged, then link or copy them.

    The caller holds a lease on `key`. A model found changed since publish is discarded under
    the download lock (after checking again there, so a fresh copy is never discarded) and
    pulled again; one that vanished between the check and the links is simply pulled again.
    """
    for _ in range(ATTEMPTS):
        result = await pull(store, uri, options=options)
        try:
            changed = store.changed_files(key)
            files = store.manifest(key).files
        except UnsafeNameError:  # a symlink planted in the cache: refused, never "repaired"
            raise
        except (NotFoundError, IntegrityError) as exc:  # manifest missing or damaged
            changed, files = [exc.message], []
        if changed:
            log.warning(
                "cached copy of %s changed after it was published (%s); discarding it and downloading again",
                printable(redact(uri)),
                changed[0],
            )
            with store.lock(key):
                try:
                    still = bool(store.changed_files(key))
                except (NotFoundError, IntegrityError):
                    still = store.lookup_key(key) is not None
                if still:
                    store.discard_damaged(key)
            continue
        try:
            return result, _expose(result.record.path, files, dest)
        except FileNotFoundError:  # removed (or moved to trash) while we were linking: pull again
            log.warning("cached copy of %s vanished while linking; pulling again", printable(redact(uri)))
    raise IntegrityError(f"the cached copy of {printable(redact(uri))} keeps changing; giving up")


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
        raise UsageError(f"--cache-dir {printable(str(cache_dir))} exists and is not a directory")
    options = kserve_patterns(os.environ)
    key = parse_uri(uri).key  # bad URIs are exit 2 before anything is created
    dest = check_dest(dest.absolute())
    made_dest = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(f"no space left to create {printable(str(dest))}") from exc
        raise UsageError(f"cannot create DEST_DIR {printable(str(dest))}: {exc.strerror}") from exc
    try:
        if cache_dir is not None:
            store = Store(cache_dir)
            store.ensure()
            with store.lease(key):  # before the lookup: nobody may evict it from "hit" to the links
                result, method = await _from_cache(store, uri, key, dest, options)
            res = InitResult(uri, dest, result.hit, method, time.monotonic() - t0, result.record.size_bytes)
            record_use(store.root, key, res)
        else:
            # No cache: the engine still does the work (parallel, verified), in a private store
            # inside DEST that is moved into place and removed, so nothing is written outside DEST.
            private = dest / ".modelcache-initialize"
            if private.exists():
                shutil.rmtree(private)
            try:
                result = await pull(Store(private), uri, options=options)
                _move_tree(result.record.path, dest)
            finally:
                shutil.rmtree(private, ignore_errors=True)
            res = InitResult(uri, dest, False, "download", time.monotonic() - t0, result.record.size_bytes)
    except BaseException:
        if made_dest:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info(
        "initialize %s -> %s: %s via %s, %.2f s",
        printable(redact(uri)),
        printable(str(dest)),
        "cache hit" if res.hit else "cache miss" if cache_dir else "no cache",
        res.method,
        res.seconds,
    )
    return res


def record_use(root: Path, key: str, res: InitResult) -> None:
    """One line in the cache's usage log (`modelcache stats`): hit or miss, how, bytes, seconds."""
    event = Event(
        ts=time.time(),
        key=key,
        uri=res.uri,
        hit=res.hit,
        mode="link" if res.method == "hardlink" else "copy",
        bytes=res.bytes,
        seconds=res.seconds,
    )
    record(root, event)


def check_dest(dest: Path) -> Path:
    """A DEST_DIR we can create files under: printable, not over-long (else exit 2)."""
    try:
        return check_root(dest)
    except UsageError as exc:
        raise UsageError(exc.message.replace("cache root", "DEST_DIR", 1)) from exc


def pairs(args: list[str]) -> list[tuple[str, Path]]:
    if len(args) < 2 or len(args) % 2:
        raise UsageError(
            "usage: modelcache initialize SRC_URI DEST_DIR [SRC_URI DEST_DIR ...] [--cache-dir DIR]"
        )
    out = []
    for i in range(0, len(args), 2):
        dest = args[i + 1]
        if not dest.strip():
            raise UsageError(f"empty DEST_DIR for {printable(redact(args[i]))}")
        check_dest(Path(dest))
        if Path(dest).exists() and not Path(dest).is_dir():
            raise UsageError(f"DEST_DIR {printable(dest)} exists and is not a directory")
        out.append((args[i], Path(dest)))
    return out
