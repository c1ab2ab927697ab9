"""`modelcache dev up --real-node`: the seed-000 flow as real pods on a real kubelet, then `dev down`.

The Helm chart runs the controller and webhook as pods (our image, imported, never pulled); the
controller's `<group>-agent` DaemonSet pod downloads from an origin on the node bridge into the
node's hostPath, while a simulated node's agent (a local process) fills its own copy beside it.
A KServe-style predictor pod and a plain annotated pod are mutated by the webhook, scheduled onto
the real node and check the model's sha256 through the read-only PVC mount. `dev down` must leave
the host as it found it: no processes, mounts, bridge, KUBE-/CNI- iptables chains, kubepods
cgroups; sysctls restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, codecs
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.apps_v1 import DaemonSet, Deployment
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, ServiceAccount

import tests.support.origin as origin_module
from modelcache.dev import controlplane, realnode
from modelcache.kube.constants import LOCALMODEL_LABEL
from modelcache.uri import storage_key
from tests.conftest import write_random
from tests.support.origin import Origin

from .support import leftover_processes, require_binaries

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
LMC = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
LMNG = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups")
ISVC = create_namespaced_resource("serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices")
MiB = 1 << 20
REAL = realnode.NODE_NAME
FAKE = "dev-node-1"


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 300) -> Any:
    """Poll until `check()` is truthy; the deadline only bounds a hang, it asserts no speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def host_snapshot(home: Path) -> dict[str, Any]:
    """What `dev down` must restore: sysctls, our iptables chains, bridge, mounts, kubepods cgroups."""
    chains = []
    for binary in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([binary], capture_output=True, text=True, check=False).stdout
        chains += sorted(line.split()[0] for line in out.splitlines() if line.startswith((":KUBE-", ":CNI-")))
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return {
        "sysctls": realnode.read_sysctls(),
        "chains": chains,
        "bridge": Path(f"/sys/class/net/{realnode.BRIDGE}").exists(),
        "mounts": [m for m in mounts if m.startswith(str(home))],
        "cgroups": realnode._kubepods_cgroups(),
    }


@dataclass
class Playground:
    home: Path
    kube: Client
    image: str
    uri: str
    key: str
    digest: str
    up_seconds: float


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playground]:
    require_binaries()
    if os.geteuid() != 0:
        pytest.fail("the real-node test needs root (bridge, iptables, mounts, cgroups)", pytrace=False)
    try:
        options = realnode.options()
        realnode.find_binaries(controlplane.k8s_dir())
    except Exception as exc:  # missing build output: fail with the fix, never skip
        pytest.fail(f"{exc} (make k8s image helm)", pytrace=False)
    home = tmp_path_factory.mktemp("rn")
    before = host_snapshot(home)
    origin_dir = home / "origin"
    data = write_random(origin_dir / "tiny-llm.bin", 6 * MiB)
    with pytest.MonkeyPatch.context() as mp:
        # the agent pod reaches the origin on the bridge (pods have no route to the host's loopback)
        mp.setattr(origin_module, "HOST", realnode.NODE_IP)
        started = time.monotonic()
        up = cli("dev", "up", "--real-node", "--nodes", "1", "--home", str(home))
        up_seconds = time.monotonic() - started
        try:
            assert up.returncode == 0, up.stderr
            assert f"node {REAL} Ready" in up.stderr and f"agent-{FAKE} ready" in up.stderr, up.stderr
            with Origin(origin_dir) as origin:
                uri = origin.url_for("/tiny-llm.bin")
                kube = controlplane.load(home).client()
                yield Playground(
                    home,
                    kube,
                    options.image_tag,
                    uri,
                    storage_key(uri),
                    hashlib.sha256(data).hexdigest(),
                    up_seconds,
                )
        finally:
            down = cli("dev", "down", "--home", str(home), timeout=300)
            assert down.returncode == 0, down.stderr
    assert not leftover_processes(home)
    assert host_snapshot(home) == before
    assert not (home / "dev" / "node").exists()


def _pod_log(kube: Client, name: str, namespace: str) -> str:
    return "\n".join(kube.log(name, namespace=namespace))


def _finished(kube: Client, name: str, namespace: str) -> str | None:
    pod = kube.get(Pod, name, namespace=namespace)
    phase = pod.status.phase if pod.status else None
    return phase if phase in ("Succeeded", "Failed") else None


def _checksum_container(image: str, path: str) -> dict[str, Any]:
    """Our image's python prints the model's sha256 (through the mount) and what its network reaches."""
    code = """
import hashlib, socket, sys
print("sha256", hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
routes = [line.split()[1] for line in open("/proc/net/route").readlines()[1:]]
print("default-route", "yes" if "00000000" in routes else "no")
print("kubernetes", socket.gethostbyname("kubernetes.default.svc.cluster.local"))
try:
    print("outside", socket.gethostbyname("example.com"))
except OSError:
    print("outside unresolved")
"""
    return {
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/opt/modelcache/bin/python", "-c", code, path],
    }


def test_1_agent_pod_and_simulated_agent_fill_the_cache(playground: Playground) -> None:
    kube, home = playground.kube, playground.home
    assert _ready(kube.get(Node, REAL)) and _ready(kube.get(Node, FAKE)), "simulated nodes stay Ready"
    # The node's cache directory does not exist: the kubelet creates it (DirectoryOrCreate) root's,
    # 0755, and the agent DaemonSet's init container hands it to the agent's uid 65532.
    hostpath = home / "models"
    assert not hostpath.exists()
    docs = f"""
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
    local: {{path: {hostpath}}}
    storageClassName: local-storage
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {{key: kubernetes.io/hostname, operator: In, values: [{REAL}, {FAKE}]}}
---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {{name: tiny-llm}}
spec:
  sourceModelUri: {playground.uri}
  modelSize: 10Mi
  nodeGroups: [workers]
"""
    for doc in codecs.load_all_yaml(docs):
        kube.create(doc)

    def available() -> dict[str, Any] | None:
        status: dict[str, Any] = kube.get(LMC, "tiny-llm").status or {}
        return status if status.get("copies", {}).get("available") == 2 else None

    status = wait_for("2/2 copies", available)
    assert status["nodeStatus"] == {REAL: "NodeDownloaded", FAKE: "NodeDownloaded"}
    agent = kube.get(DaemonSet, "workers-agent", namespace="kserve")
    assert agent.spec.template.spec.containers[0].image == playground.image
    # nothing is ever pulled: every pod of the install names the imported tag and never pulls it
    templates = [agent.spec.template] + [d.spec.template for d in kube.list(Deployment, namespace="kserve")]
    assert {c.imagePullPolicy for t in templates for c in t.spec.containers} == {"Never"}

    def running() -> list[Pod] | None:
        pods = kube.list(Pod, namespace="kserve", labels={"app.kubernetes.io/name": "modelcache-agent"})
        return [p for p in pods if p.spec.nodeName == REAL and p.status.phase == "Running"] or None

    try:
        wait_for("the agent runs as a DaemonSet pod on the real node", running)
    except AssertionError:
        pods = kube.list(Pod, namespace="kserve", labels={"app.kubernetes.io/name": "modelcache-agent"})
        raise AssertionError([(p.metadata.name, p.spec.nodeName, p.status) for p in pods]) from None
    real_copy = hostpath / "models" / playground.key / "tiny-llm.bin"
    fake_copy = home / "dev" / "nodes" / FAKE / "models" / playground.key / "tiny-llm.bin"
    for copy in (real_copy, fake_copy):
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == playground.digest


def test_2_predictor_pod_reads_the_model_through_the_pvc(playground: Playground) -> None:
    kube = playground.kube
    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    local = json.loads((cm.data or {})["localModel"])
    patch = {"data": {"localModel": json.dumps({**local, "enabled": True})}}
    kube.patch(ConfigMap, "inferenceservice-config", patch, namespace="kserve")
    isvc = kube.create(
        codecs.from_dict(
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "tiny", "namespace": "default"},
                "spec": {
                    "predictor": {
                        "model": {"modelFormat": {"name": "huggingface"}, "storageUri": playground.uri}
                    }
                },
            }
        )
    )
    assert (isvc.metadata.labels or {}).get(LOCALMODEL_LABEL) == "tiny-llm", "mutated by the webhook pod"
    # The predictor pod as KServe's pod mutator would create it (no KServe here): its labels and
    # annotations, its storage-initializer (which our webhook replaces by the cached copy).
    pod = kube.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "tiny-predictor",
                    "namespace": "default",
                    "labels": {
                        LOCALMODEL_LABEL: "tiny-llm",
                        "serving.kserve.io/inferenceservice": "tiny",
                        "component": "predictor",
                    },
                    "annotations": {
                        **(isvc.metadata.annotations or {}),
                        "serving.kserve.io/storage-initializer-sourceuri": playground.uri,
                    },
                },
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": REAL},
                    "initContainers": [
                        {
                            "name": "storage-initializer",
                            "image": "kserve/storage-initializer:v0.15.0",
                            "imagePullPolicy": "IfNotPresent",
                            "args": [playground.uri, "/mnt/models"],
                        }
                    ],
                    "containers": [
                        {
                            "name": "kserve-container",
                            **_checksum_container(playground.image, "/mnt/models/tiny-llm.bin"),
                        }
                    ],
                },
            }
        )
    )
    assert not pod.spec.initContainers, "the webhook dropped the storage-initializer"
    assert wait_for("predictor finished", lambda: _finished(kube, "tiny-predictor", "default")) == "Succeeded"
    done = kube.get(Pod, "tiny-predictor", namespace="default")
    assert done.spec.nodeName == REAL
    mount = next(m for m in done.spec.containers[0].volumeMounts or [] if m.mountPath == "/mnt/models")
    assert mount.readOnly and mount.subPath == f"models/{playground.key}"
    assert f"sha256 {playground.digest}" in _pod_log(kube, "tiny-predictor", "default")


def test_3_plain_annotated_pod_reads_the_model(playground: Playground) -> None:
    kube = playground.kube
    kube.create(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}))
    wait_for("team-a's default token (controller-manager)", lambda: _has_token(kube, "team-a"))
    kube.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "vllm-0",
                    "namespace": "team-a",
                    "annotations": {"modelcache.io/model": "tiny-llm", "modelcache.io/mount-path": "/models"},
                },
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": REAL},
                    "containers": [
                        {"name": "vllm", **_checksum_container(playground.image, "/models/tiny-llm.bin")}
                    ],
                },
            }
        )
    )
    assert wait_for("annotated pod finished", lambda: _finished(kube, "vllm-0", "team-a")) == "Succeeded"
    log = _pod_log(kube, "vllm-0", "team-a")
    assert f"sha256 {playground.digest}" in log
    assert "default-route no" in log, "pods can reach only the pod and service ranges"
    assert f"kubernetes {realnode.KUBERNETES_SERVICE_IP}" in log and "outside unresolved" in log, "static DNS"


def test_4_status_names_the_real_node(playground: Playground) -> None:
    out = cli("dev", "status", "--json", "--home", str(playground.home), timeout=60)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state["phase"] == "running"
    assert REAL in state["info"]["nodes"] and FAKE in state["info"]["nodes"]
    assert {"kubelet", "containerd", "kube-proxy", "dnsmasq"} <= set(state["processes"])
    # the guards that keep the node from reaching off the machine, as the processes really run
    pids = {p["name"]: p["pid"] for p in state["info"]["real_node"]["processes"]}
    for name in ("kubelet", "containerd"):
        environ = Path(f"/proc/{pids[name]}/environ").read_bytes().split(b"\0")
        assert b"HTTPS_PROXY=http://127.0.0.1:9" in environ and b"HTTP_PROXY=http://127.0.0.1:9" in environ
    kubelet_env = Path(f"/proc/{pids['kubelet']}/environ").read_bytes().split(b"\0")
    assert b"AWS_EC2_METADATA_DISABLED=true" in kubelet_env
    apiserver = " ".join(state["info"]["apiserver"]["argv"])
    assert "--kubelet-preferred-address-types=InternalIP" in apiserver
    print(f"real-node bring-up (dev up --real-node): {playground.up_seconds:.0f} s")


def _ready(node: Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _has_token(kube: Client, namespace: str) -> bool:
    try:
        return bool(kube.get(ServiceAccount, "default", namespace=namespace).secrets)
    except ApiError:
        return False


def test_5_one_real_node_per_machine(
    playground: Playground, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A second real node (another home) is a conflict (exit 7), refused before touching the host."""
    other = tmp_path_factory.mktemp("o")
    second = cli("dev", "up", "--real-node", "--nodes", "0", "--home", str(other), timeout=120)
    assert second.returncode == 7, second.stderr
    assert second.stderr.count("\n") == 1 and "real node already runs" in second.stderr
    assert not (other / "dev" / "state.json").exists()
    usage = cli("dev", "up", "--image", "x.tar", "--home", str(other), timeout=60)
    assert usage.returncode == 2 and "need --real-node" in usage.stderr


def test_6_garbage_collector_runs(playground: Playground) -> None:
    """ownerReferences are honoured (the quick playground has no controller-manager to do it)."""
    kube = playground.kube
    owner = kube.create(ConfigMap(metadata=ObjectMeta(name="gc-owner", namespace="default")))
    assert owner.metadata is not None and owner.metadata.uid
    ref = OwnerReference(apiVersion="v1", kind="ConfigMap", name="gc-owner", uid=owner.metadata.uid)
    kube.create(
        ConfigMap(metadata=ObjectMeta(name="gc-dependent", namespace="default", ownerReferences=[ref]))
    )
    kube.delete(ConfigMap, "gc-owner", namespace="default")

    def collected() -> bool:
        try:
            kube.get(ConfigMap, "gc-dependent", namespace="default")
        except ApiError as exc:
            return exc.status.code == 404
        return False

    wait_for("the dependent ConfigMap garbage-collected", collected)
