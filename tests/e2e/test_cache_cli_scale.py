"""`cache list` over 100 caches x 50 nodes on a real API server (no controller: status written here).

No timing assertion (the machine is shared); the figure is measured by hand and reported in the
README. This checks that every cache and every node's state and percent come through."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from lightkube import Client, codecs
from lightkube.types import PatchType

from modelcache.dev import ControlPlaneInfo
from modelcache.kube.client import LocalModelCache
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
CACHES, NODES = 100, 50
MiB = 1 << 20


@pytest.fixture
def many(kube: Client) -> Iterator[None]:
    for i in range(CACHES):
        name = f"scale-{i:03d}"
        kube.create(
            codecs.from_dict(
                {
                    "apiVersion": "serving.kserve.io/v1alpha1",
                    "kind": "LocalModelCache",
                    "metadata": {"name": name},
                    "spec": {
                        "sourceModelUri": f"s3://user:secret@models/m{i}",
                        "modelSize": "10Gi",
                        "nodeGroups": ["gpus"],
                    },
                }
            )
        )
        node_status = {
            f"node-{n:02d}": "NodeDownloaded" if n % 5 else "NodeDownloading" for n in range(NODES)
        }
        progress = {
            node: {
                "bytesDone": 10240 * MiB if state == "NodeDownloaded" else 2560 * MiB,
                "bytesTotal": 10240 * MiB,
            }
            for node, state in node_status.items()
        }
        status = {
            "copies": {"available": NODES - NODES // 5, "total": NODES, "failed": 0},
            "nodeStatus": node_status,
            "nodeProgress": progress,
        }
        kube.patch(LocalModelCache.Status, name, {"status": status}, patch_type=PatchType.MERGE)
    try:
        yield
    finally:
        for i in range(CACHES):
            kube.delete(LocalModelCache, f"scale-{i:03d}")


def test_list_100_caches_by_50_nodes(control_plane: ControlPlaneInfo, many: None) -> None:
    env = {
        "PYTHONPATH": str(REPO / "src"),
        "HOME": str(control_plane.home),
        "KUBECONFIG": str(control_plane.kubeconfig),
    }
    run = [sys.executable, "-m", "modelcache.cli.main", "cache", "list"]
    proc = subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    caches = [c for c in json.loads(proc.stdout) if c["name"].startswith("scale-")]
    assert len(caches) == CACHES
    assert all(len(c["nodes"]) == NODES and len(c["downloading"]) == NODES // 5 for c in caches)
    assert caches[0]["downloading"][0] == {"node": "node-00", "percent": 25.0}
    assert all("secret" not in c["uri"] for c in caches)
    wide = subprocess.run([*run, "-o", "wide"], capture_output=True, text=True, env=env, timeout=120)
    assert wide.returncode == 0 and wide.stdout.count("scale-") == CACHES and "secret" not in wide.stdout
