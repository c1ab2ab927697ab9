"""Cross-process, cross-host locks that do not rely on flock (NFS / RWX volumes).

A lock is a file created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+). Its owner
refreshes the file's mtime every `heartbeat` seconds from a daemon thread. A waiter declares the
lock stale when either the owner is a dead process on the same host, or the lock's (token, mtime)
has not changed for `stale_after` seconds *as measured by the waiter's own monotonic clock* — so
clock skew between hosts sharing the volume cannot cause a false takeover. Takeover itself is
serialised by a second O_EXCL file, so two waiters cannot both break the same lock and then
delete each other's fresh one.

On the same host a PID alone proves nothing (PIDs are reused, and containers share numbers): the
owner's process start time is recorded too, and a lock whose heartbeat is older than `stale_after`
by the (shared) wall clock is stale whatever its PID. A lock file whose content is not ours
(garbage, truncated, tampered) is stale once it has not changed for `stale_after`, or is already
that old: a live owner writes its content right after creating the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from modelcache.safepath import printable

HOST = os.uname().nodename
log = logging.getLogger("modelcache")


@dataclass(frozen=True)
class LockInfo:
    token: str
    host: str
    pid: int
    mtime_ns: int
    start: int | None = None  # the owner's process start time (clock ticks since boot), if recorded
    valid: bool = True  # False: the file's content is not a lock we wrote (token is a digest of it)


def parse_lock(raw: bytes, mtime_ns: int) -> LockInfo:
    """What a lock file's bytes say. Never raises: garbage is a LockInfo with valid=False."""
    try:
        data = json.loads(raw.decode("utf-8"))
        token, host, pid = data["token"], data["host"], data["pid"]
        start = data.get("start")
        if not (isinstance(token, str) and token and isinstance(host, str) and host):
            raise ValueError("no token or host")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 31:
            raise ValueError("bad pid")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise ValueError("bad start")
        return LockInfo(token, host, pid, mtime_ns, start)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return LockInfo(f"garbage:{digest}", "", 0, mtime_ns, valid=False)


def read_lock(path: Path) -> LockInfo | None:
    """Who holds the lock, or None when it is free."""
    try:  # never through a symlink, never blocking on a planted FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # a symlink (ELOOP), a directory, unreadable: not a lock we wrote
        try:
            return parse_lock(b"<not a regular file>", os.lstat(path).st_mtime_ns)
        except OSError:
            return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 4096) if stat.S_ISREG(st.st_mode) else b"<not a regular file>"
    except OSError:
        raw = b"<unreadable>"
    finally:
        os.close(fd)
    return parse_lock(raw, st.st_mtime_ns)


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: int | None = None) -> bool:
    """Is the process that wrote the lock still running? A reused PID has another start time."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False
    return True


def same_host_stale(info: LockInfo, alive: bool, now: float, stale_after: float) -> bool:
    """Same host, same clock: stale when the owner is gone or its heartbeat stopped `stale_after` ago."""
    return not alive or now - info.mtime_ns / 1e9 >= stale_after


_my_start: dict[int, int | None] = {}


def _own_start() -> int | None:
    """This process's start time, per PID: a forked child must not record its parent's."""
    pid = os.getpid()
    if pid not in _my_start:
        _my_start[pid] = process_start(pid)
    return _my_start[pid]


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
        record = {"token": self.token, "host": HOST, "pid": os.getpid(), "since": time.time()}
        start = _own_start()
        if start is not None:
            record["start"] = start
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        self._start_heartbeat()
        return True

    def _is_stale(self, info: LockInfo) -> bool:
        if info.valid and info.host == HOST:
            if same_host_stale(info, _pid_alive(info.pid, info.start), time.time(), self.stale_after):
                return True
        elif not info.valid and time.time() - info.mtime_ns / 1e9 >= self.stale_after:
            return True  # garbage nobody has touched for a while (by our clock; no live owner writes it)
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
                if stale.valid:
                    log.info("breaking stale lock %s (owner %s pid %d)", self.path, stale.host, stale.pid)
                else:
                    log.warning(
                        "lock file %s has unreadable content (not a modelcache lock); treating it as stale",
                        printable(str(self.path)),
                    )
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
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
    """Best-effort: is someone alive holding this lock right now? (for `list`, `rm` and eviction)

    Same host: the owner process (PID and start time) is alive *and* its heartbeat is fresh, so a
    reused PID cannot keep a model "in use" forever. Other hosts: the heartbeat is fresh. Garbage
    content counts as held only while it is young (a lock being written is briefly empty).
    """
    info = read_lock(path)
    if info is None:
        return False
    now = time.time()
    if info.valid and info.host == HOST:
        return not same_host_stale(info, _pid_alive(info.pid, info.start), now, stale_after)
    return now - info.mtime_ns / 1e9 < stale_after
