"""Container images written as `docker save` archives, for `ctr images import` (no registry, no docker).

Only what the real-node playground needs: a one-layer image from a few files (the pod sandbox
`pause`, built from the Kubernetes tree's pause.c). Our application image comes from
scripts/build_image.py in the same format.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Fixed timestamp, so the same inputs give the same archive (and the same image id).
EPOCH = 1700000000


def _file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = EPOCH
    tar.addfile(info, io.BytesIO(data))


def docker_archive(
    out: Path,
    tag: str,
    files: Mapping[str, tuple[bytes, int]],
    entrypoint: Sequence[str],
    user: str = "",
) -> Path:
    """Write `out`: one image `tag` whose single layer holds `files` (path -> (bytes, mode))."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            _file(tar, name.lstrip("/"), data, mode)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Entrypoint": list(entrypoint), "User": user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "modelcache.dev.images"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_id = hashlib.sha256(config_bytes).hexdigest()
    repo, _, ref = tag.rpartition(":")
    manifest = [{"Config": f"{config_id}.json", "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _file(tar, f"{config_id}.json", config_bytes)
        _file(tar, f"{diff_id}/layer.tar", layer_bytes)
        _file(tar, "manifest.json", json.dumps(manifest).encode())
        _file(tar, "repositories", json.dumps({repo: {ref: diff_id}}).encode())
    tmp.replace(out)
    return out


def pause_image(pause_binary: Path, out: Path, tag: str) -> Path:
    """The pod sandbox image: the static `pause` binary as /pause, run as nobody (65535)."""
    return docker_archive(out, tag, {"pause": (pause_binary.read_bytes(), 0o755)}, ["/pause"], "65535:65535")
