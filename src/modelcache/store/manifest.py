"""Per-model manifests: every file with size and sha256, the source revision, and times.

Written before a model is published and read to verify it; the index can be rebuilt from them.
Plain dataclasses rather than pydantic: `modelcache path` must start in well under 250 ms.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelcache.errors import InsufficientSpaceError, IntegrityError
from modelcache.safepath import UnsafeNameError, printable, safe_relpath
from modelcache.uri import is_key

MANIFEST_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_INT = (1 << 63) - 1


class ManifestError(IntegrityError, ValueError):
    """A manifest on disk (or in a bundle) is not one we could have written (exit 4).

    Also a ValueError, so callers written against the old `from_dict` keep working.
    """


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str
    #: st_mtime_ns of the published (read-only) file: a cheap check that nobody wrote to it since.
    mtime_ns: int | None = None


@dataclass
class Manifest:
    key: str
    uri: str
    created_at: float
    files: list[FileEntry]
    revision: str | None = None
    pinned: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        """Validate a manifest read from outside: every path through `safe_relpath`, every number sane.

        Manifests sit on a shared volume and travel in bundles, so `verify`, `show`, `rm`, `export`
        and the initializer must never act on a `../` entry or a size that is not a size.
        """
        if not isinstance(d, dict):
            raise ManifestError(f"invalid manifest: expected an object, got {type(d).__name__}")
        key = d.get("key")
        if not isinstance(key, str) or not is_key(key):
            raise ManifestError(f"invalid manifest: key {printable(repr(key), 40)} is not a storage key")
        uri = d.get("uri")
        if not isinstance(uri, str) or not uri:
            raise ManifestError("invalid manifest: uri is not a string")
        revision = d.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise ManifestError("invalid manifest: revision is not a string")
        source = d.get("source") or {}
        if not isinstance(source, dict):
            raise ManifestError("invalid manifest: source is not an object")
        return cls(
            key=key,
            uri=uri,
            created_at=_number(d.get("created_at"), "created_at"),
            files=_entries(d.get("files")),
            revision=revision,
            pinned=_flag(d.get("pinned", False), "pinned"),
            source=dict(source),
            version=_count(d.get("version", MANIFEST_VERSION), "version"),
        )


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ManifestError(f"invalid manifest: {what} is not a finite number")
    return float(v)


def _count(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_INT:
        raise ManifestError(f"invalid manifest: {what} is not a non-negative integer")
    return v


def _flag(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise ManifestError(f"invalid manifest: {what} is not true or false")
    return v


def _entries(raw: object) -> list[FileEntry]:
    """File entries: safe relative paths, each once, none inside another entry's path."""
    if not isinstance(raw, list):
        raise ManifestError("invalid manifest: files is not a list")
    out: list[FileEntry] = []
    seen: set[str] = set()
    for f in raw:
        if not isinstance(f, dict):
            raise ManifestError("invalid manifest: a file entry is not an object")
        try:
            path = safe_relpath(f.get("path"), "manifest entry")
        except UnsafeNameError as exc:
            raise ManifestError(f"invalid manifest: {exc.message}") from exc
        sha = f.get("sha256")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise ManifestError(f"invalid manifest: {printable(path)}: sha256 is not 64 hex digits")
        mtime = f.get("mtime_ns")
        entry = FileEntry(
            path=path,
            size=_count(f.get("size"), f"size of {printable(path)}"),
            sha256=sha,
            mtime_ns=None if mtime is None else _count(mtime, f"mtime_ns of {printable(path)}"),
        )
        if path in seen:
            raise ManifestError(f"invalid manifest: {printable(path)} is listed twice")
        seen.add(path)
        out.append(entry)
    for path in seen:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise ManifestError(f"invalid manifest: {printable(parent)} is both a file and a directory")
            parent = parent.rpartition("/")[0]
    return out


def write_json_atomic(path: Path, data: str) -> None:
    """tmp + fsync + rename: readers see the old file or the new one, never half of one.

    A full disk is exit 5 (and leaves no temporary file behind), not an internal error.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL|O_NOFOLLOW: a link planted at a predictable temporary name is never written through.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(f"no space left to write {path}") from exc
        raise


def save_manifest(path: Path, manifest: Manifest) -> None:
    write_json_atomic(path, json.dumps(manifest.to_dict(), indent=1))


def load_manifest(path: Path) -> Manifest:
    """The manifest at `path`: FileNotFoundError when there is none, ManifestError when damaged."""
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply
        raise ManifestError(f"invalid manifest: not JSON ({type(exc).__name__})") from exc
    except OSError as exc:
        raise ManifestError(f"unreadable manifest: {exc.strerror or exc}") from exc
    return Manifest.from_dict(data)
