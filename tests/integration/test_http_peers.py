"""Against an independent server (Debian's nginx), plus resource bounds: bandwidth cap and memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import cli_env, run_cli, write_random
from tests.support.nginx import Nginx

MiB = 1 << 20


def test_pull_from_nginx(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    data = write_random(root / "model.bin", 33 * MiB + 7)
    with Nginx(root, tmp_path / "nginx", rate="8m") as ng:
        proc = run_cli(home, "pull", f"{ng.url}/model.bin", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["revision"]  # nginx's ETag is recorded as the revision
    assert (
        hashlib.sha256((Path(out["path"]) / "model.bin").read_bytes()).digest()
        == hashlib.sha256(data).digest()
    )


def test_limit_rate_caps_the_whole_pull(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    write_random(root / "m.bin", 6 * MiB)
    with Nginx(root, tmp_path / "nginx") as ng:
        t0 = time.monotonic()
        proc = run_cli(home, "pull", f"{ng.url}/m.bin", "--limit-rate", "2Mi")
        elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    # A lower bound only (a slow machine cannot break it): 1 s of burst, then 2 MiB/s for the rest.
    assert elapsed >= 1.9


def test_peak_memory_is_bounded(home: Path, tmp_path: Path) -> None:
    """Peak RSS stays far below the model size: bytes stream through fixed buffers to disk."""
    root = tmp_path / "www"
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        block = bytes(range(256)) * 4096
        for i in range(400):
            f.write(block[i:] + block[:i])
    with Nginx(root, tmp_path / "nginx") as ng:
        code = (
            "import runpy, sys; sys.argv = ['modelcache', 'pull', sys.argv[1]];"
            "\ntry:\n runpy.run_module('modelcache.cli.main', run_name='__main__')"
            "\nexcept SystemExit as e:\n rc = e.code"
            # VmHWM is this process image's own peak; ru_maxrss would carry over the peak of the
            # (forked) pytest process across exec, which grows with the test suite.
            "\nhwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
            "\nprint('RSS', hwm, rc)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, f"{ng.url}/big.bin"],
            capture_output=True,
            text=True,
            env=cli_env(home),
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    _, rss_kib, rc = proc.stdout.strip().splitlines()[-1].split()
    assert rc == "0"
    assert int(rss_kib) * 1024 <= 256 * MiB, rss_kib
