"""gc --older-than and the shared-cache usage log (`initialize` records, `stats` reports), as processes."""

from __future__ import annotations

import json
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
