"""The one way a name from outside becomes a path inside the cache.

Every external name (URL segment, object key, listing entry, archive member, manifest entry, OCI
title, bundle member) goes through `safe_relpath` before it is joined under a directory we own, and
the join goes through `join_under`, which refuses to pass through a symlink. Keeping the rule in one
place is what lets us promise "nothing is written outside the cache root".
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelcache.errors import IntegrityError

NAME_MAX = 255  # bytes in one path segment (ext4, xfs, NFS)
PATH_MAX = 1024  # bytes in a relative path; the root adds to it and Linux stops at 4096


class UnsafeNameError(IntegrityError):
    """A name from outside would not be a plain relative path under our directory (exit 4)."""


def printable(text: str, limit: int = 200) -> str:
    """`text` for one line of output: control characters escaped, long text cut.

    Everything `str.isprintable` rejects is escaped: C0/C1 controls, line and paragraph separators,
    bidi overrides and lone surrogates (undecodable bytes in tar names), any of which could split
    a line, disguise a name or fail to encode on stderr.
    """
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def safe_relpath(name: object, what: str = "name", *, lenient: bool = False) -> str:
    """The posix relative path `name` denotes, or raise UnsafeNameError.

    Refused: non-strings, empty names, NUL or other control characters, backslashes, absolute
    paths, `..`, segments over NAME_MAX bytes, paths over PATH_MAX bytes. Strict mode also refuses
    `.` and empty segments (object keys and listings never need them); `lenient` drops them, as
    archives write `./a/b` and `dir/`. Returns '' only in lenient mode for a name like `./`.
    """
    if not isinstance(name, str):
        raise UnsafeNameError(f"unsafe {what}: not a string ({type(name).__name__})")
    shown = printable(name)
    if not name and not lenient:
        raise UnsafeNameError(f"unsafe {what}: empty name")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):  # C0, DEL and C1 controls
        raise UnsafeNameError(f"unsafe {what} {shown!r}: control character in name")
    if "\\" in name:
        raise UnsafeNameError(f"unsafe {what} {shown!r}: backslash in name")
    if name.startswith("/"):
        raise UnsafeNameError(f"unsafe {what} {shown!r}: absolute path")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafeNameError(f"unsafe {what} {shown!r}: not valid UTF-8") from exc
    if len(encoded) > PATH_MAX:
        raise UnsafeNameError(f"unsafe {what} {shown!r}: longer than {PATH_MAX} bytes")
    parts: list[str] = []
    for seg in name.split("/"):
        if seg == "..":
            raise UnsafeNameError(f"unsafe {what} {shown!r}: '..' would leave the model directory")
        if seg in ("", "."):
            if lenient:
                continue
            raise UnsafeNameError(f"unsafe {what} {shown!r}: empty or '.' path segment")
        if len(seg.encode("utf-8")) > NAME_MAX:
            raise UnsafeNameError(f"unsafe {what} {shown!r}: a segment is longer than {NAME_MAX} bytes")
        parts.append(seg)
    if not parts and not lenient:
        raise UnsafeNameError(f"unsafe {what} {shown!r}: no file name")
    return "/".join(parts)


def join_under(root: Path, rel: str, what: str = "name") -> Path:
    """`root / rel` for a `safe_relpath` result, refusing to pass through a symlink.

    Each existing component below `root` is lstat'ed: a symlink planted in our tree (by a hostile
    archive, a tampered cache or another user) is refused rather than followed.
    """
    rel = safe_relpath(rel, what, lenient=True)
    path = root
    for seg in rel.split("/") if rel else ():
        path = path / seg
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return root / rel  # nothing below a missing component (or a file) exists yet
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeNameError(f"unsafe {what} {printable(rel)!r}: {printable(seg)!r} is a symlink")
    return path


def real_dir(path: Path, what: str = "directory") -> Path:
    """mkdir -p `path`, refusing any existing component that is a symlink or not a directory.

    Staging and model trees are ours: a link planted inside them (`staging/<key>/files -> /etc`)
    must make the operation fail, not send our writes elsewhere.
    """
    missing: list[Path] = []
    p = path
    while True:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeNameError(f"{what} {printable(str(p))!r} is a symlink or not a directory")
        break
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise UnsafeNameError(
                    f"{what} {printable(str(d))!r} is a symlink or not a directory"
                ) from None
    return path


def write_nofollow(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file of our own without following a link planted at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def no_symlink(path: Path, what: str) -> Path:
    """Refuse a path of our own tree (staging, model directory) that is a symlink."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafeNameError(f"{what} {printable(str(path))!r} is a symlink; refusing to follow it")
    except FileNotFoundError:
        pass
    return path
