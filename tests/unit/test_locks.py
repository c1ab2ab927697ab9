"""O_EXCL lock files: mutual exclusion across processes, takeover of dead or silent holders."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from modelcache.store.locks import FileLock, is_held, read_lock


def _hold(path: str, ready: mp.synchronize.Event, seconds: float) -> None:  # type: ignore[name-defined]
    lock = FileLock(Path(path), heartbeat=0.1)
    assert lock.acquire(timeout=5)
    ready.set()
    time.sleep(seconds)
    lock.release()


def test_mutual_exclusion_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    ready = mp.Event()
    p = mp.Process(target=_hold, args=(str(path), ready, 1.0))
    p.start()
    assert ready.wait(5)
    mine = FileLock(path)
    assert not mine.try_acquire()
    assert is_held(path)
    t0 = time.monotonic()
    assert mine.acquire(timeout=10, poll=0.05)
    assert time.monotonic() - t0 > 0.3  # had to wait for the holder
    p.join()
    mine.release()
    assert not path.exists()


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    ready = mp.Event()
    p = mp.Process(target=_hold, args=(str(path), ready, 60))
    p.start()
    assert ready.wait(5)
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    lock = FileLock(path)
    assert lock.acquire(timeout=2, poll=0.05)
    info = read_lock(path)
    assert info is not None and info.token == lock.token
    lock.release()


def test_silent_holder_on_another_host_goes_stale(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"token": "other", "host": "some-other-node", "pid": 1}))
    lock = FileLock(path, stale_after=0.5)
    assert not lock.try_acquire()  # first sighting starts the clock
    assert lock.acquire(timeout=5, poll=0.1)
    lock.release()


def test_heartbeat_keeps_a_live_foreign_lock(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    owner = FileLock(path, heartbeat=0.1)
    assert owner.try_acquire()
    # Pretend the owner is on another host so only the heartbeat can prove it alive.
    data = json.loads(path.read_text())
    data["host"] = "elsewhere"
    path.write_text(json.dumps(data))
    waiter = FileLock(path, stale_after=0.6)
    assert not waiter.acquire(timeout=1.5, poll=0.1)
    owner.release()
    assert waiter.acquire(timeout=2, poll=0.05)
    waiter.release()
