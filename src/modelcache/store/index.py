"""The SQLite index: a fast, rebuildable view of the manifests.

Manifests (JSON next to it) are the truth about a model's files; the index exists so that a warm
lookup is one indexed query instead of a directory walk, and so that LRU order and pins survive.
If it is lost or corrupt it is rebuilt from the manifests (`Store.rebuild_index`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            mode = "delete" if fs_type(self.path.parent) in NETWORK_FS else "wal"
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != mode:
                conn.execute(f"PRAGMA journal_mode={mode}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

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

    @staticmethod
    def _row(r: tuple[Any, ...]) -> IndexRow:
        return IndexRow(r[0], r[1], r[2], int(r[3]), int(r[4]), float(r[5]), float(r[6]), bool(r[7]))

    _COLS = "key, uri, revision, size_bytes, file_count, created_at, last_used_at, pinned"

    def get(self, key: str) -> IndexRow | None:
        r = self._db().execute(f"SELECT {self._COLS} FROM models WHERE key = ?", (key,)).fetchone()
        return None if r is None else self._row(r)

    def all(self) -> list[IndexRow]:
        rows = self._db().execute(f"SELECT {self._COLS} FROM models ORDER BY last_used_at DESC").fetchall()
        return [self._row(r) for r in rows]

    def upsert(self, row: IndexRow) -> None:
        self._db().execute(
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
        self._db().execute("UPDATE models SET last_used_at = ? WHERE key = ?", (when or time.time(), key))

    def set_pinned(self, key: str, pinned: bool) -> None:
        self._db().execute("UPDATE models SET pinned = ? WHERE key = ?", (int(pinned), key))

    def delete(self, key: str) -> None:
        self._db().execute("DELETE FROM models WHERE key = ?", (key,))
