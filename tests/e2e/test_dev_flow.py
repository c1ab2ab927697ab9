"""The whole product on `modelcache dev up`: controller, webhook and one agent per node as processes.

KServe's Local Model Cache walkthrough (seed 000) end to end, with the model on a local origin:
node group + cache -> every member node's agent downloads it -> cache copies available == total,
nodeStatus all NodeDownloaded, LocalModelNode ModelDownloaded, ready-node labels set; then an
InferenceService pointing at the model gets KServe's labels and its pod mounts the cached copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client, KubeConfig, codecs
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.core_v1 import ConfigMap, Node, PersistentVolumeClaim, Pod

from modelcache.kube.constants import LOCALMODEL_LABEL, ready_label
from modelcache.uri import storage_key
from tests.conftest import write_random
from tests.support.origin import Origin

from .support import leftover_processes, require_binaries

pytestmark = pytest.mark.e2e
LMC = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
LMN = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNode", "localmodelnodes")
LMNG = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups")
ISVC = create_namespaced_resource("serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices")
MiB = 1 << 20


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Client]]:
    require_binaries()
    home = tmp_path_factory.mktemp("dev-home")
    up = cli("dev", "up", "--nodes", "2", "--home", str(home))
    assert up.returncode == 0, up.stderr
    assert (
        "agent-dev-node-2 ready" in up.stderr
        and "webhook ready" in up.stderr
        and "controller ready" in up.stderr
    )
    try:
        yield home, Client(KubeConfig.from_file(home / "dev" / "kubeconfig"))
    finally:
        down = cli("dev", "down", "--home", str(home))
        assert down.returncode == 0, down.stderr
        assert not leftover_processes(home)


def test_1_seed_000_flow_on_the_playground(playground: tuple[Path, Client], tmp_path: Path) -> None:
    home, kube = playground
    data = write_random(tmp_path / "origin" / "tiny-llm.bin", 6 * MiB)
    with Origin(tmp_path / "origin") as origin:
        uri = origin.url_for("/tiny-llm.bin")
        key = storage_key(uri)
        manifests = yaml.safe_load_all(f"""
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
    volumeName: models
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
metadata: {{name: tiny-llm}}
spec:
  sourceModelUri: {uri}
  modelSize: 100Mi
  nodeGroups: [workers]
""")
        for doc in manifests:
            kube.create(codecs.from_dict(doc))

        def available() -> dict[str, Any] | None:
            status: dict[str, Any] = kube.get(LMC, "tiny-llm").status or {}
            return status if status.get("copies", {}).get("available") == 2 else None

        status = wait_for("2/2 copies", available)
        assert status["copies"] == {"available": 2, "failed": 0, "total": 2}
        assert status["nodeStatus"] == {"dev-node-1": "NodeDownloaded", "dev-node-2": "NodeDownloaded"}
        sent = origin.bytes_sent_for("/tiny-llm.bin") - origin.overlap_bytes_for("/tiny-llm.bin")
        assert sent == 2 * len(data)  # one download per node
    for node in ("dev-node-1", "dev-node-2"):
        assert (kube.get(LMN, node).status or {})["modelStatus"] == {"tiny-llm": "ModelDownloaded"}
        assert (home / "dev" / "nodes" / node / "models" / key / "tiny-llm.bin").read_bytes() == data
        wait_for(
            "ready label", lambda n=node: (kube.get(Node, n).metadata.labels or {}).get(ready_label(key))
        )

    # KServe's InferenceService defaulting, then its predictor pod (created by hand: no kubelet here)
    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    local = json.loads((cm.data or {})["localModel"])
    kube.patch(
        ConfigMap,
        "inferenceservice-config",
        {"data": {"localModel": json.dumps({**local, "enabled": True})}},
        namespace="kserve",
    )
    isvc = kube.create(
        codecs.from_dict(
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "tiny", "namespace": "default"},
                "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": uri}}},
            }
        )
    )
    assert (isvc.metadata.labels or {}).get(LOCALMODEL_LABEL) == "tiny-llm"
    pod = kube.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "tiny-predictor",
                    "namespace": "default",
                    "labels": {LOCALMODEL_LABEL: "tiny-llm"},
                    "annotations": {
                        **(isvc.metadata.annotations or {}),  # KServe copies these onto its pods
                        "serving.kserve.io/storage-initializer-sourceuri": uri,
                    },
                },
                "spec": {
                    "initContainers": [
                        {
                            "name": "storage-initializer",
                            "image": "kserve/storage-initializer",
                            "args": [uri, "/mnt/models"],
                        }
                    ],
                    "containers": [{"name": "kserve-container", "image": "vllm/vllm-openai"}],
                },
            }
        )
    )
    mounts = [m for c in pod.spec.containers for m in (c.volumeMounts or []) if m.mountPath == "/mnt/models"]
    assert mounts and mounts[0].readOnly and mounts[0].subPath == f"models/{key}"
    assert not pod.spec.initContainers
    terms = pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms
    assert any(e.key == ready_label(key) for t in terms for e in (t.matchExpressions or []))
    kube.delete(Pod, "tiny-predictor", namespace="default")
    kube.delete(ISVC, "tiny", namespace="default")


def test_2_plain_pod_annotated_gets_the_cached_copy(playground: tuple[Path, Client]) -> None:
    """vLLM without KServe: a pod annotated modelcache.io/model gets the PVC (from the controller)
    and the read-only mount + affinity (from the webhook)."""
    _, kube = playground
    kube.create(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}))
    key = storage_key(str(kube.get(LMC, "tiny-llm").spec["sourceModelUri"]))
    pod = kube.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "vllm-0",
                    "namespace": "team-a",
                    "annotations": {"modelcache.io/model": "tiny-llm", "modelcache.io/mount-path": "/models"},
                },
                "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            }
        )
    )
    volume = next(v for v in pod.spec.volumes or [] if v.persistentVolumeClaim)
    mount = next(m for m in pod.spec.containers[0].volumeMounts or [] if m.name == volume.name)
    assert mount.mountPath == "/models" and mount.readOnly and mount.subPath == f"models/{key}"
    claim = volume.persistentVolumeClaim.claimName
    wait_for(f"PVC {claim} in team-a", lambda: _exists(kube, PersistentVolumeClaim, claim, "team-a"))
    kube.delete(Pod, "vllm-0", namespace="team-a")


def _exists(kube: Client, kind: Any, name: str, namespace: str) -> bool:
    try:
        kube.get(kind, name, namespace=namespace)
    except ApiError:
        return False
    return True
