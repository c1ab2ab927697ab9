"""The source protocol: resolve a URI to an immutable snapshot, then read byte ranges.

Each scheme is one module implementing `Source`. The transfer engine owns concurrency, retries,
resume and verification, so a source only says what exists and streams the bytes it is asked for.
"""

from __future__ import annotations

import fnmatch
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Generic, TypeVar

from modelcache.errors import IntegrityError, SourceError, UsageError
from modelcache.safepath import printable
from modelcache.store.manifest import FileEntry
from modelcache.uri import ModelURI, redact

ARCHIVE_SUFFIXES: dict[str, str] = {
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tar.xz": "tar",
    ".zip": "zip",
}


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


T = TypeVar("T")


@dataclass(frozen=True)
class Follower(Generic[T]):
    """Read `path` of a snapshot in order while it downloads: `consume(stream)` runs in a thread
    (the transfer engine feeds it the written prefix; see `modelcache.transfer.FollowReader`)."""

    path: str
    consume: Callable[[IO[bytes]], T]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a snapshot. `path` is relative (posix) inside the model directory."""

    path: str
    size: int | None
    sha256: str | None = None
    etag: str | None = None
    locator: str = ""  # what the source needs to read it: URL, absolute path, object key
    modified: str | None = None  # Last-Modified, where that is the only validator an origin gives


@dataclass(frozen=True)
class Snapshot:
    files: tuple[RemoteFile, ...]
    revision: str | None = None
    archive: str | None = None  # "tar" | "zip": the one file is an archive to unpack
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class SourceOptions:
    """What a pull asks of a source. `env` is where credentials and endpoints are read from: the
    process environment for the CLI, a per-model mapping built from Secrets for the node agent."""

    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    connect_timeout: float = float(os.environ.get("MODELCACHE_CONNECT_TIMEOUT", "10"))
    read_timeout: float = float(os.environ.get("MODELCACHE_READ_TIMEOUT", "30"))
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)


#: How many files one model may list unless MODELCACHE_MAX_FILES says otherwise; as many as an
#: archive may unpack (MODELCACHE_MAX_UNPACK_FILES).
DEFAULT_MAX_FILES = 100_000


class ListingCap:
    """Counts a paginated listing as it arrives and refuses it past MODELCACHE_MAX_FILES entries.

    A store whose listing does not end (or a prefix that names a whole bucket) is refused while the
    list is still small, not once the agent has run out of memory: pages keep coming for as long as
    the resolve deadline allows."""

    def __init__(self, what: str) -> None:
        self.what = what
        raw = os.environ.get("MODELCACHE_MAX_FILES", "").strip()
        if not raw:
            self.cap = DEFAULT_MAX_FILES
        elif raw.isdigit() and int(raw) > 0:
            self.cap = int(raw)
        else:
            raise UsageError(
                f"MODELCACHE_MAX_FILES must be a positive whole number, not {printable(raw, 40)!r}"
            )

    def check(self, count: int) -> None:
        if count > self.cap:
            raise SourceError(
                f"{self.what}: the listing names more than {self.cap} files; narrow the URI or "
                "--include, or raise MODELCACHE_MAX_FILES if a model really has that many"
            )


def select(files: list[RemoteFile], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[RemoteFile]:
    """Apply --include / --exclude globs (fnmatch on the relative path)."""
    out = []
    for f in files:
        if include and not any(fnmatch.fnmatch(f.path, g) for g in include):
            continue
        if any(fnmatch.fnmatch(f.path, g) for g in exclude):
            continue
        out.append(f)
    return out


class Source(ABC):
    #: Whether `--revision` means anything to this source (HF branches/tags/commits do).
    supports_revision: bool = False

    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        self.uri = uri
        self.options = options

    @property
    def shown(self) -> str:
        """The URI as every message shows it: no password, no signed query, no control characters."""
        return printable(redact(self.uri.uri), 300)

    @abstractmethod
    async def resolve(self) -> Snapshot:
        """List the files and pin a revision. Raises NotFoundError, AuthError, SourceError."""

    @abstractmethod
    def supports_ranges(self, f: RemoteFile) -> bool:
        """Whether `read` may start anywhere (parallel chunks, resume)."""

    @abstractmethod
    def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        """Stream bytes [start, end). Raise TransientSourceError for anything worth retrying."""

    def follower(self, snapshot: Snapshot, files_dir: Path) -> Follower[list[FileEntry]] | None:
        """Unpack the archive while it downloads, when it can be read front to back (a tar, any
        compression; a zip's directory is at its end). None: `finalize` after the download."""
        f = snapshot.files[0]
        size = f.size
        if snapshot.archive != "tar" or len(snapshot.files) != 1 or size is None:
            return None
        from modelcache.archive import extract_tar_following

        def consume(src: IO[bytes]) -> list[FileEntry]:
            entries = extract_tar_following(src, f.path, size, files_dir)
            if not entries:
                raise IntegrityError(f"{f.path}: archive holds no files")
            return entries

        return Follower(f.path, consume)

    def finalize(self, snapshot: Snapshot, download_dir: Path, files_dir: Path) -> list[FileEntry]:
        """Build the model tree from a downloaded, verified archive snapshot (runs in a thread).

        The default unpacks the one archive file safely; sources whose snapshots are several
        layers (OCI images) override it. Returns the manifest entries of every file written.
        """
        from modelcache.archive import extract

        entries = extract(download_dir / snapshot.files[0].path, snapshot.archive or "tar", files_dir)
        if not entries:
            raise IntegrityError(f"{snapshot.files[0].path}: archive holds no files")
        return entries

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
