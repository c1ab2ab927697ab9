"""Swapping KServe's local model cache for ours on the playground, without losing a byte.

Nodes' cache folders laid out as KServe's agent leaves them (`models/<key>/<files>`, no manifest),
KServe-named PV/PVC without our labels, a pod on one node mounting the model; then the node group
and cache are applied to a cluster running our controller, webhook and agents. The origin must send
0 bytes of the model, nothing mounted may move, statuses reach Downloaded, the volumes are adopted,
the folders hashed in the background, and `modelcache kserve check` reports clean.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client, KubeConfig, codecs
from lightkube.resources.core_v1 import PersistentVolume, PersistentVolumeClaim, Pod

from modelcache.uri import storage_key
from tests.conftest import write_random
from tests.support.origin import Origin

from .support import leftover_processes, require_binaries
from .test_dev_flow import LMC, LMN, MiB, cli, wait_for

pytestmark = pytest.mark.e2e
NODES = ("dev-node-1", "dev-node-2")
JOBS = "kserve-localmodel-jobs"


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Client]]:
    require_binaries()
    home = tmp_path_factory.mktemp("migration-home")
    up = cli("dev", "up", "--nodes", "2", "--home", str(home))
    assert up.returncode == 0, up.stderr
    try:
        yield home, Client(KubeConfig.from_file(home / "dev" / "kubeconfig"))
    finally:
        down = cli("dev", "down", "--home", str(home))
        assert down.returncode == 0, down.stderr
        assert not leftover_processes(home)


def _manifest(root: Path, key: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / ".modelcache" / "manifests" / f"{key}.json").read_text())
    except FileNotFoundError:
        return None
    return data


def test_swap_adopts_kserve_folders_and_volumes(playground: tuple[Path, Client], tmp_path: Path) -> None:
    home, kube = playground
    status = cli("dev", "status", "--json", "--home", str(home))
    roots = {n: Path(p) for n, p in json.loads(status.stdout)["node_roots"].items()}
    assert set(roots) == set(NODES)

    data = write_random(tmp_path / "origin" / "llm.bin", 3 * MiB)
    with Origin(tmp_path / "origin") as origin:
        uri = origin.url_for("/llm.bin")
        key = storage_key(uri)
        inodes = {}
        for node in NODES:  # KServe's agent layout: the file under models/<key>/, no manifest
            folder = roots[node] / "models" / key
            folder.mkdir(parents=True)
            (folder / "llm.bin").write_bytes(data)
            inodes[node] = os.stat(folder).st_ino

        before = cli("kserve", "check", "--kubeconfig", str(home / "dev" / "kubeconfig"),
                     *(a for n in NODES for a in ("--root", str(roots[n]))))  # fmt: skip
        assert before.returncode == 7, before.stdout + before.stderr
        assert "have no manifest yet" in before.stdout
        assert "no RoleBinding in jobNamespace kserve-localmodel-jobs" in before.stdout

        # KServe's PV/PVC for the cache (its names, its spec, none of our labels)
        for doc in yaml.safe_load_all(f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: llm-workers-download}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Filesystem
  capacity: {{storage: 1Gi}}
  local: {{path: /models}}
  storageClassName: local-storage
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [dev-node-1, dev-node-2]}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: llm-workers, namespace: {JOBS}}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 1Gi}}}}
  storageClassName: local-storage
  volumeMode: Filesystem
  volumeName: llm-workers-download
---
apiVersion: v1
kind: Pod
metadata: {{name: predictor, namespace: default}}
spec:
  nodeName: dev-node-1
  containers:
  - name: kserve-container
    image: vllm/vllm-openai
    volumeMounts: [{{name: model, mountPath: /mnt/models, subPath: models/{key}, readOnly: true}}]
  volumes:
  - name: model
    persistentVolumeClaim: {{claimName: llm-workers, readOnly: true}}
"""):
            kube.create(codecs.from_dict(doc))

        for doc in yaml.safe_load_all(f"""
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {{name: workers}}
spec:
  storageLimit: 1Gi
  persistentVolumeClaimSpec:
    accessModes: [ReadWriteOnce]
    resources: {{requests: {{storage: 1Gi}}}}
    storageClassName: local-storage
    volumeMode: Filesystem
  persistentVolumeSpec:
    accessModes: [ReadWriteOnce]
    volumeMode: Filesystem
    capacity: {{storage: 1Gi}}
    local: {{path: /models}}
    storageClassName: local-storage
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {{key: kubernetes.io/hostname, operator: In, values: [dev-node-1, dev-node-2]}}
---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {{name: llm}}
spec:
  sourceModelUri: {uri}
  modelSize: 100Mi
  nodeGroups: [workers]
"""):
            kube.create(codecs.from_dict(doc))

        def available() -> dict[str, Any] | None:
            st: dict[str, Any] = kube.get(LMC, "llm").status or {}
            return st if (st.get("copies") or {}).get("available") == 2 else None

        st = wait_for("2/2 copies from adopted folders", available)
        assert st["nodeStatus"] == {n: "NodeDownloaded" for n in NODES}
        for node in NODES:
            assert (kube.get(LMN, node).status or {})["modelStatus"] == {"llm": "ModelDownloaded"}
        assert origin.bytes_sent_for("/llm.bin") == 0  # listing only: not one byte of the model

        # nothing moved: same folder (inode), same bytes, now ours (manifest), hashed in the background
        for node in NODES:
            folder = roots[node] / "models" / key
            assert os.stat(folder).st_ino == inodes[node]
            assert (folder / "llm.bin").read_bytes() == data
            wait_for(
                f"background hash on {node}",
                lambda n=node: (
                    ((_manifest(roots[n], key) or {}).get("source") or {}).get("adopted", {}).get("hashed")
                ),
                timeout=180,
            )
        assert origin.bytes_sent_for("/llm.bin") == 0

        # KServe's volumes adopted by name (our labels), not recreated
        def labelled(obj: Any) -> bool:
            return (obj.metadata.labels or {}).get("app.kubernetes.io/managed-by") == "modelcache"

        wait_for("PV adopted", lambda: labelled(kube.get(PersistentVolume, "llm-workers-download")))
        wait_for(
            "PVC adopted", lambda: labelled(kube.get(PersistentVolumeClaim, "llm-workers", namespace=JOBS))
        )

        # the agents' credentials RBAC in the config's jobNamespace (as the chart creates it)
        kube.create(
            codecs.from_dict(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "modelcache-agent-credentials", "namespace": JOBS},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "view",
                    },
                    "subjects": [
                        {"kind": "ServiceAccount", "name": "modelcache-agent", "namespace": "kserve"}
                    ],
                }
            )
        )
        after = cli("kserve", "check", "--kubeconfig", str(home / "dev" / "kubeconfig"),
                    *(a for n in NODES for a in ("--root", str(roots[n]))))  # fmt: skip
        assert after.returncode == 0, after.stdout + after.stderr
        assert after.stdout.startswith("clean")
        kube.delete(Pod, "predictor", namespace="default")
