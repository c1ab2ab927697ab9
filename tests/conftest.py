"""Shared fixtures: a cache home, a real Range-capable origin on 127.0.0.1, and the CLI as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.origin import Origin

REPO = Path(__file__).resolve().parents[1]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MODELCACHE_HOME=str(home),
        MODELCACHE_RETRIES="3",
        MODELCACHE_RETRY_BASE="0.05",
        MODELCACHE_READ_TIMEOUT="2",
        MODELCACHE_CONNECT_TIMEOUT="2",
        PYTHONPATH=str(REPO / "src"),
    )
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", *args],
        capture_output=True,
        text=True,
        env=cli_env(home, **env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def popen_cli(home: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "modelcache.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(home, **env),
        stdin=subprocess.DEVNULL,
    )


def write_random(path: Path, size: int, seed: int = 0) -> bytes:
    """Incompressible, reproducible bytes (a repeated random block would hide offset bugs)."""
    import random

    rng = random.Random(seed)
    data = rng.randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def staging_done(home: Path) -> int:
    """Bytes durably checkpointed by interrupted or running pulls (what a resume will not fetch again)."""
    from modelcache.transfer import read_staging_summary

    summaries = (read_staging_summary(d) for d in (home / ".modelcache" / "staging").glob("*"))
    return sum(s.done_bytes for s in summaries if s is not None)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("modelcache: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    root.mkdir()
    return root


@pytest.fixture
def origin(origin_root: Path) -> Iterator[Origin]:
    o = Origin(origin_root)
    o.start(0)
    try:
        yield o
    finally:
        o.stop()
