"""The offline-built image (scripts/build_image.py, `make image`): a valid docker archive whose command
runs as uid 65532 on a read-only root filesystem, with every compiled dependency importable.

Builds the image first (cached layers: ~2 s warm, ~1 min cold). Needs root: chroot and mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from modelcache import __version__

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the image build and this test need root (mmdebstrap, chroot, mounts)", pytrace=False)
    out = tmp_path_factory.mktemp("image") / "modelcache.tar"
    built = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None, name
    return member.read()


def test_archive_manifest_and_config(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        (manifest,) = json.loads(_read(tar, "manifest.json"))
        assert manifest["RepoTags"] == [f"localhost/modelcache:{__version__}"]
        raw = _read(tar, manifest["Config"])
        assert manifest["Config"] == f"{_sha256(raw)}.json"
        config: dict[str, Any] = json.loads(raw)
        layers = [_sha256(_read(tar, name)) for name in manifest["Layers"]]
    assert len(layers) == 3, "base, deps, app"
    assert config["rootfs"]["diff_ids"] == [f"sha256:{d}" for d in layers]
    assert [f"{d}/layer.tar" for d in layers] == manifest["Layers"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Entrypoint"] == ["modelcache"]
    assert "HOME=/tmp" in config["config"]["Env"]


@pytest.fixture(scope="module")
def rootfs(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layers unpacked in order, as a container runtime would (owners and modes kept)."""
    root = tmp_path_factory.mktemp("rootfs")
    with tarfile.open(archive) as tar:
        (manifest,) = json.loads(_read(tar, "manifest.json"))
        tar.extractall(root / "blobs", members=[tar.getmember(n) for n in manifest["Layers"]], filter="tar")
    target = root / "fs"
    target.mkdir()
    for name in manifest["Layers"]:
        subprocess.run(
            ["tar", "--numeric-owner", "-xpf", str(root / "blobs" / name), "-C", str(target)], check=True
        )
    return target


def test_passwd_entry_for_the_non_root_user(rootfs: Path) -> None:
    passwd = (rootfs / "etc" / "passwd").read_text().splitlines()
    assert any(line.split(":")[2:4] == ["65532", "65532"] for line in passwd)
    assert any(line.split(":")[2] == "65532" for line in (rootfs / "etc" / "group").read_text().splitlines())


def _run_inside(rootfs: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` as uid 65532 in a mount namespace: read-only root, /tmp a tmpfs, host /dev."""
    inner = (
        f"chroot --userspec=65532:65532 {rootfs} /usr/bin/env -i "
        "PATH=/opt/modelcache/bin:/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 "
        f"/bin/sh -c '{script}'"
    )
    outer = (
        f"mount --bind {rootfs} {rootfs} && mount -o remount,bind,ro {rootfs} && "
        f"mount -t tmpfs -o size=64m tmpfs {rootfs}/tmp && mount --rbind /dev {rootfs}/dev && exec {inner}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--fork", "sh", "-c", outer],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_runs_as_65532_on_a_read_only_root(rootfs: Path) -> None:
    result = _run_inside(
        rootfs,
        "modelcache --version && id -u && "
        'python3 -c "import pwd, os; print(pwd.getpwuid(os.getuid()).pw_name)" && '
        "modelcache controller --help >/dev/null && modelcache agent --help >/dev/null && "
        "modelcache webhook --help >/dev/null && modelcache initialize --help >/dev/null && "
        'python3 -c "import kopf, lightkube, obstore, cryptography, aiohttp, pydantic, yaml, hf_xet" && '
        "(touch /should-fail 2>/dev/null && echo writable || echo read-only) && touch /tmp/ok && echo tmp-ok",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"modelcache {__version__}",
        "65532",
        "nonroot",
        "read-only",
        "tmp-ok",
    ]
