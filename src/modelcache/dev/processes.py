"""Start, identify and stop the control plane's server processes.

Each server runs in its own session (so its own process group) and is stopped by signalling the whole
group. What is needed to find it again — pid, group and kernel start time — is plain data, so `down`
works from any process, and a recycled pid is never mistaken for ours. Linux only (reads /proc),
like the Debian binaries it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessRecord:
    """How to recognise one started server again, from any process."""

    name: str
    pid: int
    pgid: int
    start_ticks: int | None
    argv: tuple[str, ...]
    log: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "pgid": self.pgid,
            "start_ticks": self.start_ticks,
            "argv": list(self.argv),
            "log": str(self.log),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        ticks = data.get("start_ticks")
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            pgid=int(data["pgid"]),
            start_ticks=None if ticks is None else int(ticks),
            argv=tuple(str(a) for a in data.get("argv", ())),
            log=Path(str(data["log"])),
        )


@dataclass(frozen=True)
class _ProcStat:
    state: str
    pgid: int
    start_ticks: int


def _stat(pid: int) -> _ProcStat | None:
    """Parse /proc/<pid>/stat; None when the process does not exist."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    return _ProcStat(state=rest[0], pgid=int(rest[2]), start_ticks=int(rest[19]))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Callers retry on the rare race with another process."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(
    name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start `argv` in a new session with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    st = _stat(proc.pid)
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        pgid=proc.pid,
        start_ticks=st.start_ticks if st else None,
        argv=tuple(argv),
        log=log,
    )
    return proc, record


def _reap(pid: int) -> None:
    """Collect `pid` if it is our child and has exited, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_ours(record: ProcessRecord) -> bool:
    """True if the recorded leader still exists and is the same process (not a recycled pid)."""
    st = _stat(record.pid)
    if st is None:
        return False
    return record.start_ticks is None or st.start_ticks == record.start_ticks


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded leader is running (a zombie is dead)."""
    _reap(record.pid)
    st = _stat(record.pid)
    return st is not None and st.state != "Z" and is_ours(record)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = _stat(pid)
        if st is None or st.pgid != pgid:
            continue
        _reap(pid)
        st = _stat(pid)
        if st is not None and st.state != "Z":
            members.append(pid)
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(record: ProcessRecord, timeout: float = 15.0) -> None:
    """Stop the record's whole process group: SIGTERM, then SIGKILL after `timeout` seconds.

    If the leader's pid now belongs to an unrelated process (recycled), the group is left alone:
    it is not ours any more.
    """
    st = _stat(record.pid)
    if st is not None and not is_ours(record):
        return
    if not group_members(record.pgid):
        _reap(record.pid)
        return
    _signal_group(record.pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(record.pgid):
            return
        time.sleep(0.05)
    _signal_group(record.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(record.pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
