"""file:// and plain local paths: a directory (every regular file under it) or one file/archive.

A source tree may have been written by someone else (a shared PVC, another tenant, an unpacked
upload), and the node agent reads it as root, so links in it are hostile until checked:

- The path named in the URI is resolved once: it may itself be a link (a mount, `current -> v2`).
- Below it, a symbolic link is followed only if its fully resolved target stays inside that
  directory (for pvc://, inside the claim's mount; the path in the URI must stay there too).
  A link to a file becomes a file at the link's path; a link to a directory is walked (a loop
  is refused). A link that leaves the directory is refused with exit 4: a planted
  `x -> /etc/shadow` must never become part of a model that pods read. (A Hugging Face cache
  snapshot links into `../../blobs`: pull its hf:// URI instead, or copy it with `cp -rL` first.)
- Dangling links, sockets, fifos and devices are skipped with a warning: there are no bytes to copy.
- An entry we cannot list or read is exit 6 with one line, before anything is downloaded.
- Reads open the resolved file with O_NOFOLLOW and check it is the inode that was listed, so a
  file swapped for a link after the listing is refused too (exit 6).
- Relative paths go through `safe_relpath` like any other external name (exit 4).

The transfer engine opens each destination file; `transfer.py` bounds how many are open at once,
so a directory with more files than the open-file limit works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncGenerator
from pathlib import Path

from modelcache.errors import NotFoundError, SourceError, UsageError
from modelcache.safepath import UnsafeNameError, printable, safe_relpath
from modelcache.sources.base import RemoteFile, Snapshot, Source, archive_kind, select

log = logging.getLogger("modelcache")

BLOCK = 1 << 20


def _locator(path: str, st: os.stat_result) -> str:
    """What `read` opens: the resolved path, pinned to the inode the listing saw."""
    return f"{st.st_dev}:{st.st_ino}:{path}"


def _parse_locator(locator: str) -> tuple[int, int, str]:
    dev, ino, path = locator.split(":", 2)
    return int(dev), int(ino), path


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


class FileSource(Source):
    #: Where links may lead (resolved). None: the directory named in the URI. pvc:// sets the
    #: claim's mount, so links between a claim's directories work but never leave the claim.
    boundary: Path | None = None

    async def resolve(self) -> Snapshot:
        return await asyncio.to_thread(self._resolve)

    def _resolve(self) -> Snapshot:
        root = Path(self.uri.local_path)
        try:
            st = root.stat()
            real = os.path.realpath(root, strict=True)
        except FileNotFoundError as exc:
            raise NotFoundError(f"no such file or directory: {printable(str(root))}") from exc
        except PermissionError as exc:
            raise SourceError(f"permission denied: {printable(str(root))}") from exc
        except NotADirectoryError as exc:
            raise NotFoundError(
                f"no such file or directory: {printable(str(root))} (a parent is not a directory)"
            ) from exc
        except (OSError, ValueError) as exc:  # name too long, NUL byte, link loop ...
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot use {printable(str(root))!r} as a model path: {reason}") from exc
        limit = os.path.realpath(self.boundary) if self.boundary is not None else None
        if limit is not None and not _inside(real, limit):
            raise UnsafeNameError(
                f"{printable(str(root))!r} leads outside {printable(str(self.boundary))!r} "
                "through a symbolic link"
            )
        if stat.S_ISREG(st.st_mode):
            _check_readable(real, str(root))
            f = RemoteFile(
                root.name, st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}", locator=_locator(real, st)
            )
            return Snapshot((f,), revision=None, archive=archive_kind(root.name))
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"not a regular file or directory: {printable(str(root))}")
        files = select(_walk(real, str(root), limit or real), self.options.include, self.options.exclude)
        if not files:
            raise NotFoundError(f"no files to copy under {printable(str(root))}")
        return Snapshot(tuple(files), revision=None)

    def supports_ranges(self, f: RemoteFile) -> bool:
        return True

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        fd = await asyncio.to_thread(_open_listed, f)
        try:
            pos = start
            while end is None or pos < end:
                want = BLOCK if end is None else min(BLOCK, end - pos)
                try:
                    data = await asyncio.to_thread(os.pread, fd, want, pos)
                except OSError as exc:
                    raise SourceError(f"cannot read {printable(f.path)}: {exc.strerror}") from exc
                if not data:
                    break
                pos += len(data)
                yield data
        finally:
            os.close(fd)


def _check_readable(path: str, shown: str) -> None:
    if not os.access(path, os.R_OK):
        raise SourceError(f"cannot read {printable(shown)}: permission denied")


def _walk(real_root: str, shown_root: str, boundary: str) -> list[RemoteFile]:
    """Every regular file under real_root (links followed only inside `boundary`), sorted by path."""
    files: list[RemoteFile] = []
    root_st = os.stat(real_root)
    # (directory to list, its relative path, identities of the directories above it: loop check)
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (real_root, "", frozenset({(root_st.st_dev, root_st.st_ino)}))
    ]
    while stack:
        dirpath, rel_dir, above = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            # A directory we cannot list would silently make an incomplete model: refuse instead.
            where = os.path.join(shown_root, rel_dir) if rel_dir else shown_root
            raise SourceError(f"cannot read {printable(where)}: {exc.strerror}") from exc
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            shown = os.path.join(shown_root, rel)
            path = e.path
            try:
                if e.is_symlink():
                    target = os.path.realpath(path)
                    if not _inside(target, boundary):
                        raise UnsafeNameError(
                            f"symbolic link {printable(shown)!r} points outside {printable(boundary)!r}; "
                            "refusing to copy it (copy the files it points to into the directory instead)"
                        )
                    try:
                        st = os.stat(target)
                    except FileNotFoundError:
                        log.warning("skipping dangling symbolic link %s", printable(shown))
                        continue
                    path = target
                else:
                    st = e.stat(follow_symlinks=False)
            except FileNotFoundError as exc:
                raise SourceError(f"{printable(shown)} vanished while listing the directory") from exc
            except OSError as exc:
                raise SourceError(f"cannot read {printable(shown)}: {exc.strerror}") from exc
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in above:
                    raise UnsafeNameError(
                        f"symbolic link {printable(shown)!r} makes a loop; refusing to walk it"
                    )
                stack.append((path, rel, above | {ident}))
            elif stat.S_ISREG(st.st_mode):
                _check_readable(path, shown)
                safe = safe_relpath(rel, "file name")
                etag = f"{st.st_size}-{st.st_mtime_ns}"
                files.append(RemoteFile(safe, st.st_size, etag=etag, locator=_locator(path, st)))
            else:
                log.warning("skipping %s: not a regular file or directory", printable(shown))
    return sorted(files, key=lambda f: f.path)


def _open_listed(f: RemoteFile) -> int:
    """Open the file the listing saw: no link at its last component, and the same inode."""
    dev, ino, path = _parse_locator(f.locator)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot read {printable(f.path)}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceError(f"{printable(f.path)} was replaced since the directory was listed")
    return fd


SOURCE = FileSource
