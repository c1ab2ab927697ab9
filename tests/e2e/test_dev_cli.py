"""`modelcache dev up|status|down` as a user runs them: separate processes, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from modelcache.cli.dev import app
from modelcache.dev import down, status, up

from .support import leftover_processes, require_binaries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def dev_cli(*args: str, home: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `python -m modelcache.cli.dev ARGS --home HOME` in its own process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.dev", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_cli_up_status_down_leaves_nothing(tmp_path: Path) -> None:
    require_binaries()
    home = tmp_path / "home"
    try:
        started = dev_cli("up", "--nodes", "1", home=home)
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"export KUBECONFIG={home / 'dev' / 'kubeconfig'}\n"
        assert "controller ready" in started.stderr and "agent-dev-node-1 ready" in started.stderr
        assert (home / "dev" / "kubeconfig").is_file()
        assert leftover_processes(home), "up returned but nothing runs"

        again = dev_cli("up", "--nodes", "1", home=home)  # idempotent: reuses the running one
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr

        running = dev_cli("status", home=home)
        assert running.returncode == 0, running.stdout + running.stderr
        assert running.stdout.startswith("running: ")
        as_json = json.loads(dev_cli("status", "--json", home=home).stdout)
        assert as_json["phase"] == "running"
        assert as_json["info"]["nodes"] == ["dev-node-1"]

        stopped = dev_cli("down", home=home)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped controller, webhook, agent-dev-node-1, kube-apiserver, etcd" in stopped.stderr
        assert leftover_processes(home) == []
        assert not (home / "dev" / "state.json").exists()
        assert (home / "dev" / "logs" / "kube-apiserver.log").is_file(), "logs are kept after down"

        after = dev_cli("status", home=home)
        assert after.returncode == 3
        assert after.stdout.startswith("stopped: ")
        assert dev_cli("down", home=home).returncode == 0, "down is idempotent"
    finally:
        down(home)
        assert leftover_processes(home) == []


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_crashed_apiserver_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    """A dead apiserver makes status `degraded`; `up` replaces the stale plane; `down` leaves nothing."""
    require_binaries()
    home = tmp_path / "home"
    try:
        info = up(home, nodes=0)
        os.kill(info.apiserver.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while status(home).phase == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        current = status(home)
        assert current.phase == "degraded"
        assert current.processes == {"kube-apiserver": False, "etcd": True}

        result = CliRunner().invoke(app, ["status", "--home", str(home)])
        assert result.exit_code == 1

        fresh = up(home, nodes=1)
        assert fresh.apiserver.pid != info.apiserver.pid
        assert status(home).phase == "running"
        assert not _alive(info.etcd.pid), "the stale etcd was stopped before the fresh start"
    finally:
        down(home)
    assert leftover_processes(home) == []


def test_cli_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["up", "--nodes", "1000", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--nodes" in result.stderr


def test_cli_missing_binary_says_how_to_build(tmp_path: Path) -> None:
    env = {"MODELCACHE_KUBE_APISERVER": str(tmp_path / "nope" / "kube-apiserver")}
    result = CliRunner().invoke(app, ["up", "--home", str(tmp_path)], env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: kube-apiserver not found")
    assert "scripts/build-kube-apiserver.sh" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.output
    assert leftover_processes(tmp_path) == []
