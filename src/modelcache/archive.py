"""Safe archive extraction: regular files and directories only, every path checked before writing.

We reject (rather than silently skip) members with absolute paths, `..` components, links, devices
and fifos: an archive that tries to escape the model directory is not a model we want to serve.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from modelcache.errors import IntegrityError
from modelcache.store.manifest import FileEntry

BLOCK = 1 << 20


class UnsafeArchiveError(IntegrityError):
    """An archive member would land outside the model directory, or is not a plain file."""


def safe_member_path(name: str, root: Path) -> Path | None:
    """Where a member goes under root, or raise. None for the archive's own root entry ('./')."""
    if "\\" in name or "\x00" in name:
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: backslash or NUL in name")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: absolute path")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: '..' escapes the model directory")
    parts = [x for x in p.parts if x not in ("", ".")]
    if not parts:
        return None
    dest = root.joinpath(*parts)
    resolved_root = root.resolve()
    if not dest.resolve().is_relative_to(resolved_root):
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: escapes the model directory")
    return dest


def _write(src: IO[bytes], dest: Path, root: Path) -> FileEntry:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: never write through a link, even one that appeared by accident.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(BLOCK):
            h.update(block)
            out.write(block)
            size += len(block)
    return FileEntry(path=dest.relative_to(root).as_posix(), size=size, sha256=h.hexdigest())


def extract(archive: Path, kind: str, root: Path) -> list[FileEntry]:
    """Unpack into root (which must be empty), returning the manifest entries of what was written."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        return _extract_zip(archive, root)
    return _extract_tar(archive, root)


def _extract_tar(archive: Path, root: Path) -> list[FileEntry]:
    entries: list[FileEntry] = []
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            for m in tf:
                dest = safe_member_path(m.name, root)
                if m.isdir():
                    if dest is not None:
                        dest.mkdir(parents=True, exist_ok=True)
                    continue
                if not m.isreg():
                    kind = "link" if (m.issym() or m.islnk()) else "special file"
                    raise UnsafeArchiveError(f"unsafe archive member {m.name!r}: {kind} not allowed")
                if dest is None:
                    raise UnsafeArchiveError(f"unsafe archive member {m.name!r}: no file name")
                src = tf.extractfile(m)
                assert src is not None
                entries.append(_write(src, dest, root))
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise IntegrityError(f"{archive.name}: not a valid tar archive ({exc})") from exc
    return entries


def _extract_zip(archive: Path, root: Path) -> list[FileEntry]:
    entries: list[FileEntry] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                dest = safe_member_path(info.filename, root)
                if info.is_dir():
                    if dest is not None:
                        dest.mkdir(parents=True, exist_ok=True)
                    continue
                if mode and not stat.S_ISREG(mode):
                    kind = "link" if stat.S_ISLNK(mode) else "special file"
                    raise UnsafeArchiveError(f"unsafe archive member {info.filename!r}: {kind} not allowed")
                if dest is None:
                    raise UnsafeArchiveError(f"unsafe archive member {info.filename!r}: no file name")
                with zf.open(info) as src:
                    entries.append(_write(src, dest, root))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise IntegrityError(f"{archive.name}: not a valid zip archive ({exc})") from exc
    return entries
