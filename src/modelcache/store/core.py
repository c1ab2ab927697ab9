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

Our own tree never follows a symlink: a link planted at `models/<key>` is refused (exit 4), one at
`staging/<key>` or `leases/<key>` is removed (the link, never its target) and the work goes on.
Published files are read-only and their mtime is recorded, so a hard-linked copy that someone
wrote to is noticed (`changed_files`). Lookups go by key alone: the manifest and index hold only
the redacted URI, which is for display.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache.errors import (
    ConflictError,
    InsufficientSpaceError,
    IntegrityError,
    ModelcacheError,
    NotFoundError,
    UsageError,
)
from modelcache.safepath import UnsafeNameError, join_under, printable
from modelcache.store.evict import Candidate
from modelcache.store.index import Index, IndexCorruptError, IndexRow
from modelcache.store.locks import FileLock, is_held
from modelcache.store.manifest import FileEntry, Manifest, load_manifest, save_manifest
from modelcache.uri import is_key, parse_uri, redact

META = ".modelcache"
HASH_BLOCK = 4 << 20
ROOT_MAX = 3000  # bytes: leaves room under Linux's 4096 for .modelcache/staging/<key>/<model path>
#: sha256 of a file of an adopted folder (store/adopt.py) not hashed yet: `verify --full` skips it.
UNHASHED_SHA256 = "0" * 64
log = logging.getLogger("modelcache")


def _expand(text: str, what: str) -> Path:
    """`~` and `~user` expanded, or a usage error (an unknown user is bad input, not a crash)."""
    if any(not c.isprintable() for c in text):
        raise UsageError(f"{what} {printable(text)!r}: control character in path")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # "Could not determine home directory."
        raise UsageError(f"{what} {printable(text)!r}: {exc} (unknown user?)") from exc


def check_root(root: Path) -> Path:
    """A cache root we can use as a path: printable, not too long, no segment over NAME_MAX."""
    text = str(root)
    if any(not c.isprintable() for c in text):
        raise UsageError(f"cache root {printable(text)!r}: control character in path")
    encoded = os.fsencode(text)
    if len(encoded) > ROOT_MAX or any(len(seg) > 255 for seg in encoded.split(b"/")):
        raise UsageError(f"cache root {printable(text, 80)!r}: path too long")
    return root


def default_root() -> Path:
    env = os.environ.get("MODELCACHE_HOME")
    if env:
        return _expand(env, "MODELCACHE_HOME")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modelcache"


def stat_problems(entries: list[FileEntry], seen: Mapping[str, os.stat_result | None]) -> list[str]:
    """Files whose kind, size or mtime differ from what was recorded at publish (pure).

    `seen` maps each entry's path to its lstat (None: missing). Cheap enough for every hit: one
    lstat per file, no reading. Catches appends and in-place writes through a hard link.
    """
    out: list[str] = []
    for f in entries:
        st = seen.get(f.path)
        name = printable(f.path)
        if st is None:
            out.append(f"{name}: missing")
        elif not stat.S_ISREG(st.st_mode):
            out.append(f"{name}: not a regular file")
        elif st.st_size != f.size:
            out.append(f"{name}: size {st.st_size} != {f.size}")
        elif f.mtime_ns is not None and st.st_mtime_ns != f.mtime_ns:
            out.append(f"{name}: modified after it was published")
    return out


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
        base = _expand(str(root), "--home") if root is not None else default_root()
        self.root = check_root(base.absolute())
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
        """Staging of `key`; a symlink planted there is removed (never followed)."""
        return self._own_dir(self.meta / "staging" / key)

    def _own_dir(self, path: Path) -> Path:
        """`path` in our metadata tree, with any symlink at it removed: scratch, so nothing is lost."""
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                log.warning("removed a symlink planted at %s (not following it)", printable(str(path)))
                path.unlink()
        except FileNotFoundError:
            pass
        return path

    def lock_path(self, key: str) -> Path:
        return self.meta / "locks" / f"{key}.lock"

    def lock(self, key: str) -> FileLock:
        self.ensure()
        return FileLock(self.lock_path(key))

    # -- lookup ------------------------------------------------------------------------------
    def key_for(self, ref: str) -> str:
        """A model reference is a URI, a local path, or a 16-hex key of a cached model.

        Always the key of the exact URI given (or the key itself): stored URIs are redacted, so
        they are never compared with `ref`.
        """
        if is_key(ref) and any(
            os.path.lexists(p) for p in (self.model_dir(ref), self.meta / "staging" / ref)
        ):
            return ref
        return parse_uri(ref).key

    def lookup(self, ref: str) -> ModelRecord | None:
        """The warm path: one indexed query and one lstat. None unless complete."""
        return self.lookup_key(self.key_for(ref))

    def lookup_key(self, key: str) -> ModelRecord | None:
        """The complete model stored under `key`, or None. A symlinked model directory is exit 4."""
        if not self.index.path.exists():
            return None
        try:
            row = self.index.get(key)
        except IndexCorruptError:
            self.repair()
            row = self.index.get(key)
        if row is None or not self._model_dir_ok(key):
            return None
        return self._record(row)

    def _model_dir_ok(self, key: str) -> bool:
        """Is models/<key> a real directory? A symlink there is refused, never handed out."""
        path = self.model_dir(key)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeNameError(
                f"model directory {printable(str(path))} is a symlink; refusing to follow it "
                f"(`modelcache rm --force {key}` and pull again)"
            )
        return stat.S_ISDIR(st.st_mode)

    def get(self, ref: str) -> ModelRecord:
        rec = self.lookup(ref)
        if rec is None:
            raise NotFoundError(f"not cached: {redact(ref)}")
        return rec

    def touch(self, key: str) -> None:
        """Record a use for LRU; best-effort, so `path` works on a full or busy disk."""
        try:
            self.index.touch(key)
        except IndexCorruptError:
            raise
        except ModelcacheError as exc:
            log.debug("last-used time of %s not updated: %s", key, exc)

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
                if d.is_symlink():
                    continue
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
        """The validated manifest of `key`: NotFoundError when there is none, exit 4 when damaged."""
        try:
            m = load_manifest(self.manifest_path(key))
            if m.key != key:
                raise ValueError(f"it names key {m.key}")
            return m
        except FileNotFoundError as exc:
            raise NotFoundError(f"not cached: {key}") from exc
        except ValueError as exc:
            raise IntegrityError(
                f"manifest of {key} is damaged ({printable(str(exc))}); "
                f"`modelcache rm --force {key}` and pull again"
            ) from exc

    # -- publish / remove --------------------------------------------------------------------
    def publish(self, files_dir: Path, manifest: Manifest) -> ModelRecord:
        """Make a verified staging tree visible as models/<key>, atomically."""
        key = manifest.key
        if not is_key(key):
            raise IntegrityError(f"refusing to publish under {printable(key)!r}: not a storage key")
        manifest.uri = redact(manifest.uri)  # at rest, never a password or a signed query
        self.ensure()
        st = os.lstat(files_dir)
        if not stat.S_ISDIR(st.st_mode):  # a symlink planted in staging must not become a model
            raise IntegrityError(f"refusing to publish {printable(str(files_dir))!r}: not a real directory")
        target = self.model_dir(key)
        if os.path.lexists(target) and self.in_use(key):
            raise ConflictError(f"models/{key} is in use; refusing to replace it")
        old = self.index.get(key)
        manifest.pinned = bool(old and old.pinned)
        _seal(files_dir, manifest.files)
        save_manifest(self.manifest_path(key), manifest)
        if os.path.lexists(target):
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
        """Delete a model. Pinned needs force; in use is refused always (a pod may be reading it).

        Works on a full disk (that is when people remove models): the directory goes to trash and
        is deleted first, the index row last and best-effort (`repair` drops a row without a model).
        """
        row = self.index.get(key)
        target = self.model_dir(key)
        if row is None and not os.path.lexists(target):
            raise NotFoundError(f"not cached: {key}")
        shown = printable(redact(row.uri)) if row else key
        if row is not None and row.pinned and not force:
            raise ConflictError(f"{shown} is pinned; unpin it or use --force")
        if self.in_use(key):
            raise ConflictError(f"{shown} is in use; stop its users first")
        size = row.size_bytes if row else 0
        if os.path.lexists(target):
            self._trash(target)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()
        self.empty_trash()
        try:
            self.index.delete(key)
        except IndexCorruptError:
            self.repair()
        except ModelcacheError as exc:
            log.warning("removed %s; its index row stays until the next repair: %s", key, exc)
        return size

    def discard_damaged(self, key: str) -> None:
        """Take a model whose files changed after publish out of the cache, in use or not.

        Callers hold the per-key download lock and have re-checked the damage under it, so a
        fresh copy published meanwhile is never thrown away. Readers that already linked the
        damaged files keep them; nobody new gets them.
        """
        target = self.model_dir(key)
        if os.path.lexists(target):
            self._trash(target)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()
        self.empty_trash()
        with contextlib.suppress(ModelcacheError):
            self.index.delete(key)

    def changed_files(self, key: str) -> list[str]:
        """Files of a published model that are missing or changed since publish (one lstat each)."""
        m = self.manifest(key)
        base = self.model_dir(key)
        if not self._model_dir_ok(key):
            return ["model directory missing"]
        seen: dict[str, os.stat_result | None] = {}
        for f in m.files:
            try:
                seen[f.path] = os.lstat(join_under(base, f.path, "manifest entry"))
            except (FileNotFoundError, NotADirectoryError):
                seen[f.path] = None
        return stat_problems(m.files, seen)

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
        trash = self._own_dir(self.meta / "trash")
        trash.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash / f"{path.name}.{os.urandom(4).hex()}")  # a symlink moves as itself

    def empty_trash(self) -> None:
        trash = self._own_dir(self.meta / "trash")
        if trash.is_dir():
            for p in trash.iterdir():
                if p.is_symlink() or not p.is_dir():
                    with contextlib.suppress(OSError):
                        p.unlink()
                else:
                    shutil.rmtree(p, ignore_errors=True)

    def clear_staging(self, key: str) -> None:
        shutil.rmtree(self.staging_dir(key), ignore_errors=True)

    # -- in use ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, key: str) -> Iterator[None]:
        """Mark a model in use for the duration (a reader holds it; gc and rm keep away)."""
        self._own_dir(self.meta / "leases" / key)
        lock = FileLock(self.meta / "leases" / key / f"{os.urandom(8).hex()}.lease")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def in_use(self, key: str) -> bool:
        d = self.meta / "leases" / key
        if d.is_symlink() or not d.is_dir():
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
        except IndexCorruptError as exc:  # damaged for good (disk fault, unsafe network fs): rebuild
            log.warning("%s; rebuilding it from the manifests", exc)
            self.index.discard()
            rows = {}
        # Anything else (busy, locked, disk full, I/O) propagates or is skipped below: a temporary
        # error must never cost the LRU times and pins that only the index holds.
        try:
            self._reconcile(rows)
        except (InsufficientSpaceError, ConflictError) as exc:
            log.warning("cache index not repaired now: %s", exc)

    def _reconcile(self, rows: dict[str, IndexRow]) -> None:
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
            if m.key != key:
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
            Candidate(
                r.key, r.size_bytes, r.last_used_at, pinned=r.pinned, in_use=self.in_use(r.key), uri=r.uri
            )
            for r in self.index.all()
        ]

    # -- verification ------------------------------------------------------------------------
    def verify(self, key: str, *, full: bool = False) -> list[str]:
        """Problems found (empty when fine). Fast: file set and sizes. Full: also every sha256.

        A missing or damaged manifest is a problem of this model, not an error that stops `verify`
        from checking the others. Nothing here follows a symlink.
        """
        try:
            m = self.manifest(key)
        except NotFoundError:
            return ["manifest missing"]
        except IntegrityError as exc:
            return [exc.message]
        try:
            if not self._model_dir_ok(key):
                return [f"{self.model_dir(key)}: model directory missing"]
        except UnsafeNameError as exc:
            return [exc.message]
        base = self.model_dir(key)
        found = _walk(base)
        expected = {f.path: f for f in m.files}
        problems = [f"{printable(rel)}: missing" for rel in sorted(expected.keys() - found.keys())]
        for rel in sorted(found.keys() - expected.keys()):
            problems.append(f"{printable(rel)}: unexpected {found[rel][0]}")
        for rel in sorted(expected.keys() & found.keys()):
            kind, size = found[rel]
            f = expected[rel]
            if kind != "file":
                problems.append(f"{printable(rel)}: is a {kind}, not a file")
            elif size != f.size:
                problems.append(f"{printable(rel)}: size {size} != {f.size}")
            elif full and f.sha256 != UNHASHED_SHA256 and sha256_file(base / rel) != f.sha256:
                problems.append(f"{printable(rel)}: sha256 mismatch")
        return problems


def _walk(base: Path) -> dict[str, tuple[str, int]]:
    """Every non-directory under `base` as (kind, size), without following symlinks."""
    found: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(base):  # followlinks=False
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = here / name
            st = os.lstat(p)
            rel = p.relative_to(base).as_posix()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("symlink", 0)
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("file", st.st_size)
            elif not stat.S_ISDIR(st.st_mode):
                found[rel] = ("special file", 0)
    return found


def _seal(files_dir: Path, entries: list[FileEntry]) -> None:
    """Make every published file read-only and record its mtime (see `changed_files`).

    Hard-linked copies share the inode: read-only stops a non-root pod from writing through
    its copy, and the recorded mtime lets the next reader notice a root one that did.
    """
    for f in entries:
        p = join_under(files_dir, f.path, "manifest entry")
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{printable(f.path)}: not a regular file; refusing to publish it")
        try:
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o222)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EROFS):
                raise
        f.mtime_ns = os.lstat(p).st_mtime_ns
