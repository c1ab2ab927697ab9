"""The usage log: pure figures, and compaction that neither loses nor duplicates events."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

from modelcache.stats import Event, Volume, compact, prometheus, read_events, stats_dir, summarize


def ev(ts: float, key: str, hit: bool, seconds: float, size: int = 100) -> Event:
    return Event(ts=ts, key=key, uri=f"s3://b/{key}", hit=hit, mode="link", bytes=size, seconds=seconds)


def test_time_saved_uses_the_models_own_misses_else_the_mean_rate() -> None:
    events = [
        ev(10, "a", False, 60.0),  # a cold start of a took 60 s
        ev(20, "a", True, 2.0),  # saved 58 s
        ev(30, "b", True, 1.0, size=1000),  # b never missed here: 1000 B at 100 B/60 s... = 600 s
        ev(40, "a", True, 90.0),  # slower than a miss: saves nothing, never negative
    ]
    s = summarize(events, models=2, size_bytes=1100, volume=Volume(10, 5, 5), since=None, now=50)
    assert (s.hits, s.misses, s.hit_rate) == (3, 1, 0.75)
    assert round(s.time_saved_seconds, 6) == 58 + 599
    windowed = summarize(events, models=2, size_bytes=1100, volume=None, since=25, now=50)
    assert (windowed.hits, windowed.misses) == (2, 0)  # misses outside the window still price hits
    assert round(windowed.time_saved_seconds, 6) == 599
    assert "modelcache_hit_ratio 1" in prometheus(windowed)


def _compact(root: str) -> None:
    compact(Path(root), now=time.time())


def test_concurrent_compaction_keeps_every_event_once(tmp_path: Path) -> None:
    d = stats_dir(tmp_path)
    d.mkdir(parents=True)
    old = time.time() - 3600
    n = 0
    for f in range(40):
        p = d / f"pod{f}-1-abcd.jsonl"
        p.write_text("".join(json.dumps(ev(n + i, "k", i % 2 == 0, 1.0).__dict__) + "\n" for i in range(5)))
        n += 5
        os.utime(p, (old, old))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_compact, args=(str(tmp_path),)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert all(proc.exitcode == 0 for proc in procs)
    ts = sorted(e.ts for e in read_events(tmp_path))
    assert ts == [float(i) for i in range(n)]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
