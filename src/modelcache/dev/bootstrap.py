"""What a fresh apiserver needs before our components can run against it: CRDs, KServe's config, nodes.

Everything here is idempotent (server-side apply with one field manager), so `up` can run it again on
a control plane that is already running.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from lightkube import ApiError, Client, codecs
from lightkube.core.resource import GlobalResource, NamespacedResource
from lightkube.generic_resource import load_in_cluster_generic_resources
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import ConfigMap, Namespace, Node
from lightkube.types import PatchType

from modelcache.errors import ModelcacheError

FIELD_MANAGER = "modelcache-dev"
KSERVE_NAMESPACE = "kserve"
INFERENCESERVICE_CONFIG = "inferenceservice-config"

#: KServe's `localModel` defaults (pkg/apis/serving/v1beta1 LocalModelConfig; the typo is theirs).
LOCAL_MODEL_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "jobNamespace": "kserve-localmodel-jobs",
    "defaultJobImage": "kserve/storage-initializer:latest",
    "fsGroup": 1000,
    "jobTTLSecondsAfterFinished": 3600,
    "reconcilationFrequencyInSecs": 60,
    "disableVolumeManagement": False,
}

#: What a simulated node reports. Fixed, so tests do not depend on the machine they run on.
NODE_CAPACITY = {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


class BootstrapError(ModelcacheError):
    """The apiserver refused or did not settle something `up` needs."""


@dataclass
class Manifests:
    """YAML documents found in manifest directories: CRDs by name (later dirs win), then the rest."""

    crds: dict[str, dict[str, Any]] = field(default_factory=dict)
    others: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


def load_manifests(dirs: Iterable[Path]) -> Manifests:
    """Read every *.yaml/*.yml in `dirs` (in order); a CRD in a later dir replaces one of the same name.

    This is how our own CRDs in `deploy/crds/` take over from KServe's reference copies.
    """
    found = Manifests()
    for directory in dirs:
        files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
        for path in files:
            found.sources.append(path)
            try:
                docs = list(yaml.safe_load_all(path.read_text()))
            except yaml.YAMLError as exc:
                raise BootstrapError(f"{path}: not valid YAML: {exc}") from exc
            for doc in docs:
                if not isinstance(doc, dict) or "kind" not in doc:
                    continue
                if doc["kind"] == "CustomResourceDefinition":
                    name = (doc.get("metadata") or {}).get("name")
                    if not name:
                        raise BootstrapError(f"{path}: CustomResourceDefinition without metadata.name")
                    found.crds[str(name)] = doc
                else:
                    found.others.append(doc)
    return found


def strip_empty_string_defaults(node: Any) -> Any:
    """Drop `default: ""` from a CRD schema (deep copy).

    kube-apiserver 1.20 reads an empty-string default as null and rejects the CRD (KServe's
    ClusterStorageContainer has seven). An absent default and "" mean the same to our code.
    """
    if isinstance(node, dict):
        return {
            k: strip_empty_string_defaults(v) for k, v in node.items() if not (k == "default" and v == "")
        }
    if isinstance(node, list):
        return [strip_empty_string_defaults(v) for v in node]
    return node


def create_or_replace(client: Client, doc: Mapping[str, Any], namespace: str | None = None) -> None:
    """POST the object, or PUT it over an existing one.

    Not server-side apply: 1.20's apply checks bodies against its own typed schema and refuses
    fields it predates (e.g. `x-kubernetes-validations` in KServe's CRDs), while create/update just
    drop them, which is what "stored but not enforced" on an old apiserver should mean.
    """
    obj = cast(GlobalResource | NamespacedResource, codecs.from_dict(dict(doc)))
    meta: ObjectMeta | None = getattr(obj, "metadata", None)
    if meta is None or not meta.name:
        raise BootstrapError(f"{doc.get('kind')} without metadata.name")
    if isinstance(obj, NamespacedResource) and not meta.namespace:
        meta.namespace = namespace or "default"
    try:
        client.create(obj, field_manager=FIELD_MANAGER)
        return
    except ApiError as exc:
        if exc.status.code != 409:
            raise
    kind: Any = type(obj)  # lightkube's overloads cannot express "the type of this object"
    current = client.get(kind, meta.name, namespace=meta.namespace)
    current_meta: ObjectMeta | None = getattr(current, "metadata", None)
    meta.resourceVersion = current_meta.resourceVersion if current_meta else None
    client.replace(obj, field_manager=FIELD_MANAGER)


def apply_crds(client: Client, crds: Mapping[str, Mapping[str, Any]], timeout: float = 60.0) -> list[str]:
    """Apply CRDs and wait until every one is Established; returns their names."""
    for name, doc in crds.items():
        try:
            create_or_replace(client, strip_empty_string_defaults(doc))
        except ApiError as exc:
            raise BootstrapError(f"CRD {name} rejected: {exc.status.message}") from exc
    wait_established(client, list(crds), timeout)
    return sorted(crds)


def wait_established(client: Client, names: Sequence[str], timeout: float) -> None:
    """Poll until each CRD has condition Established=True (its REST endpoint is then served)."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        name = pending[0]
        crd = client.get(CustomResourceDefinition, name)
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise BootstrapError(f"CRD {name} not Established after {timeout:.0f}s")
        time.sleep(0.1)


def apply_documents(client: Client, docs: Sequence[Mapping[str, Any]], namespace: str = "default") -> None:
    """Create or replace any objects (custom kinds too); namespaced ones without one go to `namespace`."""
    if not docs:
        return
    load_in_cluster_generic_resources(client)
    for doc in docs:
        try:
            create_or_replace(client, doc, namespace)
        except ApiError as exc:
            name = doc.get("metadata", {}).get("name", "?")
            raise BootstrapError(f"{doc.get('kind')} {name} rejected: {exc.status.message}") from exc


def ensure_kserve_config(client: Client, local_model: Mapping[str, Any] | None = None) -> None:
    """Namespaces `default` and `kserve`, and `inferenceservice-config` with KServe's localModel defaults."""
    for ns in ("default", KSERVE_NAMESPACE):
        client.apply(Namespace(metadata=ObjectMeta(name=ns)), field_manager=FIELD_MANAGER, force=True)
    config = ConfigMap(
        metadata=ObjectMeta(name=INFERENCESERVICE_CONFIG, namespace=KSERVE_NAMESPACE),
        data={"localModel": json.dumps(dict(local_model or LOCAL_MODEL_DEFAULTS), indent=2)},
    )
    client.apply(config, field_manager=FIELD_MANAGER, force=True)


def node_names(count: int) -> list[str]:
    return [f"dev-node-{i}" for i in range(1, count + 1)]


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def ensure_nodes(client: Client, count: int) -> list[str]:
    """Create `dev-node-1..count`, Ready, untainted. Existing extra nodes are left alone.

    There is no kubelet: we write what one would report, through the status subresource (the main
    resource ignores status). The TaintNodesByCondition admission plugin taints new nodes not-ready
    and only the node lifecycle controller (absent here) would lift it, so we lift it ourselves.
    """
    names = node_names(count)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in names:
        node = Node(
            metadata=ObjectMeta(
                name=name,
                labels={
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": _arch(),
                },
            ),
            spec=NodeSpec(),
        )
        client.apply(node, field_manager=FIELD_MANAGER, force=True)
        current = client.get(Node, name)
        taints = (current.spec.taints if current.spec else None) or []
        kept = [t.to_dict() for t in taints if t.key != NOT_READY_TAINT]
        if len(kept) != len(taints):
            client.patch(Node, name, {"spec": {"taints": kept or None}}, patch_type=PatchType.MERGE)
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "simulated by modelcache dev (no kubelet)",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
                "capacity": NODE_CAPACITY,
                "allocatable": NODE_CAPACITY,
            }
        }
        client.patch(Node.Status, name, status, patch_type=PatchType.MERGE)
    return names


def bootstrap(
    client: Client, manifest_dirs: Sequence[Path], nodes: int, timeout: float = 60.0
) -> tuple[list[str], list[str]]:
    """CRDs (+ other manifests), KServe config, nodes. Returns (CRD names, node names)."""
    manifests = load_manifests(manifest_dirs)
    crds = apply_crds(client, manifests.crds, timeout) if manifests.crds else []
    ensure_kserve_config(client)
    apply_documents(client, manifests.others)
    return crds, ensure_nodes(client, nodes)
