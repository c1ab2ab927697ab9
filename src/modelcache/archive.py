"""Safe archive extraction: regular files and directories only, the whole archive checked first.

An archive is hostile until checked, so `extract` plans before it writes:

- every member name goes through `safepath.safe_relpath` (lenient: `./a` and `dir/` are fine);
  absolute paths, `..`, NUL (raw, or written as `%00`), control characters, empty and over-long
  names are refused; links, devices and fifos are refused, never followed or created;
- a name listed twice, or a file and a directory of the same name, is refused (which one wins
  would depend on the extractor: not a model we want to serve);
- the declared unpacked size is checked before the first byte is written against a cap
  (`MODELCACHE_MAX_UNPACK_RATIO` x the archive's size, default 200, never below 64 MiB;
  `MODELCACHE_MAX_UNPACK_BYTES` if set; at most `MODELCACHE_MAX_UNPACK_FILES` members, default
  100000), which a decompression bomb exceeds (exit 4), then against the free space (exit 5);
- while writing, no member may produce more bytes than it declared (zip headers can lie).

All of these are exit 4 (`IntegrityError`) and the engine then discards staging: no partial.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from modelcache.errors import InsufficientSpaceError, IntegrityError, ModelcacheError, UsageError
from modelcache.quantity import format_bytes
from modelcache.safepath import UnsafeNameError, join_under, printable, safe_relpath
from modelcache.sources.base import DEFAULT_MAX_FILES as MAX_LISTED_FILES
from modelcache.store.manifest import FileEntry

BLOCK = 1 << 20
MiB = 1 << 20
DEFAULT_RATIO = 200.0
DEFAULT_MAX_FILES = MAX_LISTED_FILES  # one default for how many files a model may have
RATIO_FLOOR = 64 * MiB  # small archives may always unpack to this much (tiny legit tarballs compress well)
ENTRY_OVERHEAD = 512  # bytes counted per member on top of its data: a million empty files is a bomb too

#: What an archive library raises for bytes that are not a valid archive (never our bug).
CORRUPT_ARCHIVE: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    UnicodeDecodeError,  # zip: a name flagged UTF-8 that is not
    NotImplementedError,  # zip: unsupported compression method
    RuntimeError,  # zip: encrypted member
)


class UnsafeArchiveError(UnsafeNameError):
    """An archive member would land outside the model directory, or is not a plain file (exit 4)."""


class ArchiveBombError(IntegrityError):
    """The archive unpacks to far more than its size or the configured cap allows (exit 4)."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def member_relpath(name: object, what: str = "archive member") -> str:
    """The relative path an archive member (or layer entry, bundle member) names; '' for `./`.

    `%00` is refused as well as a raw NUL: no model file has it in its name, and a tool that
    URL-decodes names would cut there."""
    if isinstance(name, str) and "%00" in name:
        raise UnsafeArchiveError(f"unsafe {what} {printable(name)!r}: NUL ('%00') in name")
    try:
        return safe_relpath(name, what, lenient=True)
    except UnsafeArchiveError:
        raise
    except UnsafeNameError as exc:
        raise UnsafeArchiveError(exc.message) from exc


def safe_member_path(name: str, root: Path) -> Path | None:
    """Where a member goes under root (no symlink on the way), or raise. None for `./`."""
    rel = member_relpath(name)
    return join_under(root, rel, "archive member") if rel else None


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnpackLimits:
    """How much an archive may unpack to (see the module docstring); read from the environment."""

    ratio: float = DEFAULT_RATIO  # 0: no ratio check
    max_bytes: int | None = None
    max_files: int = DEFAULT_MAX_FILES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UnpackLimits:
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not 0 <= value < float("inf"):
                raise UsageError(f"{name}={printable(raw, 40)!r} is not a non-negative number")
            return value

        max_bytes = number("MODELCACHE_MAX_UNPACK_BYTES", -1.0)
        return cls(
            ratio=number("MODELCACHE_MAX_UNPACK_RATIO", DEFAULT_RATIO),
            max_bytes=None if max_bytes < 0 else int(max_bytes),
            max_files=int(number("MODELCACHE_MAX_UNPACK_FILES", DEFAULT_MAX_FILES)),
        )


class UnpackBudget:
    """Bytes and members an unpack may still write; every member is reserved before it is written.

    Over the cap is a bomb (exit 4). Over the free space is exit 5: checked by `check_free` for a
    whole plan, and per member for layers unpacked one by one (`reserve(..., check_free=True)`).
    """

    def __init__(self, archive_bytes: int, what: str, limits: UnpackLimits | None = None) -> None:
        self.limits = limits or UnpackLimits.from_env()
        self.what = what
        self.archive_bytes = archive_bytes
        caps: list[int] = []
        if self.limits.ratio > 0:
            caps.append(max(RATIO_FLOOR, int(self.limits.ratio * archive_bytes)))
        if self.limits.max_bytes is not None:
            caps.append(self.limits.max_bytes)
        self.cap = min(caps) if caps else None
        self.used = 0
        self.members = 0

    def reserve(self, nbytes: int, name: str, *, free_at: Path | None = None) -> None:
        self.members += 1
        if self.members > self.limits.max_files:
            raise ArchiveBombError(
                f"{self.what}: more than {self.limits.max_files} members "
                "(raise MODELCACHE_MAX_UNPACK_FILES if this is expected)"
            )
        if nbytes < 0:
            raise UnsafeArchiveError(f"{self.what}: member {printable(name)!r} declares a negative size")
        self.used += nbytes + ENTRY_OVERHEAD
        if self.cap is not None and self.used > self.cap:
            why = (
                f"{self.limits.ratio:g}x its size of {format_bytes(self.archive_bytes)}"
                if self.limits.max_bytes is None or self.cap < self.limits.max_bytes
                else "MODELCACHE_MAX_UNPACK_BYTES"
            )
            raise ArchiveBombError(
                f"{self.what}: unpacks to more than {format_bytes(self.cap)} ({why}); a decompression "
                "bomb? (raise MODELCACHE_MAX_UNPACK_RATIO or MODELCACHE_MAX_UNPACK_BYTES if expected)"
            )
        if free_at is not None and nbytes > _free_bytes(free_at):
            raise InsufficientSpaceError(
                f"no space left for {self.what}: member {printable(name)!r} needs "
                f"{format_bytes(nbytes)} but only {format_bytes(_free_bytes(free_at))} is free "
                f"on the device holding {free_at}"
            )

    def check_free(self, root: Path) -> None:
        free = _free_bytes(root)
        if self.used > free:
            raise InsufficientSpaceError(
                f"no space left to unpack {self.what}: it unpacks to {format_bytes(self.used)} but only "
                f"{format_bytes(free)} is free on the device holding {root}"
            )


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _write(
    src: IO[bytes],
    dest: Path,
    root: Path,
    *,
    limit: int | None = None,
    exclusive: bool = False,
    name: str = "",
) -> FileEntry:
    """Copy `src` to `dest` (never through a link), hashing; at most `limit` bytes (its declared size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(dest, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(BLOCK if limit is None else min(BLOCK, limit - size + 1)):
            size += len(block)
            if limit is not None and size > limit:
                raise UnsafeArchiveError(
                    f"member {printable(name or dest.name)!r} holds more bytes than its header declares "
                    f"({limit})"
                )
            h.update(block)
            out.write(block)
    return FileEntry(path=dest.relative_to(root).as_posix(), size=size, sha256=h.hexdigest())


def os_error(exc: OSError, what: str) -> ModelcacheError:
    """An OSError while unpacking as one of our errors: full disk is 5, a name the disk refuses 4."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(f"no space left to unpack {what}")
    if exc.errno in (
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EILSEQ,
        errno.EINVAL,
    ):
        return UnsafeArchiveError(f"{what}: cannot unpack a member: {reason}")
    return ModelcacheError(f"cannot unpack {what}: {reason}")


# --------------------------------------------------------------------------------------------
# Planning: every member checked before anything is written
# --------------------------------------------------------------------------------------------
class TreeCheck:
    """Refuses a second file of the same name and a name used as both a file and a directory."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def _parents(self, rel: str, shown: str) -> None:
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.dirs:
            if parent in self.files:
                raise UnsafeArchiveError(
                    f"unsafe {self.what} {printable(shown)!r}: "
                    f"{printable(parent)!r} is both a file and a directory"
                )
            self.dirs.add(parent)
            parent = parent.rpartition("/")[0]

    def add_file(self, rel: str, shown: str) -> None:
        if rel in self.files:
            raise UnsafeArchiveError(f"unsafe {self.what} {printable(shown)!r}: listed twice")
        if rel in self.dirs:
            raise UnsafeArchiveError(f"unsafe {self.what} {printable(shown)!r}: both a file and a directory")
        self._parents(rel, shown)
        self.files.add(rel)

    def add_dir(self, rel: str, shown: str) -> None:
        if rel in self.files:
            raise UnsafeArchiveError(f"unsafe {self.what} {printable(shown)!r}: both a file and a directory")
        self._parents(rel, shown)
        self.dirs.add(rel)


def _plan(
    members: Iterable[tuple[str, str, int, Any]], budget: UnpackBudget
) -> Iterator[tuple[str, str, int, Any]]:
    """Check (name, kind, size, handle) members; yield (rel, kind, size, handle) of what to write."""
    tree = TreeCheck("archive member")
    for name, kind, size, handle in members:
        rel = member_relpath(name)
        if kind == "dir":
            budget.reserve(0, name)
            if rel:
                tree.add_dir(rel, name)
                yield rel, kind, 0, handle
            continue
        if kind != "file":
            raise UnsafeArchiveError(f"unsafe archive member {printable(name)!r}: {kind} not allowed")
        if not rel:
            raise UnsafeArchiveError(f"unsafe archive member {printable(name)!r}: no file name")
        tree.add_file(rel, name)
        budget.reserve(size, name)
        yield rel, kind, size, handle


def extract(archive: Path, kind: str, root: Path, limits: UnpackLimits | None = None) -> list[FileEntry]:
    """Unpack into root (which must be empty), returning the manifest entries of what was written."""
    root.mkdir(parents=True, exist_ok=True)
    budget = UnpackBudget(archive.stat().st_size, printable(archive.name), limits)
    label = "zip" if kind == "zip" else "tar"
    with _archive_errors(archive.name, label):
        if kind == "zip":
            return _extract_zip(archive, root, budget)
        return _extract_tar(archive, root, budget)


def extract_tar_following(
    src: IO[bytes], name: str, size: int, root: Path, limits: UnpackLimits | None = None
) -> list[FileEntry]:
    """Unpack a tar (any compression) from `src` in one pass, each member checked as it comes.

    For an archive still downloading (`src` waits for bytes): nothing can be planned before the
    first write, so every check of `extract` runs per member instead (names, tree, budget, free
    space). Writing goes to a staging directory the engine discards on any error, so a bad member
    late in the archive still leaves nothing visible. `root` is emptied first (a resumed pull)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    budget = UnpackBudget(size, printable(name), limits)
    with _archive_errors(name, "tar"), tarfile.open(fileobj=src, mode="r:*") as tf:

        def checked(m: tarfile.TarInfo) -> tuple[str, str, int, Any]:
            if m.size > _free_bytes(root):
                raise InsufficientSpaceError(
                    f"no space left to unpack {printable(name)}: member {printable(m.name)!r} needs "
                    f"{format_bytes(m.size)} but only {format_bytes(_free_bytes(root))} is free"
                )
            return m.name, _tar_kind(m), m.size, m

        def open_member(m: tarfile.TarInfo) -> IO[bytes]:
            member = tf.extractfile(m)
            assert member is not None
            return member

        return _write_planned(_plan(map(checked, tf), budget), root, open_member)


@contextlib.contextmanager
def _archive_errors(name: str, label: str) -> Iterator[None]:
    """Library and OS errors of an unpack as ours: corrupt bytes 4, full disk 5."""
    shown = printable(name)
    try:
        yield
    except ModelcacheError:
        raise
    except OSError as exc:
        if exc.errno is None:  # gzip/bz2 say "not a valid stream" as an OSError without errno
            raise IntegrityError(f"{shown}: not a valid {label} archive ({exc})") from exc
        raise os_error(exc, shown) from exc
    except CORRUPT_ARCHIVE as exc:
        reason = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)
        raise IntegrityError(f"{shown}: not a valid {label} archive ({reason})") from exc


def _write_planned(
    plan: Iterable[tuple[str, str, int, Any]], root: Path, open_member: Callable[[Any], IO[bytes]]
) -> list[FileEntry]:
    """Write planned members in order; `plan` may be lazy (each member checked just before)."""
    entries: list[FileEntry] = []
    for rel, kind, size, handle in plan:
        dest = join_under(root, rel, "archive member")
        if kind == "dir":
            dest.mkdir(parents=True, exist_ok=True)
            continue
        with open_member(handle) as src:
            entries.append(_write(src, dest, root, limit=size, exclusive=True, name=rel))
    return entries


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "dir"
    if m.isreg():
        return "file"
    return "link" if (m.issym() or m.islnk()) else "special file"


def _extract_tar(archive: Path, root: Path, budget: UnpackBudget) -> list[FileEntry]:
    with tarfile.open(archive, mode="r:*") as tf:
        # Iterating reads headers only (data is skipped), and the budget stops a bomb early.
        plan = list(_plan(((m.name, _tar_kind(m), m.size, m) for m in tf), budget))
        budget.check_free(root)

        def open_member(m: tarfile.TarInfo) -> IO[bytes]:
            src = tf.extractfile(m)
            assert src is not None
            return src

        return _write_planned(plan, root, open_member)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """A zip entry's type: the high 16 bits of external_attr hold a Unix st_mode when the creator set
    one. No file-type bits (DOS/Windows zips, many tools) means a regular file; '/' means a directory."""
    mode = info.external_attr >> 16
    if info.filename.endswith("/") or stat.S_ISDIR(mode):  # not is_dir(): it fails on an empty name
        return "dir"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):
        return "file"
    return "link" if stat.S_ISLNK(mode) else "special file"


def _extract_zip(archive: Path, root: Path, budget: UnpackBudget) -> list[FileEntry]:
    with zipfile.ZipFile(archive) as zf:
        members: list[tuple[str, str, int, Any]] = []
        for info in zf.infolist():
            if "\x00" in info.orig_filename:  # zipfile silently cuts the name at the NUL
                raise UnsafeArchiveError(
                    f"unsafe archive member {printable(info.orig_filename)!r}: NUL in name"
                )
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"archive member {printable(info.filename)!r} is encrypted")
            members.append((info.filename, _zip_kind(info), info.file_size, info))
        plan = list(_plan(members, budget))
        budget.check_free(root)

        def open_member(info: zipfile.ZipInfo) -> IO[bytes]:
            return zf.open(info)

        return _write_planned(plan, root, open_member)
