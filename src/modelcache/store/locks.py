"""Cross-process, cross-host locks that do not rely on flock (NFS / RWX volumes).

A lock is a file created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+). Its owner
refreshes the file's mtime every `heartbeat` seconds from a daemon thread. A waiter declares the
lock stale when either the owner is a dead process on the same host, or the lock's (token, mtime)
has not changed for `stale_after` seconds *as measured by the waiter's own monotonic clock* — so
clock skew between hosts sharing the volume cannot cause a false takeover. Takeover itself is
serialised by a second O_EXCL file, so two waiters cannot both break the same lock and then
delete each other's fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = os.uname().nodename


@dataclass(frozen=True)
class LockInfo:
    token: str
    host: str
    pid: int
    mtime_ns: int


def read_lock(path: Path) -> LockInfo | None:
    """Who holds the lock, or None when it is free (or being rewritten)."""
    try:
        st = path.stat()
        data = json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    return LockInfo(
        str(data.get("token", "")), str(data.get("host", "")), int(data.get("pid", 0)), st.st_mtime_ns
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An O_EXCL lock file with heartbeat and stale-lock takeover."""

    def __init__(self, path: Path, *, heartbeat: float = 2.0, stale_after: float = 15.0) -> None:
        self.path = path
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.token = os.urandom(8).hex()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[LockInfo, float] | None = None
        self.lost = False

    # -- acquisition -------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """One attempt; breaks the current lock if it is provably stale."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return True
        info = read_lock(self.path)
        if info is None:
            return False
        if self._is_stale(info):
            self._break(info)
            return self._create()
        return False

    def acquire(self, timeout: float | None = None, poll: float = 0.2) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    async def acquire_async(self, timeout: float | None = None, poll: float = 0.2) -> bool:
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"token": self.token, "host": HOST, "pid": os.getpid(), "since": time.time()}, f)
        self._start_heartbeat()
        return True

    def _is_stale(self, info: LockInfo) -> bool:
        if info.host == HOST and not _pid_alive(info.pid):
            return True
        now = time.monotonic()
        if self._seen is None or self._seen[0] != info:
            self._seen = (info, now)
            return False
        return now - self._seen[1] >= self.stale_after

    def _break(self, stale: LockInfo) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # Someone else is breaking it; if they died doing so, clear their guard later.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > self.stale_after * 2:
                    guard.unlink()
            return
        os.close(fd)
        try:
            current = read_lock(self.path)
            if current is not None and current.token == stale.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()
        self._seen = None

    # -- ownership ---------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"lock-heartbeat-{self.path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            info = read_lock(self.path)
            if info is None or info.token != self.token:
                self.lost = True
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        info = read_lock(self.path)
        if info is not None and info.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_held(path: Path, stale_after: float = 15.0) -> bool:
    """Best-effort: is someone alive holding this lock right now? (for `list` and eviction)"""
    info = read_lock(path)
    if info is None:
        return False
    if info.host == HOST:
        return _pid_alive(info.pid)
    return time.time() - info.mtime_ns / 1e9 < stale_after
