"""The dev control plane is a real, RBAC-enforcing apiserver that speaks KServe's CRDs."""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from lightkube import ApiError, Client, codecs
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import load_in_cluster_generic_resources
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import ConfigMap, Node
from lightkube.resources.rbac_authorization_v1 import ClusterRole, ClusterRoleBinding

from modelcache.dev import LOCAL_MODEL_DEFAULTS, ControlPlaneInfo, reference_dir

pytestmark = pytest.mark.e2e

T = TypeVar("T")

KSERVE_CRDS = [
    "localmodelcaches.serving.kserve.io",
    "localmodelnamespacecaches.serving.kserve.io",
    "localmodelnodegroups.serving.kserve.io",
    "localmodelnodes.serving.kserve.io",
    "inferenceservices.serving.kserve.io",
    "clusterstoragecontainers.serving.kserve.io",
]
SEED_KINDS = [
    "ClusterStorageContainer",
    "LocalModelNodeGroup",
    "LocalModelCache",
    "LocalModelNode",
    "InferenceService",
]


def eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    """Retry `check` until it stops raising (RBAC and discovery caches settle asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, ApiError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def seed_manifests() -> dict[str, dict[str, Any]]:
    """The applicable manifests of seed 000 (KServe's Local Model Cache guide), by kind.

    Taken from its ```yaml blocks. The block titled "LocalModelCache Status" shows an older shape
    (`nodeGroup:` singular) and is output, not a manifest; the Secret is out of scope.
    """
    ref = reference_dir()
    assert ref is not None, "reference dir not found: set MODELCACHE_REFERENCE_DIR"
    seeds = sorted((ref / "seeds").glob("000_*.txt"))
    assert seeds, f"no seed 000 in {ref / 'seeds'}"
    text = seeds[0].read_text()
    found: dict[str, dict[str, Any]] = {}
    for header, body in re.findall(r"^```yaml([^\n]*)\n(.*?)^```", text, flags=re.M | re.S):
        if "Status" in header:
            continue
        for doc in yaml.safe_load_all(body):
            if isinstance(doc, dict) and doc.get("kind") in SEED_KINDS and "apiVersion" in doc:
                found[doc["kind"]] = doc
    return found


def _version(info: ControlPlaneInfo) -> dict[str, Any]:
    pki = info.layout.pki
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    with opener.open(f"{info.server}/version", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def test_apiserver_ready(control_plane: ControlPlaneInfo) -> None:
    from modelcache.dev.controlplane import apiserver_ready

    assert apiserver_ready(control_plane.server, control_plane.layout.pki)
    assert _version(control_plane)["gitVersion"] == "v1.20.2"
    assert control_plane.kubeconfig.is_file()
    assert control_plane.kubeconfig.stat().st_mode & 0o077 == 0, "kubeconfig holds a key: owner only"
    state = json.loads((control_plane.home / "dev" / "state.json").read_text())
    assert state["apiserver"]["pid"] == control_plane.apiserver.pid
    assert state["ready"] is True


def test_status_from_state(control_plane: ControlPlaneInfo) -> None:
    from modelcache.dev import status

    current = status(control_plane.home)
    assert current.phase == "running"
    assert current.processes == {"kube-apiserver": True, "etcd": True}


@pytest.mark.parametrize("name", KSERVE_CRDS)
def test_crd_established(kube: Client, control_plane: ControlPlaneInfo, name: str) -> None:
    assert name in control_plane.crds
    crd = kube.get(CustomResourceDefinition, name)
    assert crd.status is not None
    conditions = {c.type: c.status for c in crd.status.conditions or []}
    assert conditions.get("Established") == "True"


def test_cluster_storage_container_crd_lost_only_empty_defaults(kube: Client) -> None:
    """We strip `default: ""` (1.20 rejects it); the rest of the schema must be KServe's."""
    crd = kube.get(CustomResourceDefinition, "clusterstoragecontainers.serving.kserve.io")
    served = json.dumps(crd.to_dict())
    assert '"default": ""' not in served
    assert "supportedUriFormats" in served and "workloadType" in served


def test_seed_contains_every_kind() -> None:
    assert sorted(seed_manifests()) == sorted(SEED_KINDS)


@pytest.fixture
def generic_kube(kube: Client) -> Iterator[Client]:
    load_in_cluster_generic_resources(kube)
    yield kube


@pytest.mark.parametrize("kind", SEED_KINDS)
def test_seed_manifest_accepted(generic_kube: Client, kind: str) -> None:
    doc = seed_manifests()[kind]
    obj: Any = codecs.from_dict(doc)
    namespace = "default" if isinstance(obj, NamespacedResource) else None
    if namespace:
        obj.metadata.namespace = namespace
    created = generic_kube.create(obj)
    try:
        assert created.metadata.name == doc["metadata"]["name"]
        stored = generic_kube.get(type(obj), doc["metadata"]["name"], namespace=namespace)
        assert stored.to_dict()["spec"] == created.to_dict()["spec"]
        if kind == "LocalModelCache":
            assert stored["spec"]["sourceModelUri"] == "hf://meta-llama/meta-llama-3-8b-instruct"
            assert stored["spec"]["nodeGroups"] == ["workers"]
        if kind == "LocalModelNodeGroup":
            assert stored["spec"]["storageLimit"] == "1.7T"
    finally:
        generic_kube.delete(type(obj), doc["metadata"]["name"], namespace=namespace)


def test_nodes_ready(kube: Client, control_plane: ControlPlaneInfo) -> None:
    nodes = {n.metadata.name: n for n in kube.list(Node) if n.metadata and n.metadata.name}
    assert control_plane.nodes == ("dev-node-1", "dev-node-2")
    assert set(control_plane.nodes) <= set(nodes)
    for name in control_plane.nodes:
        node = nodes[name]
        assert node.metadata is not None and node.metadata.labels is not None
        assert node.metadata.labels["kubernetes.io/hostname"] == name
        assert node.status is not None
        ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
        assert [c.status for c in ready] == ["True"]
        taints = (node.spec.taints if node.spec else None) or []
        assert not [t for t in taints if t.key.startswith("node.kubernetes.io/not-ready")]


def test_kserve_config(kube: Client) -> None:
    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    assert cm.data is not None
    assert json.loads(cm.data["localModel"]) == LOCAL_MODEL_DEFAULTS
    assert LOCAL_MODEL_DEFAULTS["jobNamespace"] == "kserve-localmodel-jobs"
    assert LOCAL_MODEL_DEFAULTS["reconcilationFrequencyInSecs"] == 60


def test_rbac_is_enforced(kube: Client, control_plane: ControlPlaneInfo, tmp_path: Path) -> None:
    """An unprivileged minted user is forbidden; a ClusterRoleBinding then lets it in."""
    kubeconfig = control_plane.mint_user("alice", ["dev-testers"], path=tmp_path / "alice.kubeconfig")
    with control_plane.client(kubeconfig) as alice:
        with pytest.raises(ApiError) as forbidden:
            list(alice.list(Node))
        assert forbidden.value.status.code == 403
        assert "alice" in (forbidden.value.status.message or "")

        kube.create(
            ClusterRole(
                metadata=ObjectMeta(name="e2e-node-reader"),
                rules=[PolicyRule(apiGroups=[""], resources=["nodes"], verbs=["get", "list"])],
            )
        )
        kube.create(
            ClusterRoleBinding(
                metadata=ObjectMeta(name="e2e-node-reader"),
                roleRef=RoleRef(
                    apiGroup="rbac.authorization.k8s.io", kind="ClusterRole", name="e2e-node-reader"
                ),
                subjects=[Subject(kind="Group", name="dev-testers", apiGroup="rbac.authorization.k8s.io")],
            )
        )
        try:
            names = eventually(lambda: [n.metadata.name for n in alice.list(Node) if n.metadata])
            assert "dev-node-1" in names
            with pytest.raises(ApiError) as still_forbidden:
                alice.get(ConfigMap, "inferenceservice-config", namespace="kserve")
            assert still_forbidden.value.status.code == 403
        finally:
            kube.delete(ClusterRoleBinding, "e2e-node-reader")
            kube.delete(ClusterRole, "e2e-node-reader")
