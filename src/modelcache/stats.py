"""Usage log of a shared cache volume (seed 003's pattern): each `initialize` hit and miss, as data.

Many pods on many nodes write at once to an RWX volume (NFS, EFS, Filestore), where flock and
O_APPEND between clients cannot be trusted. So every process appends to its *own* JSON-lines file,
`.modelcache/stats/<host>-<pid>-<random>.jsonl`, one O_APPEND write per event (a line is far below
a page, so even a torn write on a crash loses one line, never another process's). Readers merge
all files and skip lines they cannot parse (the volume is writable by every pod: input is hostile).

`gc` compacts: it claims idle files by renaming them (a rename succeeds for exactly one claimer;
the claim's name holds its time, as a rename keeps the old mtime),
writes their lines into one new file (temp + rename), then deletes the claims. A claim left by a
crashed gc is adopted by the next one after an hour. Writers open, append and close per event, so
a file renamed away is never written again: a later event creates a fresh file.

`summarize` is pure (events + models + volume in, figures out); `prometheus` renders the same
figures in the text exposition format for a textfile collector (see README, "Shared-PVC pattern").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelcache.safepath import printable
from modelcache.uri import redact

log = logging.getLogger("modelcache")

STATS_DIR = Path(".modelcache") / "stats"
IDLE_SECONDS = 300.0  # a per-process file untouched this long is compacted
STALE_CLAIM_SECONDS = 3600.0  # a claim older than this was left by a crashed gc
MAX_LINE = 2048
MAX_FILE = 64 << 20  # a file larger than this is not ours (or not sane): skipped
_TOKEN = os.urandom(4).hex()
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Event:
    """One `initialize` against the cache: a hit (served from the cache) or a miss (downloaded)."""

    ts: float
    key: str
    uri: str  # redacted
    hit: bool
    mode: str  # link | copy
    bytes: int
    seconds: float

    @staticmethod
    def parse(line: str) -> Event | None:
        """An event from one line, or None for anything malformed (never raises)."""
        try:
            d = json.loads(line)
            ev = Event(
                ts=float(d["ts"]),
                key=str(d["key"])[:64],
                uri=str(d.get("uri", ""))[:1000],
                hit=d["hit"] is True,
                mode="link" if d.get("mode") == "link" else "copy",
                bytes=int(d["bytes"]),
                seconds=float(d["seconds"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            return None
        if not all(math.isfinite(x) and x >= 0 for x in (ev.ts, ev.seconds)) or ev.bytes < 0:
            return None
        return ev


def stats_dir(root: Path) -> Path:
    return root / STATS_DIR


def _own_file() -> str:
    host = _SAFE.sub("_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{_TOKEN}.jsonl"


def record(root: Path, event: Event) -> None:
    """Append one event to this process's file. Best effort: a full or read-only volume must not
    fail a pod start over statistics."""
    ev = Event(**{**asdict(event), "uri": redact(event.uri)})
    line = (json.dumps(asdict(ev), separators=(",", ":")) + "\n").encode()
    if len(line) > MAX_LINE:
        line = (json.dumps({**asdict(ev), "uri": ""}, separators=(",", ":")) + "\n").encode()
    try:
        d = stats_dir(root)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / _own_file(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("usage not recorded in %s: %s", printable(str(root)), exc.strerror or exc)


def _lines(path: Path) -> Iterator[str]:
    """Lines of a regular file we may read, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            return
        for raw in f:
            if len(raw) <= MAX_LINE:
                yield raw.decode("utf-8", "replace")


def read_events(root: Path, since: float | None = None) -> list[Event]:
    """Every recorded event (at or after `since`), oldest first."""
    d = stats_dir(root)
    if not d.is_dir() or d.is_symlink():
        return []
    out: list[Event] = []
    for p in d.glob("*.jsonl"):
        for line in _lines(p):
            ev = Event.parse(line)
            if ev is not None and (since is None or ev.ts >= since):
                out.append(ev)
    out.sort(key=lambda e: e.ts)
    return out


def compact(root: Path, now: float | None = None, idle: float = IDLE_SECONDS) -> int:
    """Merge idle per-process files into one; returns how many files were merged. Safe to run from
    several gc processes at once (each file is claimed by rename by exactly one of them)."""
    d = stats_dir(root)
    if not d.is_dir() or d.is_symlink():
        return 0
    now = time.time() if now is None else now
    mine = f".claim-{int(now)}-{os.getpid()}-{os.urandom(4).hex()}-"  # when: renames keep mtime
    claimed: list[Path] = []
    for p in sorted(d.iterdir()):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        stale_claim = p.name.startswith(".claim-") and _claimed_at(p.name) < now - STALE_CLAIM_SECONDS
        idle_log = p.suffix == ".jsonl" and not p.name.startswith(".") and st.st_mtime < now - idle
        if not (stale_claim or idle_log):
            continue
        target = d / f"{mine}{len(claimed)}"
        try:
            os.rename(p, target)
        except FileNotFoundError:  # another gc claimed it first
            continue
        claimed.append(target)
    if len(claimed) < 2:
        for c in claimed:  # one file: nothing to merge, put it back under a log name
            os.rename(c, d / f"compacted-{int(now)}-{os.urandom(4).hex()}.jsonl")
        return 0
    tmp = d / f".tmp-{os.urandom(4).hex()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for c in claimed:
            for line in _lines(c):
                if Event.parse(line) is not None:
                    out.write(line if line.endswith("\n") else line + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, d / f"compacted-{int(now)}-{os.urandom(4).hex()}.jsonl")
    for c in claimed:
        with contextlib.suppress(FileNotFoundError):
            c.unlink()
    return len(claimed)


def _claimed_at(name: str) -> float:
    """The time in a claim's name (`.claim-<unix time>-...`); unreadable: long ago."""
    try:
        return float(name.split("-")[1])
    except (IndexError, ValueError):
        return 0.0


# -- figures (pure) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Volume:
    total: int
    used: int
    free: int


@dataclass
class Summary:
    since: float | None
    now: float
    models: int
    size_bytes: int
    volume: Volume | None
    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_downloaded: int = 0
    hit_seconds: float = 0.0
    miss_seconds: float = 0.0
    time_saved_seconds: float = 0.0
    modes: dict[str, int] = field(default_factory=dict)

    @property
    def starts(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.starts if self.starts else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "now": self.now,
            "models": self.models,
            "size_bytes": self.size_bytes,
            "volume": asdict(self.volume) if self.volume else None,
            "starts": self.starts,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "bytes_served": self.bytes_served,
            "bytes_downloaded": self.bytes_downloaded,
            "hit_seconds": round(self.hit_seconds, 3),
            "miss_seconds": round(self.miss_seconds, 3),
            "time_saved_seconds": round(self.time_saved_seconds, 3),
            "modes": self.modes,
        }


def summarize(
    events: Iterable[Event],
    *,
    models: int,
    size_bytes: int,
    volume: Volume | None,
    since: float | None,
    now: float,
) -> Summary:
    """Figures over the window [since, now]. Time saved by a hit = what a miss of that model took
    (its own misses, any time; else the size at the volume's mean download rate) minus the hit's
    own time; a hit with no miss to compare with saves nothing we can claim."""
    all_events = list(events)
    miss_by_key: dict[str, list[float]] = {}
    miss_bytes = miss_secs = 0.0
    for e in all_events:
        if not e.hit:
            miss_by_key.setdefault(e.key, []).append(e.seconds)
            miss_bytes += e.bytes
            miss_secs += e.seconds
    rate = miss_bytes / miss_secs if miss_secs > 0 else None
    s = Summary(since=since, now=now, models=models, size_bytes=size_bytes, volume=volume)
    for e in all_events:
        if since is not None and e.ts < since:
            continue
        s.modes[e.mode] = s.modes.get(e.mode, 0) + 1
        s.bytes_served += e.bytes
        if e.hit:
            s.hits += 1
            s.hit_seconds += e.seconds
            own = miss_by_key.get(e.key)
            cold = sum(own) / len(own) if own else (e.bytes / rate if rate else None)
            if cold is not None:
                s.time_saved_seconds += max(0.0, cold - e.seconds)
        else:
            s.misses += 1
            s.miss_seconds += e.seconds
            s.bytes_downloaded += e.bytes
    return s


def observe(root: Path, since: float | None, now: float) -> Summary:
    """The figures for the cache at `root` (I/O: index, usage log, statvfs)."""
    from modelcache.store import Store

    store = Store(root)
    complete = [r for r in store.list_models() if r.state == "complete"]
    volume = None
    with contextlib.suppress(OSError):
        du = shutil.disk_usage(root)
        volume = Volume(du.total, du.used, du.free)
    return summarize(
        read_events(root),
        models=len(complete),
        size_bytes=sum(r.size_bytes for r in complete),
        volume=volume,
        since=since,
        now=now,
    )


def prometheus(s: Summary) -> str:
    """The summary in Prometheus' text exposition format (window figures are gauges)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("modelcache_cache_models", "gauge", "Complete models in the cache.", [("", s.models)])
    metric("modelcache_cache_size_bytes", "gauge", "Bytes of complete models.", [("", s.size_bytes)])
    if s.volume:
        metric(
            "modelcache_volume_bytes",
            "gauge",
            "The cache volume: total, used and free bytes.",
            [(f'{{kind="{k}"}}', v) for k, v in asdict(s.volume).items()],
        )
    metric(
        "modelcache_initialize_window",
        "gauge",
        "Initializations in the reported window, by result.",
        [('{result="hit"}', s.hits), ('{result="miss"}', s.misses)],
    )
    metric(
        "modelcache_initialize_mode_window",
        "gauge",
        "Initializations in the window by how DEST was filled (link or copy).",
        [(f'{{mode="{m}"}}', n) for m, n in sorted(s.modes.items())],
    )
    metric("modelcache_hit_ratio", "gauge", "Hits / starts in the window.", [("", s.hit_rate or 0.0)])
    metric(
        "modelcache_time_saved_seconds_window",
        "gauge",
        "Seconds of pod start time saved by hits in the window (estimated).",
        [("", round(s.time_saved_seconds, 3))],
    )
    metric(
        "modelcache_bytes_window",
        "gauge",
        "Bytes served to pods, and downloaded on misses, in the window.",
        [('{kind="served"}', s.bytes_served), ('{kind="downloaded"}', s.bytes_downloaded)],
    )
    window = (s.now - s.since) if s.since is not None else 0.0
    metric("modelcache_stats_window_seconds", "gauge", "Length of the window (0: all time).", [("", window)])
    metric("modelcache_stats_generated_timestamp_seconds", "gauge", "When this was written.", [("", s.now)])
    return "\n".join(out) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Atomically (temp + rename), as node_exporter's textfile collector requires."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
