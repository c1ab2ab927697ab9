"""file:// and plain local paths: a directory (every regular file under it) or one file/archive."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path

from modelcache.errors import NotFoundError, SourceError, UsageError
from modelcache.sources.base import RemoteFile, Snapshot, Source, archive_kind, select

BLOCK = 1 << 20


class FileSource(Source):
    async def resolve(self) -> Snapshot:
        return await asyncio.to_thread(self._resolve)

    def _resolve(self) -> Snapshot:
        root = Path(self.uri.local_path)
        try:
            st = root.stat()
        except FileNotFoundError as exc:
            raise NotFoundError(f"no such file or directory: {root}") from exc
        except PermissionError as exc:
            raise SourceError(f"permission denied: {root}") from exc
        except NotADirectoryError as exc:
            raise NotFoundError(f"no such file or directory: {root} (a parent is not a directory)") from exc
        except (OSError, ValueError) as exc:  # name too long, NUL byte, ...
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot use {str(root)[:200]!r} as a model path: {reason}") from exc
        if root.is_file():
            f = RemoteFile(root.name, st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}", locator=str(root))
            return Snapshot((f,), revision=None, archive=archive_kind(root.name))
        if not root.is_dir():
            raise UsageError(f"not a regular file or directory: {root}")
        files: list[RemoteFile] = []

        def unreadable(exc: OSError) -> None:
            # A directory we cannot list would silently make an incomplete model: refuse instead.
            raise SourceError(f"cannot read {exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # no directory symlinks
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if not p.is_file():  # sockets, fifos, dangling links
                    continue
                s = p.stat()
                rel = p.relative_to(root).as_posix()
                files.append(RemoteFile(rel, s.st_size, etag=f"{s.st_size}-{s.st_mtime_ns}", locator=str(p)))
        files = select(files, self.options.include, self.options.exclude)
        if not files:
            raise NotFoundError(f"no files to copy under {root}")
        return Snapshot(tuple(files), revision=None)

    def supports_ranges(self, f: RemoteFile) -> bool:
        return True

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        try:
            fh = await asyncio.to_thread(open, f.locator, "rb", buffering=0)
        except OSError as exc:
            raise SourceError(f"cannot read {f.locator}: {exc.strerror}") from exc
        try:
            pos = start
            while end is None or pos < end:
                want = BLOCK if end is None else min(BLOCK, end - pos)
                data = await asyncio.to_thread(os.pread, fh.fileno(), want, pos)
                if not data:
                    break
                pos += len(data)
                yield data
        finally:
            fh.close()


SOURCE = FileSource
