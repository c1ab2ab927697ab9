"""`modelcache cache ...` (and `kubectl-modelcache`) against the playground: real controller, webhook
and one agent process per node, a local origin. Seed 004's list / preload / clear, plus status and
nodes, with the exit codes scripts rely on (0, 3, 6, 7, 124)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lightkube import Client, codecs
from lightkube.resources.core_v1 import Pod

from modelcache.kube.client import LocalModelCache
from modelcache.uri import storage_key
from tests.conftest import REPO, assert_one_line_error, write_random
from tests.e2e.test_dev_flow import playground, wait_for  # noqa: F401 - the module-scoped fixture
from tests.support.origin import Origin

pytestmark = pytest.mark.e2e
MiB = 1 << 20

GROUP = """
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {name: gpus}
spec:
  storageLimit: 1Gi
  persistentVolumeClaimSpec:
    accessModes: [ReadWriteOnce]
    resources: {requests: {storage: 1Gi}}
    storageClassName: local-storage
    volumeMode: Filesystem
    volumeName: models
  persistentVolumeSpec:
    accessModes: [ReadWriteOnce]
    volumeMode: Filesystem
    capacity: {storage: 1Gi}
    local: {path: /models}
    storageClassName: local-storage
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {key: kubernetes.io/hostname, operator: In, values: [dev-node-1, dev-node-2]}
"""


def cache_cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", "cache", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "PYTHONPATH": str(REPO / "src"),
            "KUBECONFIG": str(home / "dev" / "kubeconfig"),
            **env,
        },
    )


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    root = tmp_path_factory.mktemp("origin")
    write_random(root / "tiny.bin", 6 * MiB)
    write_random(root / "slow.bin", 8 * MiB, seed=5)
    o = Origin(root)
    o.start(0)
    try:
        yield o
    finally:
        o.stop()


@pytest.fixture(scope="module")
def pg(playground: tuple[Path, Client]) -> tuple[Path, Client]:  # noqa: F811
    home, kube = playground
    kube.create(codecs.from_dict(yaml.safe_load(GROUP)))
    return home, kube


def test_preload_wait_list_status_nodes(pg: tuple[Path, Client], origin: Origin) -> None:
    home, kube = pg
    uri = origin.url_for("/tiny.bin")
    proc = cache_cli(home, "preload", uri, "--name", "tiny", "--wait", "--timeout", "2m")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tiny" and "created cache tiny (6.0 MiB) on gpus" in proc.stderr
    assert kube.get(LocalModelCache, "tiny").spec["modelSize"] == str(6 * MiB)  # read from the source

    again = cache_cli(home, "preload", uri, "--name", "tiny", "--wait", "--json")  # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False

    listed = json.loads(cache_cli(home, "list", "--json").stdout)
    (tiny,) = [c for c in listed if c["name"] == "tiny"]
    assert tiny["copies"] == {"available": 2, "failed": 0, "total": 2}
    assert tiny["storage_key"] == storage_key(uri) and tiny["size_bytes"] == 6 * MiB
    assert {n["node"]: n["state"] for n in tiny["nodes"]} == {
        "dev-node-1": "Downloaded",
        "dev-node-2": "Downloaded",
    }
    wide = cache_cli(home, "list", "-o", "wide")
    assert wide.returncode == 0 and "dev-node-1=Downloaded" in wide.stdout and "2/2" in wide.stdout

    status = json.loads(cache_cli(home, "status", "tiny", "--json").stdout)
    assert [(n["node"], n["bytes_done"]) for n in status["nodes"]] == [
        ("dev-node-1", 6 * MiB),
        ("dev-node-2", 6 * MiB),
    ]
    assert status["used_by"] == [] and any(e["reason"] == "Downloaded" for e in status["events"])
    text = cache_cli(home, "status", "tiny")
    assert text.returncode == 0 and "Copies:      2/2 available" in text.stdout

    nodes = json.loads(cache_cli(home, "nodes", "--json").stdout)
    assert [(r["group"], r["node"], r["models"], r["used_bytes"], r["health"]) for r in nodes] == [
        ("gpus", "dev-node-1", 1, 6 * MiB, "ok"),
        ("gpus", "dev-node-2", 1, 6 * MiB, "ok"),
    ]
    assert nodes[0]["budget_bytes"] == 1 << 30 and nodes[0]["free_bytes"] == (1 << 30) - 6 * MiB

    # the kubectl plugin is the same command under kubectl's name
    plugin = subprocess.run(
        [sys.executable, "-c", "from modelcache.cli.cache import main; main()", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PYTHONPATH": str(REPO / "src"),
            "HOME": str(home),
            "KUBECONFIG": str(home / "dev" / "kubeconfig"),
        },
    )
    assert plugin.returncode == 0 and "tiny" in plugin.stdout, plugin.stderr


def test_clear_refuses_a_cache_in_use_then_frees_it(pg: tuple[Path, Client]) -> None:
    home, kube = pg
    kube.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "vllm-1",
                    "namespace": "default",
                    "annotations": {"modelcache.io/model": "tiny"},
                },
                "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            }
        )
    )
    refused = cache_cli(home, "clear", "tiny")
    assert "in use by Pod default/vllm-1" in assert_one_line_error(refused, 7)
    assert kube.get(LocalModelCache, "tiny")  # nothing deleted
    kube.delete(Pod, "vllm-1", namespace="default", grace_period=0)
    wait_for(
        "pod gone", lambda: not any(p.metadata.name == "vllm-1" for p in kube.list(Pod, namespace="default"))
    )

    dry = json.loads(cache_cli(home, "clear", "tiny", "--dry-run", "--json").stdout)
    assert dry["caches"] == [
        {"name": "tiny", "namespace": None, "frees": {"dev-node-1": 6 * MiB, "dev-node-2": 6 * MiB}}
    ]
    done = cache_cli(home, "clear", "tiny", "--wait", "--timeout", "2m")
    assert done.returncode == 0, done.stderr
    assert "deleted tiny: frees 6.0 MiB on dev-node-1, 6.0 MiB on dev-node-2" in done.stdout
    assert not [c for c in json.loads(cache_cli(home, "list", "--json").stdout) if c["name"] == "tiny"]
    assert "not found" in assert_one_line_error(cache_cli(home, "status", "tiny"), 3)


def test_preload_exit_codes_node_error_timeout_not_found(pg: tuple[Path, Client], origin: Origin) -> None:
    home, _ = pg
    missing = origin.url_for("/missing.bin")
    assert "not found" in assert_one_line_error(cache_cli(home, "preload", missing), 3)  # size from source
    err = cache_cli(
        home, "preload", missing, "--size", "1Mi", "--name", "broken", "--wait", "--timeout", "2m"
    )
    line = assert_one_line_error(err, 6)
    assert "node dev-node-" in line and "404" in line
    origin.rate_limit = 64 * 1024  # 8 MiB at 64 KiB/s: minutes
    try:
        late = cache_cli(
            home, "preload", origin.url_for("/slow.bin"), "--name", "slow", "--wait", "--timeout", "2s"
        )
        assert "timed out waiting for slow" in assert_one_line_error(late, 124)
    finally:
        origin.rate_limit = None
    bad_group = cache_cli(home, "preload", "gs://b/m", "--node-group", "nope", "--size", "1")
    assert "node group nope not found" in assert_one_line_error(bad_group, 3)
    cleared = cache_cli(home, "clear", "--all", "--wait", "--timeout", "2m")
    assert cleared.returncode == 0, cleared.stderr
    assert "deleted broken" in cleared.stdout and "deleted slow" in cleared.stdout


def test_kubeconfig_rules(pg: tuple[Path, Client], tmp_path: Path) -> None:
    home, _ = pg
    real = str(home / "dev" / "kubeconfig")
    merged = cache_cli(home, "list", KUBECONFIG=f"{tmp_path / 'absent'}:{real}")
    assert merged.returncode == 0, merged.stderr
    assert "no such context" in assert_one_line_error(cache_cli(home, "list", "--context", "nope"), 2)
    assert "no such file" in assert_one_line_error(
        cache_cli(home, "list", "--kubeconfig", str(tmp_path / "x")), 2
    )
    explicit = cache_cli(home, "nodes", "--kubeconfig", real, KUBECONFIG=str(tmp_path / "absent"))
    assert explicit.returncode == 0, explicit.stderr
    assert "no kubeconfig" in assert_one_line_error(cache_cli(tmp_path, "list", KUBECONFIG=""), 2)
