"""The SQLite index: a fast, rebuildable view of the manifests.

Manifests (JSON next to it) are the truth about a model's files; the index exists so that a warm
lookup is one indexed query instead of a directory walk, and so that LRU order and pins survive.
If it is lost or corrupt it is rebuilt from the manifests (`Store.rebuild_index`).
"""

from __future__ import annotations

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


class Index:
    """Thin wrapper over one SQLite file in WAL mode; each call is its own short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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
