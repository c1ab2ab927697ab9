"""One node's cache on disk.

Layout (a contract, see DESIGN.md):
    <root>/models/<key>/             complete, verified models only
    <root>/.modelcache/index.db      SQLite (WAL), rebuildable from manifests
    <root>/.modelcache/manifests/    <key>.json: files, sizes, sha256, revision
    <root>/.modelcache/staging/<key> in-progress downloads (resumable)
    <root>/.modelcache/locks/        <key>.lock (O_EXCL + heartbeat)
    <root>/.modelcache/leases/<key>/ one file per live user of a model ("in use")
    <root>/.modelcache/trash/        removals in flight (renamed away first, deleted after)

Publishing is manifest -> rename(staging/files, models/<key>) -> index row. A crash between any two
steps is repaired by `repair()`: a model directory with a manifest is adopted, a manifest without
a directory is dropped, trash is emptied. So the cache is always either the old state or the new.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache.errors import ConflictError, IntegrityError, NotFoundError, UsageError
from modelcache.store.evict import Candidate
from modelcache.store.index import Index, IndexRow
from modelcache.store.locks import FileLock, is_held
from modelcache.store.manifest import Manifest, load_manifest, save_manifest
from modelcache.uri import is_key, parse_uri, redact, storage_key

META = ".modelcache"
HASH_BLOCK = 4 << 20


def default_root() -> Path:
    env = os.environ.get("MODELCACHE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modelcache"


@dataclass(frozen=True)
class ModelRecord:
    """What `list` and `lookup` return: plain data, JSON-ready via `as_dict`."""

    key: str
    uri: str
    path: Path
    size_bytes: int
    state: str  # complete | downloading | partial
    revision: str | None
    last_used_at: float | None
    created_at: float | None
    pinned: bool
    file_count: int
    in_use: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "uri": redact(self.uri),  # signed URLs (SAS, presigned S3) carry secrets in the query
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "state": self.state,
            "revision": self.revision,
            "last_used_at": self.last_used_at,
            "created_at": self.created_at,
            "pinned": self.pinned,
            "file_count": self.file_count,
            "in_use": self.in_use,
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser().absolute() if root is not None else default_root().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"cache root {self.root} is not a directory (check --home / MODELCACHE_HOME)")
        self.models_dir = self.root / "models"
        self.meta = self.root / META
        self.index = Index(self.meta / "index.db")

    # -- paths -------------------------------------------------------------------------------
    def ensure(self) -> None:
        try:
            for d in (self.models_dir, self.meta / "manifests", self.meta / "staging", self.meta / "locks"):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot use cache root {self.root}: {exc.strerror} (check --home / MODELCACHE_HOME)"
            ) from exc

    def model_dir(self, key: str) -> Path:
        return self.models_dir / key

    def manifest_path(self, key: str) -> Path:
        return self.meta / "manifests" / f"{key}.json"

    def staging_dir(self, key: str) -> Path:
        return self.meta / "staging" / key

    def lock_path(self, key: str) -> Path:
        return self.meta / "locks" / f"{key}.lock"

    def lock(self, key: str) -> FileLock:
        self.ensure()
        return FileLock(self.lock_path(key))

    # -- lookup ------------------------------------------------------------------------------
    def key_for(self, ref: str) -> str:
        """A model reference is a URI, a local path, or a 16-hex key of a cached model."""
        if is_key(ref) and (self.model_dir(ref).exists() or self.staging_dir(ref).exists()):
            return ref
        return parse_uri(ref).key

    def lookup(self, ref: str) -> ModelRecord | None:
        """The warm path: one indexed query and one stat. None unless complete."""
        if not self.index.path.exists():
            return None
        key = self.key_for(ref)
        try:
            row = self.index.get(key)
        except sqlite3.DatabaseError:
            self.repair()
            row = self.index.get(key)
        if row is None or not self.model_dir(key).is_dir():
            return None
        return self._record(row)

    def get(self, ref: str) -> ModelRecord:
        rec = self.lookup(ref)
        if rec is None:
            raise NotFoundError(f"not cached: {redact(ref)}")
        return rec

    def touch(self, key: str) -> None:
        self.index.touch(key)

    def _record(self, row: IndexRow) -> ModelRecord:
        return ModelRecord(
            key=row.key,
            uri=row.uri,
            path=self.model_dir(row.key),
            size_bytes=row.size_bytes,
            state="complete",
            revision=row.revision,
            last_used_at=row.last_used_at,
            created_at=row.created_at,
            pinned=row.pinned,
            file_count=row.file_count,
            in_use=self.in_use(row.key),
        )

    def list_models(self) -> list[ModelRecord]:
        """Complete models (most recently used first), then downloads in progress or interrupted."""
        if not self.root.exists():
            return []
        self.repair()
        rows = self.index.all() if self.index.path.exists() else []
        records = [self._record(r) for r in rows]
        staging = self.meta / "staging"
        if staging.is_dir():
            from modelcache.transfer import read_staging_summary

            for d in sorted(staging.iterdir()):
                summary = read_staging_summary(d)
                if summary is None:
                    continue
                state = "downloading" if is_held(self.lock_path(d.name)) else "partial"
                records.append(
                    ModelRecord(
                        key=d.name,
                        uri=summary.uri,
                        path=self.model_dir(d.name),
                        size_bytes=summary.done_bytes,
                        state=state,
                        revision=summary.revision,
                        last_used_at=None,
                        created_at=None,
                        pinned=False,
                        file_count=summary.file_count,
                    )
                )
        return records

    def manifest(self, key: str) -> Manifest:
        try:
            return load_manifest(self.manifest_path(key))
        except FileNotFoundError as exc:
            raise NotFoundError(f"not cached: {key}") from exc
        except ValueError as exc:
            raise IntegrityError(
                f"manifest of {key} is damaged ({self.manifest_path(key)}); "
                f"`modelcache rm --force {key}` and pull again"
            ) from exc

    # -- publish / remove --------------------------------------------------------------------
    def publish(self, files_dir: Path, manifest: Manifest) -> ModelRecord:
        """Make a verified staging tree visible as models/<key>, atomically."""
        key = manifest.key
        assert key == storage_key(manifest.uri)
        self.ensure()
        target = self.model_dir(key)
        old = self.index.get(key)
        manifest.pinned = bool(old and old.pinned)
        save_manifest(self.manifest_path(key), manifest)
        if target.exists():
            self._trash(target)
        os.rename(files_dir, target)
        fsync_dir(self.models_dir)
        now = time.time()
        row = IndexRow(
            key=key,
            uri=manifest.uri,
            revision=manifest.revision,
            size_bytes=manifest.size_bytes,
            file_count=len(manifest.files),
            created_at=manifest.created_at,
            last_used_at=now,
            pinned=manifest.pinned,
        )
        self.index.upsert(row)
        return self._record(row)

    def remove(self, key: str, *, force: bool = False) -> int:
        """Delete a model. Pinned needs force; in use is refused always (a pod may be reading it)."""
        row = self.index.get(key)
        if row is None and not self.model_dir(key).exists():
            raise NotFoundError(f"not cached: {key}")
        if row is not None and row.pinned and not force:
            raise ConflictError(f"{redact(row.uri)} is pinned; unpin it or use --force")
        if self.in_use(key):
            raise ConflictError(f"{redact(row.uri) if row else key} is in use; stop its users first")
        size = row.size_bytes if row else 0
        if self.model_dir(key).exists():
            self._trash(self.model_dir(key))
        self.index.delete(key)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()
        self.empty_trash()
        return size

    def remove_partial(self, key: str) -> int:
        """Discard an interrupted download (what `list` shows as partial). Returns bytes freed."""
        staging = self.staging_dir(key)
        if not staging.is_dir():
            raise NotFoundError(f"not cached: {key}")
        if is_held(self.lock_path(key)):
            raise ConflictError(f"{key} is being downloaded right now; stop that pull first")
        from modelcache.transfer import read_staging_summary

        summary = read_staging_summary(staging)
        self.clear_staging(key)
        return summary.done_bytes if summary else 0

    def set_pinned(self, key: str, pinned: bool) -> None:
        if self.index.get(key) is None:
            raise NotFoundError(f"not cached: {key}")
        m = self.manifest(key)
        m.pinned = pinned
        save_manifest(self.manifest_path(key), m)
        self.index.set_pinned(key, pinned)

    def _trash(self, path: Path) -> None:
        trash = self.meta / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash / f"{path.name}.{os.urandom(4).hex()}")

    def empty_trash(self) -> None:
        trash = self.meta / "trash"
        if trash.is_dir():
            for p in trash.iterdir():
                shutil.rmtree(p, ignore_errors=True)

    def clear_staging(self, key: str) -> None:
        shutil.rmtree(self.staging_dir(key), ignore_errors=True)

    # -- in use ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, key: str) -> Iterator[None]:
        """Mark a model in use for the duration (a reader holds it; gc and rm keep away)."""
        lock = FileLock(self.meta / "leases" / key / f"{os.urandom(8).hex()}.lease")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def in_use(self, key: str) -> bool:
        d = self.meta / "leases" / key
        if not d.is_dir():
            return False
        live = False
        for p in d.iterdir():
            if is_held(p):
                live = True
            elif p.suffix == ".lease":
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return live

    # -- consistency -------------------------------------------------------------------------
    def repair(self) -> None:
        """Bring index, manifests and directories back in line after any crash."""
        if not self.meta.exists():
            return
        self.empty_trash()
        try:
            rows = {r.key: r for r in self.index.all()}
        except sqlite3.DatabaseError:  # damaged (disk fault, unsafe network fs): rebuild from manifests
            self.index.discard()
            rows = {}
        mdir = self.meta / "manifests"
        manifests = {p.stem for p in mdir.glob("*.json")} if mdir.is_dir() else set()
        dirs = {p.name for p in self.models_dir.iterdir()} if self.models_dir.is_dir() else set()
        for key in rows.keys() - dirs:
            self.index.delete(key)
        for key in manifests - dirs:
            with contextlib.suppress(FileNotFoundError):
                self.manifest_path(key).unlink()
        for key in (manifests & dirs) - rows.keys():
            try:
                m = load_manifest(self.manifest_path(key))
            except (ValueError, OSError):
                continue
            self.index.upsert(
                IndexRow(
                    key=key,
                    uri=m.uri,
                    revision=m.revision,
                    size_bytes=m.size_bytes,
                    file_count=len(m.files),
                    created_at=m.created_at,
                    last_used_at=m.created_at,
                    pinned=m.pinned,
                )
            )

    def candidates(self) -> list[Candidate]:
        if not self.index.path.exists():
            return []
        return [
            Candidate(r.key, r.size_bytes, r.last_used_at, pinned=r.pinned, in_use=self.in_use(r.key))
            for r in self.index.all()
        ]

    # -- verification ------------------------------------------------------------------------
    def verify(self, key: str, *, full: bool = False) -> list[str]:
        """Problems found (empty when fine). Fast: file set and sizes. Full: also every sha256."""
        m = self.manifest(key)
        base = self.model_dir(key)
        problems: list[str] = []
        expected = {f.path: f for f in m.files}
        if not base.is_dir():
            return [f"{base}: model directory missing"]
        present = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() or p.is_symlink()}
        for rel in sorted(expected.keys() - present):
            problems.append(f"{rel}: missing")
        for rel in sorted(present - expected.keys()):
            problems.append(f"{rel}: unexpected file")
        for rel in sorted(expected.keys() & present):
            f = expected[rel]
            p = base / rel
            size = p.stat().st_size
            if size != f.size:
                problems.append(f"{rel}: size {size} != {f.size}")
            elif full and sha256_file(p) != f.sha256:
                problems.append(f"{rel}: sha256 mismatch")
        return problems
