"""The SQLite index: a fast, rebuildable view of the manifests.

Manifests (JSON next to it) are the truth about a model's files; the index exists so that a warm
lookup is one indexed query instead of a directory walk, and so that LRU order and pins survive.
If it is lost or corrupt it is rebuilt from the manifests (`Store.repair`).

Only real corruption ("file is not a database", "malformed") rebuilds it: a temporary error (busy,
locked, disk full, I/O) must keep it, since LRU times live only here and a rebuilt index would
make gc evict the wrong models. Reads keep working on a full disk (a read-only connection that
needs no shared-memory file); writes there are exit 5.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from modelcache.errors import ConflictError, InsufficientSpaceError, IntegrityError, ModelcacheError

log = logging.getLogger("modelcache")
T = TypeVar("T")

# Primary SQLite result codes (the low byte of an extended code).
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL = {13}  # SQLITE_FULL
_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_UNAVAILABLE = {8, 10, 14, 15}  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_PROTOCOL


class IndexCorruptError(IntegrityError):
    """The index file is damaged for good: set it aside and rebuild it from the manifests."""


def classify(code: int | None, message: str) -> str:
    """corrupt | full | busy | unavailable | other, from an SQLite error code or its message."""
    msg = message.lower()
    if code is not None:
        primary = code & 0xFF
        for kind, codes in (
            ("corrupt", _CORRUPT),
            ("full", _FULL),
            ("busy", _BUSY),
            ("unavailable", _UNAVAILABLE),
        ):
            if primary in codes:
                return kind
    if "not a database" in msg or "malformed" in msg:
        return "corrupt"
    if "disk is full" in msg or "no space" in msg:
        return "full"
    if "locked" in msg or "busy" in msg:
        return "busy"
    if "i/o error" in msg or "unable to open" in msg or "readonly" in msg or "read-only" in msg:
        return "unavailable"
    return "other"


def _kind(exc: sqlite3.Error) -> str:
    return classify(getattr(exc, "sqlite_errorcode", None), str(exc))


def translate(exc: sqlite3.Error, path: Path) -> ModelcacheError:
    """Our error (with its exit code) for an SQLite failure on the index at `path`."""
    kind = _kind(exc)
    if kind == "corrupt":
        return IndexCorruptError(f"cache index {path} is damaged ({exc})")
    if kind == "full":
        return InsufficientSpaceError(f"no space left on the device holding {path.parent.parent}")
    if kind == "busy":
        return ConflictError(f"cache index {path} is locked by another process ({exc}); try again")
    return ModelcacheError(f"cannot use cache index {path}: {exc}")


SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    revision TEXT,
    size_bytes INTEGER NOT NULL,
    file_count INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class IndexRow:
    key: str
    uri: str
    revision: str | None
    size_bytes: int
    file_count: int
    created_at: float
    last_used_at: float
    pinned: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Filesystems where several hosts may open the same file. SQLite's WAL needs shared memory,
#: which only works within one host, so there we use the rollback journal instead.
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "lustre",
    "9p",
    "fuse.sshfs",
    "gpfs",
    "beegfs",
    "fuse.s3fs",
    "fuse.juicefs",
    "efs",
}


def fs_type(path: Path) -> str:
    """Filesystem type holding `path` (from /proc/self/mountinfo; '' when unknown)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


class Index:
    """Thin wrapper over one SQLite file; each call is its own short transaction.

    WAL on local disks (readers never wait for the writer); the rollback journal on network
    filesystems shared by several hosts, where WAL's shared memory cannot work.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout  # seconds to wait for another process's lock before "busy" (exit 7)
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                mode = "delete" if fs_type(self.path.parent) in NETWORK_FS else "wal"
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != mode:
                    conn.execute(f"PRAGMA journal_mode={mode}")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _readonly(self) -> sqlite3.Connection | None:
        """A connection that writes nothing, not even WAL shared memory (for a full or read-only disk).

        `immutable` reads the main file alone, which is the whole index when no WAL is pending (the
        last writer checkpointed it on close). With a pending WAL the ordinary read-only mode is
        the only correct reader; it works when another process keeps the shared memory.
        """
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            pending = wal.stat().st_size > 0
        except OSError:
            pending = False
        mode = "ro" if pending else "ro&immutable=1"
        try:
            # as_uri() percent-encodes: a cache root holding '?', '#' or '%' must not open another file.
            uri = f"{self.path.absolute().as_uri()}?mode={mode}"
            return sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error:
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def discard(self) -> None:
        """Set a damaged index aside; the store rebuilds it from the manifests."""
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            p = self.path.with_name(self.path.name + suffix)
            if p.exists():
                os.replace(p, p.with_name(p.name + ".corrupt"))

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read; on a full/read-only/unreadable disk retry it on a read-only connection."""
        try:
            return query(self._db())
        except sqlite3.Error as exc:
            kind = _kind(exc)
            if kind not in ("full", "unavailable"):
                self.close()
                raise translate(exc, self.path) from exc
            self.close()
            conn = self._readonly()
            if conn is None:
                raise translate(exc, self.path) from exc
            try:
                log.debug("cache index: reading read-only (%s)", exc)
                return query(conn)
            except sqlite3.Error as exc2:
                if "no such table" in str(exc2):  # an index that never got its table: empty
                    empty = sqlite3.connect(":memory:")
                    empty.executescript(SCHEMA)
                    return query(empty)
                raise translate(exc if _kind(exc2) != "corrupt" else exc2, self.path) from exc2
            finally:
                conn.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._db().execute(sql, args)
        except sqlite3.Error as exc:
            self.close()  # a failed connection may be half set up; the next call starts afresh
            raise translate(exc, self.path) from exc

    @staticmethod
    def _row(r: tuple[Any, ...]) -> IndexRow:
        return IndexRow(r[0], r[1], r[2], int(r[3]), int(r[4]), float(r[5]), float(r[6]), bool(r[7]))

    _COLS = "key, uri, revision, size_bytes, file_count, created_at, last_used_at, pinned"

    def get(self, key: str) -> IndexRow | None:
        sql = f"SELECT {self._COLS} FROM models WHERE key = ?"
        r = self._read(lambda c: c.execute(sql, (key,)).fetchone())
        return None if r is None else self._row(r)

    def all(self) -> list[IndexRow]:
        sql = f"SELECT {self._COLS} FROM models ORDER BY last_used_at DESC"
        rows = self._read(lambda c: c.execute(sql).fetchall())
        return [self._row(r) for r in rows]

    def upsert(self, row: IndexRow) -> None:
        self._write(
            f"INSERT OR REPLACE INTO models ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.key,
                row.uri,
                row.revision,
                row.size_bytes,
                row.file_count,
                row.created_at,
                row.last_used_at,
                int(row.pinned),
            ),
        )

    def touch(self, key: str, when: float | None = None) -> None:
        self._write("UPDATE models SET last_used_at = ? WHERE key = ?", (when or time.time(), key))

    def set_pinned(self, key: str, pinned: bool) -> None:
        self._write("UPDATE models SET pinned = ? WHERE key = ?", (int(pinned), key))

    def delete(self, key: str) -> None:
        self._write("DELETE FROM models WHERE key = ?", (key,))
