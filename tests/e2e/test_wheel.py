"""The built wheel works on its own: installed into a fresh venv, run from outside the source tree.

Guards against run-time reads of the checkout (deploy/crds, ../shared): `dev up` from the installed
wheel must apply every CRD and bring the agents up. To stay offline and fast the fresh venv gets our
wheel only, and sees the project venv's site-packages for the dependencies through a .pth line (a
plain path entry: the editable install's own .pth there is not processed, so `src/` stays invisible).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from modelcache import __version__
from modelcache.dev import down

from .support import leftover_processes, require_binaries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout; returns its bin/ directory."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = work.glob("modelcache-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (purelib / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _clean_env(home: Path) -> dict[str, str]:
    drop = ("PYTHONPATH", "MODELCACHE_REFERENCE_DIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["MODELCACHE_HOME"] = str(home)
    return env


def test_installed_wheel_runs_version_and_dev_up(installed: Path, tmp_path: Path) -> None:
    require_binaries()
    home = tmp_path / "home"
    env = _clean_env(home)
    where = _run(
        [str(installed / "python"), "-c", "import modelcache; print(modelcache.__file__)"], tmp_path, env
    )
    assert where.stdout.startswith(str(installed.parent)), (
        f"not the installed wheel: {where.stdout}{where.stderr}"
    )

    version = _run([str(installed / "modelcache"), "--version"], tmp_path, env)
    assert (version.returncode, version.stdout) == (0, f"modelcache {__version__}\n"), version.stderr

    try:
        up = _run([str(installed / "modelcache"), "dev", "up", "--nodes", "1"], tmp_path, env)
        assert up.returncode == 0, up.stderr
        assert "7 CRDs established" in up.stderr, up.stderr
        assert "controller ready" in up.stderr and "agent-dev-node-1 ready" in up.stderr, up.stderr
        stopped = _run([str(installed / "modelcache"), "dev", "down"], tmp_path, env)
        assert stopped.returncode == 0, stopped.stderr
        assert "kube-apiserver" in stopped.stderr
        assert leftover_processes(home) == []
    finally:
        down(home)
