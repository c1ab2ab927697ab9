"""The controller against a real kube-apiserver, as a subprocess, under its own RBAC (deploy/rbac).

Fake agents: the tests write LocalModelNode status the way an agent would. Every object here is
prefixed `ctl-` and labelled so that it cannot be confused with other tests' objects; the module's
teardown stops the controllers, strips our finalizers and deletes what it created.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from lightkube import ApiError, Client, codecs
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import DaemonSet
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import (
    ConfigMap,
    Event,
    Namespace,
    Node,
    PersistentVolume,
    PersistentVolumeClaim,
)
from lightkube.types import PatchType

from modelcache.dev import ControlPlaneInfo
from modelcache.kube.constants import CACHE_FINALIZER, NAMESPACE_CACHE_FINALIZER, ready_label
from modelcache.uri import storage_key

pytestmark = pytest.mark.e2e

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "serving.kserve.io", "v1alpha1"
LMCache = create_global_resource(GROUP, VERSION, "LocalModelCache", "localmodelcaches")
LMNsCache = create_namespaced_resource(
    GROUP, VERSION, "LocalModelNamespaceCache", "localmodelnamespacecaches"
)
LMGroup = create_global_resource(GROUP, VERSION, "LocalModelNodeGroup", "localmodelnodegroups")
LMNode = create_global_resource(GROUP, VERSION, "LocalModelNode", "localmodelnodes")
ISVC = create_namespaced_resource(GROUP, "v1beta1", "InferenceService", "inferenceservices")
URI = "hf://meta-llama/meta-llama-3-8b-instruct"
JOBS_NS = "kserve-localmodel-jobs"
USER = "ctl-modelcache-controller"
TEST_LABEL = {"modelcache-e2e": "controller"}
DEADLINE = 30.0


def eventually(check: Callable[[], T], timeout: float = DEADLINE, what: str = "") -> T:
    """Poll `check` until it stops raising AssertionError/ApiError; re-raise after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, ApiError, KeyError, TypeError):
            if time.monotonic() > deadline:
                if what:
                    print(f"eventually: gave up waiting for {what}")
                raise
            time.sleep(0.25)


# --- controller processes ------------------------------------------------------------------------


def _controller_argv() -> list[str]:
    """`modelcache controller` once the app registers it; the module itself until then."""
    probe = subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", "controller", "--help"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "modelcache.cli.main", "controller"]
    return [sys.executable, "-m", "modelcache.cli.controller"]


class Replica:
    def __init__(self, argv: list[str], kubeconfig: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
        env["KUBECONFIG"] = str(kubeconfig)
        env["NO_PROXY"] = "127.0.0.1,localhost"
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [*argv, "--namespace", "kserve", "--lease-duration", "4"],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()
        return int(self.proc.returncode)


def _rbac_for_user(kube: Client) -> None:
    """deploy/rbac/controller.yaml as written, plus bindings of its roles to our minted user."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac" / "controller.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            doc = json.loads(json.dumps(doc))
            doc["metadata"]["name"] = f"{doc['metadata']['name']}-e2e-user"
            doc["subjects"] = [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}]
        obj = codecs.from_dict(doc)
        try:
            kube.create(obj)
        except ApiError as exc:
            if exc.status.code != 409:
                raise


@pytest.fixture(scope="module")
def env(
    kube: Client, control_plane: ControlPlaneInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("controller")
    _rbac_for_user(kube)
    for ns in (JOBS_NS, "ctl-isvc"):
        kube.apply(Namespace(metadata=ObjectMeta(name=ns)), field_manager="e2e", force=True)
    kubeconfig = control_plane.mint_user(USER, [], path=tmp / "controller.kubeconfig")
    before = _footprint(kube)
    argv = _controller_argv()
    state: dict[str, Any] = {"argv": argv, "kubeconfig": kubeconfig, "tmp": tmp, "replicas": []}
    state["replicas"].append(Replica(argv, kubeconfig, tmp / "controller-1.log"))
    try:
        yield state
    finally:
        for replica in state["replicas"]:
            replica.stop()
        for replica in state["replicas"]:
            tail = replica.text()[-3000:]
            if "Traceback" in tail:
                print(f"--- {replica.log} ---\n{tail}")
        _cleanup(kube, before)


def _footprint(kube: Client) -> tuple[set[str], dict[str, set[str]]]:
    """LocalModelNodes and ready-model labels that exist before our controller runs."""
    lmns = {o["metadata"]["name"] for o in kube.list(LMNode)}
    labels = {
        n.metadata.name: {k for k in (n.metadata.labels or {}) if k.startswith("models.modelcache.io/")}
        for n in kube.list(Node)
        if n.metadata and n.metadata.name
    }
    return lmns, labels


def _cleanup(kube: Client, before: tuple[set[str], dict[str, set[str]]]) -> None:
    """Without a controller nobody removes our finalizers: strip them, then delete what we made."""
    for res in (LMCache, LMNsCache):
        for obj in kube.list(res, namespace="*") if res is LMNsCache else kube.list(res):
            fins = obj["metadata"].get("finalizers") or []
            kept = [f for f in fins if f not in (CACHE_FINALIZER, NAMESPACE_CACHE_FINALIZER)]
            if kept != fins:
                ns = obj["metadata"].get("namespace")
                patch = {"metadata": {"finalizers": kept or None}}
                kube.patch(res, obj["metadata"]["name"], patch, namespace=ns, patch_type=PatchType.MERGE)
    for res in (LMCache, LMGroup, LMNode):
        for obj in kube.list(res):
            if obj["metadata"]["name"].startswith("ctl-"):
                _delete(kube, res, obj["metadata"]["name"])
    for node in kube.list(Node, labels={"modelcache-e2e": "controller"}):
        _delete(kube, Node, node.metadata.name)
    for ds in kube.list(DaemonSet, namespace="kserve"):
        if ds.metadata.name.startswith("ctl-"):
            _delete(kube, DaemonSet, ds.metadata.name, "kserve")
    for pv in kube.list(PersistentVolume):
        if pv.metadata.name.startswith("ctl-"):
            _delete(kube, PersistentVolume, pv.metadata.name)
    for pvc in kube.list(PersistentVolumeClaim, namespace="*"):
        if pvc.metadata.name.startswith("ctl-"):
            _delete(kube, PersistentVolumeClaim, pvc.metadata.name, pvc.metadata.namespace)
    _delete(kube, Lease, "modelcache-controller", "kserve")
    # what our controller did to other tests' leftovers: LocalModelNodes and ready labels it added
    lmns, labels = before
    for obj in kube.list(LMNode):
        if obj["metadata"]["name"] not in lmns:
            _delete(kube, LMNode, obj["metadata"]["name"])
    for n in kube.list(Node):
        if n.metadata is None or n.metadata.name not in labels:
            continue
        added = {k for k in (n.metadata.labels or {}) if k.startswith("models.modelcache.io/")}
        added -= labels[n.metadata.name]
        if added:
            patch = {"metadata": {"labels": dict.fromkeys(added)}}
            kube.patch(Node, n.metadata.name, patch, patch_type=PatchType.MERGE)


def _delete(kube: Client, res: Any, name: str, namespace: str | None = None) -> None:
    try:
        kube.delete(res, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code != 404:
            raise


# --- object builders -----------------------------------------------------------------------------


def make_node(kube: Client, name: str, **labels: str) -> None:
    kube.create(
        Node(metadata=ObjectMeta(name=name, labels={**TEST_LABEL, "kubernetes.io/hostname": name, **labels}))
    )
    set_ready(kube, name, True)


def set_ready(kube: Client, name: str, ready: bool) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cond = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    kube.patch(Node.Status, name, {"status": {"conditions": [cond]}}, patch_type=PatchType.MERGE)


def make_group(kube: Client, name: str, pool: str, limit: str = "1.7T", path: str = "/models") -> None:
    kube.create(
        LMGroup(
            {
                "metadata": {"name": name},
                "spec": {
                    "storageLimit": limit,
                    "persistentVolumeClaimSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1700G"}},
                        "storageClassName": "local-storage",
                        "volumeMode": "Filesystem",
                        "volumeName": "models",
                    },
                    "persistentVolumeSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "volumeMode": "Filesystem",
                        "capacity": {"storage": "1700G"},
                        "local": {"path": path},
                        "storageClassName": "local-storage",
                        "nodeAffinity": {
                            "required": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": "pool", "operator": "In", "values": [pool]}
                                        ]
                                    }
                                ]
                            }
                        },
                    },
                },
            }
        )
    )


def make_cache(kube: Client, name: str, groups: list[str], size: str = "10Gi", uri: str = URI) -> None:
    kube.create(
        LMCache(
            {
                "metadata": {"name": name},
                "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups},
            }
        )
    )


def entries(kube: Client, node: str) -> list[str]:
    return [e["modelName"] for e in kube.get(LMNode, node)["spec"]["localModels"]]


def cache_status(kube: Client, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.get(LMCache, name).get("status") or {}
    return status


def agent_reports(kube: Client, node: str, model: str, state: str) -> None:
    """What the node agent does: write status.modelStatus on its LocalModelNode."""
    kube.patch(LMNode.Status, node, {"status": {"modelStatus": {model: state}}}, patch_type=PatchType.MERGE)


def events_for(kube: Client, name: str) -> list[tuple[str, str]]:
    return [
        (e.type or "", e.reason or "")
        for e in kube.list(Event, namespace="default")
        if e.involvedObject.name == name
    ]


# --- tests (in order; they share one controller) --------------------------------------------------


def test_seed_walkthrough(kube: Client, env: dict[str, Any]) -> None:
    for name in ("ctl-a", "ctl-b"):
        make_node(kube, name, pool="e2e")
    make_node(kube, "ctl-c", pool="elsewhere")
    make_group(kube, "ctl-workers", "e2e")
    make_cache(kube, "ctl-llama", ["ctl-workers"])

    def lmns_ready() -> None:
        assert entries(kube, "ctl-a") == ["ctl-llama"]
        assert entries(kube, "ctl-b") == ["ctl-llama"]
        spec = kube.get(LMNode, "ctl-a")["spec"]["localModels"][0]
        assert spec == {"modelName": "ctl-llama", "sourceModelUri": URI, "nodeGroup": "ctl-workers"}

    eventually(lmns_ready, what="LocalModelNodes")
    with pytest.raises(ApiError):
        kube.get(LMNode, "ctl-c")
    assert CACHE_FINALIZER in kube.get(LMCache, "ctl-llama")["metadata"]["finalizers"]

    def volumes() -> None:
        pv = kube.get(PersistentVolume, "ctl-llama-ctl-workers-download")
        pvc = kube.get(PersistentVolumeClaim, "ctl-llama-ctl-workers", namespace=JOBS_NS)
        assert pvc.spec is not None and pvc.spec.volumeName == "ctl-llama-ctl-workers-download"
        assert pv.spec is not None and pv.spec.local is not None and pv.spec.local.path == "/models"

    eventually(volumes, what="PV/PVC")

    def daemonset() -> None:
        ds = kube.get(DaemonSet, "ctl-workers-agent", namespace="kserve")
        pod = ds.to_dict()["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert terms == [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["e2e"]}]}]
        assert pod["volumes"][0]["hostPath"]["path"] == "/models"
        container = pod["containers"][0]
        assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
        env_vars = {e["name"]: e for e in container["env"]}
        assert env_vars["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    eventually(daemonset, what="agent DaemonSet")

    def pending() -> None:
        status = cache_status(kube, "ctl-llama")
        assert status["nodeStatus"] == {"ctl-a": "NodeDownloadPending", "ctl-b": "NodeDownloadPending"}
        assert status["copies"] == {"total": 2, "available": 0, "failed": 0}

    eventually(pending, what="pending status")

    for node in ("ctl-a", "ctl-b"):
        agent_reports(kube, node, "ctl-llama", "ModelDownloaded")

    def downloaded() -> None:
        status = cache_status(kube, "ctl-llama")
        assert status["copies"] == {"total": 2, "available": 2, "failed": 0}
        assert set(status["nodeStatus"].values()) == {"NodeDownloaded"}
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        label = ready_label(storage_key(URI))
        for node in ("ctl-a", "ctl-b"):
            labels = kube.get(Node, node).metadata.labels or {}
            assert labels.get(label) == "ready"
        assert label not in (kube.get(Node, "ctl-c").metadata.labels or {})

    eventually(downloaded, what="downloaded status and ready labels")
    group_status = kube.get(LMGroup, "ctl-workers")["status"]
    assert group_status["used"] == "10Gi" and group_status["nodes"] == ["ctl-a", "ctl-b"]
    eventually(lambda: assert_has(events_for(kube, "ctl-llama"), ("Normal", "AllCopiesAvailable")))


def assert_has(items: list[T], item: T) -> None:
    assert item in items, items


def absent(kube: Client, res: Any, name: str, namespace: str | None = None) -> None:
    try:
        kube.get(res, name, namespace=namespace)
    except ApiError as exc:
        assert exc.status.code == 404
        return
    raise AssertionError(f"{name} still exists")


def test_node_join_and_leave(kube: Client, env: dict[str, Any]) -> None:
    make_node(kube, "ctl-d", pool="e2e")
    eventually(lambda: assert_has(entries(kube, "ctl-d"), "ctl-llama"), what="entry on the new node")
    eventually(lambda: assert_has(list(cache_status(kube, "ctl-llama")["nodeStatus"]), "ctl-d"))
    kube.delete(Node, "ctl-d")

    def gone() -> None:
        absent(kube, LMNode, "ctl-d")
        status = cache_status(kube, "ctl-llama")
        assert "ctl-d" not in status["nodeStatus"]
        assert status["copies"]["total"] == 2

    eventually(gone, what="departed node pruned")


def test_label_change_leaves_group(kube: Client, env: dict[str, Any]) -> None:
    make_node(kube, "ctl-e", pool="e2e")
    eventually(lambda: assert_has(entries(kube, "ctl-e"), "ctl-llama"))
    kube.patch(Node, "ctl-e", {"metadata": {"labels": {"pool": "elsewhere"}}}, patch_type=PatchType.MERGE)
    eventually(lambda: assert_has([entries(kube, "ctl-e")], []), what="entries removed after relabel")
    kube.delete(Node, "ctl-e")


def test_node_not_ready(kube: Client, env: dict[str, Any]) -> None:
    set_ready(kube, "ctl-b", False)
    try:

        def not_ready() -> None:
            status = cache_status(kube, "ctl-llama")
            assert status["nodeStatus"]["ctl-b"] == "NodeNotReady"
            assert status["copies"]["available"] == 1

        eventually(not_ready, what="NodeNotReady")
        eventually(lambda: assert_has(events_for(kube, "ctl-llama"), ("Warning", "NodeStatusChanged")))
    finally:
        set_ready(kube, "ctl-b", True)
    eventually(lambda: assert_has([cache_status(kube, "ctl-llama")["nodeStatus"]["ctl-b"]], "NodeDownloaded"))


def test_group_removed_from_cache(kube: Client, env: dict[str, Any]) -> None:
    make_node(kube, "ctl-x", pool="ctl-extra")
    make_group(kube, "ctl-extra", "ctl-extra", path="/extra")
    make_cache(kube, "ctl-multi", ["ctl-workers", "ctl-extra"], size="1Gi", uri="s3://bucket/multi")
    eventually(lambda: assert_has(entries(kube, "ctl-x"), "ctl-multi"))
    eventually(lambda: assert_has(entries(kube, "ctl-a"), "ctl-multi"))
    x_entry = kube.get(LMNode, "ctl-x")["spec"]["localModels"][0]
    assert x_entry["nodeGroup"] == "ctl-extra"
    kube.patch(LMCache, "ctl-multi", {"spec": {"nodeGroups": ["ctl-workers"]}}, patch_type=PatchType.MERGE)
    eventually(lambda: assert_has([entries(kube, "ctl-x")], []), what="entries removed from the group's node")
    assert "ctl-multi" in entries(kube, "ctl-a")
    eventually(
        lambda: assert_has([sorted(cache_status(kube, "ctl-multi")["nodeStatus"])], ["ctl-a", "ctl-b"])
    )


def test_cache_deleted_after_its_group(kube: Client, env: dict[str, Any]) -> None:
    make_node(kube, "ctl-t", pool="ctl-tmp")
    make_group(kube, "ctl-tmp", "ctl-tmp", path="/tmp-models")
    make_cache(kube, "ctl-doomed", ["ctl-tmp"], size="1Gi", uri="s3://bucket/doomed")
    eventually(lambda: assert_has(entries(kube, "ctl-t"), "ctl-doomed"))
    eventually(lambda: assert_has(kube.get(LMCache, "ctl-doomed")["metadata"]["finalizers"], CACHE_FINALIZER))
    kube.delete(LMGroup, "ctl-tmp")
    kube.delete(LMCache, "ctl-doomed")

    eventually(
        lambda: absent(kube, LMCache, "ctl-doomed"),
        what="deletion completes without its group (KServe #6154)",
    )
    assert entries(kube, "ctl-t") == []
    eventually(
        lambda: absent(kube, DaemonSet, "ctl-tmp-agent", "kserve"), what="agent DaemonSet of a deleted group"
    )


def test_capacity_rejection(kube: Client, env: dict[str, Any]) -> None:
    make_node(kube, "ctl-s", pool="ctl-small")
    make_group(kube, "ctl-small", "ctl-small", limit="15Gi", path="/small")
    make_cache(kube, "ctl-fits", ["ctl-small"], size="10Gi", uri="s3://bucket/fits")
    eventually(lambda: assert_has(entries(kube, "ctl-s"), "ctl-fits"))
    make_cache(kube, "ctl-toobig", ["ctl-small"], size="10Gi", uri="s3://bucket/toobig")

    def rejected() -> None:
        status = cache_status(kube, "ctl-toobig")
        scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
        assert scheduled["status"] == "False" and scheduled["reason"] == "StorageLimitExceeded"
        assert not status.get("nodeStatus")
        assert status["copies"]["total"] == 0

    eventually(rejected, what="capacity condition")
    assert entries(kube, "ctl-s") == ["ctl-fits"]
    eventually(lambda: assert_has(events_for(kube, "ctl-toobig"), ("Warning", "StorageLimitExceeded")))
    group_status = kube.get(LMGroup, "ctl-small")["status"]
    assert (group_status["used"], group_status["available"]) == ("10Gi", "5Gi")
    with pytest.raises(ApiError):
        kube.get(PersistentVolume, "ctl-toobig-ctl-small-download")


def test_isvc_volumes_follow_services(kube: Client, env: dict[str, Any]) -> None:
    isvc = ISVC(
        {
            "metadata": {
                "name": "ctl-svc",
                "namespace": "ctl-isvc",
                "labels": {"internal.serving.kserve.io/localmodel": "ctl-llama"},
            },
            "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": URI}}},
        }
    )
    kube.create(isvc)

    def served() -> None:
        status = cache_status(kube, "ctl-llama")
        assert status["inferenceServices"] == [{"name": "ctl-svc", "namespace": "ctl-isvc"}]
        pvc = kube.get(PersistentVolumeClaim, "ctl-llama-ctl-workers", namespace="ctl-isvc")
        assert pvc.spec is not None and pvc.spec.volumeName == "ctl-llama-ctl-workers-ctl-isvc"
        kube.get(PersistentVolume, "ctl-llama-ctl-workers-ctl-isvc")

    eventually(served, what="ISVC listed, serving PV/PVC")
    # the label goes (e.g. serving.kserve.io/disable-localmodel set later): as good as deleted
    label_off = {"metadata": {"labels": {"internal.serving.kserve.io/localmodel": None}}}
    kube.patch(ISVC, "ctl-svc", label_off, namespace="ctl-isvc", patch_type=PatchType.MERGE)

    def unserved() -> None:
        assert not cache_status(kube, "ctl-llama").get("inferenceServices")
        absent(kube, PersistentVolumeClaim, "ctl-llama-ctl-workers", "ctl-isvc")
        absent(kube, PersistentVolume, "ctl-llama-ctl-workers-ctl-isvc")

    eventually(unserved, what="serving PV/PVC removed")
    kube.delete(ISVC, "ctl-svc", namespace="ctl-isvc")
    kube.get(PersistentVolumeClaim, "ctl-llama-ctl-workers", namespace=JOBS_NS)  # download PVC stays


def test_namespace_cache(kube: Client, env: dict[str, Any]) -> None:
    """LocalModelNamespaceCache: namespaced entry and status key, KServe's volume names, finalizer."""
    kube.create(
        LMNsCache(
            {
                "metadata": {"name": "ctl-team", "namespace": "ctl-isvc"},
                "spec": {
                    "sourceModelUri": "s3://bucket/team",
                    "modelSize": "1Gi",
                    "nodeGroups": ["ctl-workers"],
                },
            }
        )
    )

    def sent() -> None:
        found = [e for e in kube.get(LMNode, "ctl-a")["spec"]["localModels"] if e["modelName"] == "ctl-team"]
        assert len(found) == 1
        entry = found[0]
        assert entry["namespace"] == "ctl-isvc"
        kube.get(PersistentVolumeClaim, "ctl-team-ctl-workers-ctl-isvc-download", namespace=JOBS_NS)
        kube.get(PersistentVolume, "ctl-team-ctl-workers-ctl-isvc-download")

    eventually(sent, what="namespace cache on the nodes")
    for node in ("ctl-a", "ctl-b"):
        agent_reports(kube, node, "ctl-isvc/ctl-team", "ModelDownloaded")

    def available() -> None:
        obj = kube.get(LMNsCache, "ctl-team", namespace="ctl-isvc")
        assert obj["status"]["copies"] == {"total": 2, "available": 2, "failed": 0}
        assert NAMESPACE_CACHE_FINALIZER in obj["metadata"]["finalizers"]

    eventually(available, what="namespace cache status")
    kube.delete(LMNsCache, "ctl-team", namespace="ctl-isvc")
    eventually(lambda: absent(kube, LMNsCache, "ctl-team", "ctl-isvc"), what="namespace cache deletion")
    assert "ctl-team" not in entries(kube, "ctl-a")
    eventually(lambda: absent(kube, PersistentVolume, "ctl-team-ctl-workers-ctl-isvc-download"))


def test_config_change_reread(kube: Client, env: dict[str, Any]) -> None:
    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    original = dict(cm.data or {})
    local = json.loads(original["localModel"])
    local["localModelAgentImage"] = "example.org/agent:e2e"
    try:
        kube.patch(
            ConfigMap,
            "inferenceservice-config",
            {"data": {"localModel": json.dumps(local)}},
            namespace="kserve",
            patch_type=PatchType.MERGE,
        )

        def image() -> None:
            ds = kube.get(DaemonSet, "ctl-workers-agent", namespace="kserve")
            assert ds.spec is not None and ds.spec.template.spec is not None
            assert ds.spec.template.spec.containers[0].image == "example.org/agent:e2e"

        eventually(image, what="DaemonSet follows the config")
    finally:
        kube.patch(
            ConfigMap,
            "inferenceservice-config",
            {"data": original},
            namespace="kserve",
            patch_type=PatchType.MERGE,
        )


def test_two_replicas(kube: Client, env: dict[str, Any]) -> None:
    first: Replica = env["replicas"][0]
    second = Replica(env["argv"], env["kubeconfig"], env["tmp"] / "controller-2.log")
    env["replicas"].append(second)
    eventually(lambda: assert_has([second.text().count("waiting for lease")], 1), what="standby replica")
    assert first.alive() and second.alive()
    holder = kube.get(Lease, "modelcache-controller", namespace="kserve").spec.holderIdentity
    assert holder and holder in first.text() and holder not in second.text()

    # no fighting: converged objects keep their resourceVersion while both replicas run
    make_cache(kube, "ctl-pair", ["ctl-workers"], size="1Gi", uri="s3://bucket/pair")
    eventually(lambda: assert_has(entries(kube, "ctl-b"), "ctl-pair"))
    eventually(lambda: assert_has([cache_status(kube, "ctl-pair").get("copies", {}).get("total")], 2))
    time.sleep(1.0)  # let the last echo settle before taking the baseline
    before = (
        kube.get(LMNode, "ctl-a")["metadata"]["resourceVersion"],
        kube.get(LMCache, "ctl-pair")["metadata"]["resourceVersion"],
    )
    time.sleep(3.0)
    after = (
        kube.get(LMNode, "ctl-a")["metadata"]["resourceVersion"],
        kube.get(LMCache, "ctl-pair")["metadata"]["resourceVersion"],
    )
    assert before == after, "objects keep changing: replicas fighting"
    assert first.alive() and second.alive()

    # the leader goes away cleanly: the standby takes over and reconciles
    assert first.stop() == 0
    eventually(lambda: assert_has([second.text().count("acquired lease")], 1), what="failover")
    kube.delete(LMCache, "ctl-pair")
    eventually(lambda: absent(kube, LMCache, "ctl-pair"), what="deletion by the new leader")
    assert "ctl-pair" not in entries(kube, "ctl-a")
    assert second.alive()
