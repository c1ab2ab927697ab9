"""gc --older-than and the shared-cache usage log (`initialize` records, `stats` reports), as processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import assert_one_line_error, run_cli, write_random

MiB = 1 << 20
DAY = 86400.0


def _pull(home: Path, tmp_path: Path, name: str, size: int) -> str:
    write_random(tmp_path / name / "w.bin", size, seed=hash(name) & 0xFFFF)
    proc = run_cli(home, "pull", str(tmp_path / name), "--json")
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["key"])


def test_gc_older_than_keeps_recent_pinned_and_in_use(home: Path, tmp_path: Path) -> None:
    from modelcache.store import Store

    old, pinned, busy, fresh = (_pull(home, tmp_path, n, MiB) for n in ("old", "pinned", "busy", "fresh"))
    store = Store(home)
    for key in (old, pinned, busy):
        store.index.touch(key, time.time() - 30 * DAY)
    assert run_cli(home, "pin", pinned).returncode == 0
    with store.lease(busy):
        dry = json.loads(run_cli(home, "gc", "--older-than", "7d", "--dry-run", "--json").stdout)
        assert dry["evict"] == [old] and sorted(dry["protected"]) == sorted([pinned, busy])
        proc = run_cli(home, "gc", "--older-than", "7d")
        assert proc.returncode == 0, proc.stderr
        assert f"evicted {old}" in proc.stdout
    left = {m["key"] for m in json.loads(run_cli(home, "list", "--json").stdout)}
    assert left == {pinned, busy, fresh}
    # combined: nothing older than 7d is left unprotected, so --max-size evicts by LRU among the rest
    both = json.loads(run_cli(home, "gc", "--older-than", "7d", "--max-size", "2Mi", "--json").stdout)
    assert both["evict"] == [busy] and both["satisfied"]
    assert "--max-size" in assert_one_line_error(run_cli(home, "gc"), 2)
    assert "--older-than" in assert_one_line_error(run_cli(home, "gc", "--older-than", "soon"), 2)


def test_initialize_records_hits_and_misses_stats_reports_them(tmp_path: Path, origin_root: Path) -> None:
    from tests.support.origin import Origin

    write_random(origin_root / "m" / "weights.bin", 3 * MiB)
    write_random(origin_root / "n" / "weights.bin", MiB, seed=2)
    cache = tmp_path / "rwx"
    with Origin(origin_root) as origin:
        for i, path in enumerate(("/m/weights.bin", "/m/weights.bin", "/m/weights.bin", "/n/weights.bin")):
            proc = run_cli(
                tmp_path / "unused",
                "initialize",
                origin.url_for(path),
                str(tmp_path / f"pod{i}"),
                "--cache-dir",
                str(cache),
            )
            assert proc.returncode == 0, proc.stderr
    logs = list((cache / ".modelcache" / "stats").glob("*.jsonl"))
    assert len(logs) == 4  # one file per process: nothing shared between writers
    s = json.loads(run_cli(cache, "stats", "--json").stdout)
    assert (s["hits"], s["misses"], s["models"]) == (2, 2, 2)
    assert s["hit_rate"] == 0.5 and s["modes"] == {"link": 4}
    assert s["size_bytes"] == 4 * MiB and s["bytes_served"] == 10 * MiB and s["bytes_downloaded"] == 4 * MiB
    assert s["volume"]["total"] > 0 and s["time_saved_seconds"] >= 0
    text = run_cli(cache, "stats", "--since", "1h", "--textfile", str(tmp_path / "prom" / "mc.prom"))
    assert text.returncode == 0 and "hit rate 50.0%" in text.stdout
    prom = (tmp_path / "prom" / "mc.prom").read_text()
    assert 'modelcache_initialize_window{result="hit"} 2' in prom and "modelcache_cache_models 2" in prom

    # hostile lines are skipped, not fatal; gc compacts idle files into one without losing events
    (cache / ".modelcache" / "stats" / "junk.jsonl").write_text('{"ts": "x"}\nnot json\n{"hit": true}\n')
    old = time.time() - 3600
    for p in (cache / ".modelcache" / "stats").iterdir():
        os.utime(p, (old, old))
    assert run_cli(cache, "gc", "--older-than", "30d").returncode == 0
    files = list((cache / ".modelcache" / "stats").iterdir())
    assert len(files) == 1 and files[0].name.startswith("compacted-")
    assert json.loads(run_cli(cache, "stats", "--json").stdout)["starts"] == 4
    window = json.loads(run_cli(cache, "stats", "--since", "0s", "--json").stdout)
    assert window["starts"] == 0
