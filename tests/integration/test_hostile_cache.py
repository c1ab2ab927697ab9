"""A tampered cache directory never sends our writes elsewhere, and a bundle never replaces a model.

Found by review: links planted *inside* `staging/<key>/` (not at it) were followed, and `import` of
a bundle naming an existing key replaced that model, pinned or not.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from modelcache.uri import storage_key
from tests.conftest import run_cli


def _source(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "authorized_keys").write_bytes(b"model bytes\n")
    return src, f"file://{src}"


@pytest.mark.parametrize("planted", ["files", "download", ".state.json.tmp", "files/sub"])
def test_links_planted_inside_staging_are_refused(planted: str, tmp_path: Path) -> None:
    src, uri = _source(tmp_path)
    (src / "sub").mkdir()
    (src / "sub" / "w.bin").write_bytes(b"nested\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    home = tmp_path / "cache"
    staging = home / ".modelcache" / "staging" / storage_key(uri)
    link = staging / planted
    link.parent.mkdir(parents=True)
    link.symlink_to(victim if planted.endswith(".tmp") else outside)
    proc = run_cli(home, "pull", uri)
    assert not any(outside.iterdir())  # nothing written through the link
    assert victim.read_bytes() == b"precious\n"
    model = home / "models" / storage_key(uri)
    assert not model.is_symlink()
    if proc.returncode == 0:  # a link where we only write temporary state may be replaced instead
        assert (model / "authorized_keys").read_bytes() == b"model bytes\n"
    else:
        assert proc.returncode == 4, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _bundle(path: Path, key: str, uri: str, payload: bytes) -> None:
    """A well-formed bundle (our own format) for another model under an existing key."""
    entry = {"path": "authorized_keys", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest = {"key": key, "uri": uri, "revision": None, "created_at": 1.0, "source": {}, "files": [entry]}
    members = (("modelcache-bundle.json", json.dumps(manifest).encode()), ("model/authorized_keys", payload))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_import_never_replaces_a_cached_model(tmp_path: Path) -> None:
    _, uri = _source(tmp_path)
    home = tmp_path / "cache"
    assert run_cli(home, "pull", uri).returncode == 0
    key = storage_key(uri)
    assert run_cli(home, "pin", key).returncode == 0
    evil = tmp_path / "evil.tar"
    _bundle(evil, key, "https://***@evil.example/x", b"attacker weights\n")
    proc = run_cli(home, "import", str(evil))
    assert proc.returncode in (0, 7), proc.stderr  # the existing model is kept (or the import refused)
    assert (home / "models" / key / "authorized_keys").read_bytes() == b"model bytes\n"
    assert run_cli(home, "verify", key, "--full").returncode == 0


def test_initialize_can_copy_for_untrusted_root_pods(tmp_path: Path) -> None:
    """A root pod can write through a hard link and restore the mtime; with links off it has its own copy."""
    _, uri = _source(tmp_path)
    cache = tmp_path / "shared"
    dest = tmp_path / "pod" / "mnt-models"
    proc = run_cli(
        tmp_path / "unused",
        "initialize",
        uri,
        str(dest),
        "--cache-dir",
        str(cache),
        MODELCACHE_INITIALIZE_LINKS="0",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["method"] == "copy"
    cached = cache / "models" / storage_key(uri) / "authorized_keys"
    assert (dest / "authorized_keys").stat().st_ino != cached.stat().st_ino
