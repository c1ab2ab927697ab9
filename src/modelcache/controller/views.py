"""Observed cluster state as plain, immutable views, parsed from the raw API objects the edge feeds
(pure). The names on the wire the controller itself writes and reads are here too."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcache.domain import (
    Term,
    parse_terms,
    status_key,
)
from modelcache.errors import UsageError
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import (
    CACHE_FINALIZER,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_ANNOTATION,
    NAMESPACE_CACHE_FINALIZER,
    NODEGROUP_ANNOTATION,
)
from modelcache.quantity import parse_quantity

from .jobs import DownloadJob

# Names only the controller writes and reads (the lead may move them to kube/constants.py).
#: Role of a PV/PVC we created: "download" (jobNamespace) or "serving" (an ISVC namespace).
VOLUME_ROLE_LABEL = "modelcache.io/volume-role"
#: Which cache a PV/PVC belongs to: "<name>" or "<namespace>/<name>" (annotation: names exceed 63 chars).
VOLUME_CACHE_ANNOTATION = "modelcache.io/cache"
#: Label on agent DaemonSets and their pods; the value is the node group (hashed when too long).
NODE_GROUP_LABEL = "modelcache.io/node-group"
COMPONENT_LABEL = "app.kubernetes.io/component"
AGENT_COMPONENT = "node-agent"
AGENT_APP_NAME = "modelcache-agent"
#: Hash of the DaemonSet spec we wrote, so server-side defaulting never looks like drift.
SPEC_HASH_ANNOTATION = "modelcache.io/spec-hash"
DEFAULT_AGENT_IMAGE = "ghcr.io/modelcache/modelcache:latest"
DEFAULT_AGENT_SERVICE_ACCOUNT = "modelcache-agent"

CONDITION_READY = "Ready"
CONDITION_SCHEDULED = "Scheduled"

_MAX_NAMES_IN_MESSAGE = 5


# --- observed state (plain, immutable views of API objects) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: Mapping[str, str]
    ready: bool


@dataclass(frozen=True, slots=True)
class NodeGroup:
    name: str
    uid: str
    storage_limit: int | None  # None: unparsable, nothing fits
    terms: tuple[Term, ...]  # empty: selects no node (KServe: no nodeAffinity matches nothing)
    pv_spec: Mapping[str, Any]
    pvc_spec: Mapping[str, Any]
    local_path: str | None
    status: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Cache:
    """A LocalModelCache (namespace "") or LocalModelNamespaceCache."""

    namespace: str
    name: str
    uid: str
    source_uri: str
    model_size: int | None  # None: unparsable, fits nowhere
    node_groups: tuple[str, ...]
    service_account: str = ""
    storage: Mapping[str, Any] | None = None
    deleting: bool = False
    finalizers: tuple[str, ...] = ()
    resource_version: str = ""
    created: str = ""
    generation: int | None = None
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def kind(self) -> str:
        return "LocalModelNamespaceCache" if self.namespace else "LocalModelCache"

    @property
    def finalizer(self) -> str:
        return NAMESPACE_CACHE_FINALIZER if self.namespace else CACHE_FINALIZER

    @property
    def status_key(self) -> str:
        """Key in LocalModelNode status.modelStatus (KServe's GetStatusKey)."""
        return status_key(self.namespace, self.name)

    def entry(self, group: str) -> Entry:
        return Entry(
            model_name=self.name,
            source_uri=self.source_uri,
            namespace=self.namespace,
            node_group=group,
            service_account=self.service_account,
            storage=_canonical(self.storage) if self.storage else "",
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One `spec.localModels` item; strings interned since 1,000 nodes repeat the same 100 entries."""

    model_name: str
    source_uri: str
    namespace: str = ""
    node_group: str = ""
    service_account: str = ""
    storage: str = ""  # canonical JSON of the storage spec, "" when absent

    @property
    def ident(self) -> tuple[str, str]:
        return (self.namespace, self.model_name)

    @property
    def status_key(self) -> str:
        return status_key(self.namespace, self.model_name)

    def to_wire(self) -> dict[str, Any]:
        """KServe's JSON (omitempty fields left out)."""
        out: dict[str, Any] = {"modelName": self.model_name, "sourceModelUri": self.source_uri}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.node_group:
            out["nodeGroup"] = self.node_group
        if self.service_account:
            out["serviceAccountName"] = self.service_account
        if self.storage:
            out["storage"] = json.loads(self.storage)
        return out


@dataclass(frozen=True, slots=True)
class ModelNode:
    """A LocalModelNode: its entries and what its agent reports."""

    name: str
    entries: tuple[Entry, ...]
    model_status: Mapping[str, str]
    progress: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    """A workload using a cache: an InferenceService or LLMInferenceService carrying the localmodel
    label, or a plain Pod annotated `modelcache.io/model` (kind "Pod"; it needs the serving PVC in
    its namespace like an ISVC, but is not listed in the cache's status)."""

    kind: str
    namespace: str
    name: str
    cache: str
    cache_namespace: str = ""  # the localmodel-namespace label: uses a namespace cache
    node_group: str = ""  # serving.kserve.io/nodegroup annotation


@dataclass(frozen=True, slots=True)
class Volume:
    """A PV (namespace "") or PVC we created."""

    kind: str
    namespace: str
    name: str
    role: str
    cache: str  # "<name>" or "<namespace>/<name>"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything the controller knows. `volumes`/`daemonsets` None: not listed, leave them alone."""

    namespace: str  # the controller's namespace (agent DaemonSets, config)
    config: LocalModelConfig
    nodes: Mapping[str, Node]
    groups: Mapping[str, NodeGroup]
    caches: Sequence[Cache]
    model_nodes: Mapping[str, ModelNode]
    services: Sequence[Service] = ()
    volumes: Sequence[Volume] | None = None
    daemonsets: Mapping[str, str] | None = None  # name -> spec hash annotation
    agent_image: str = DEFAULT_AGENT_IMAGE
    agent_settings: Mapping[str, Any] = field(default_factory=dict)  # see apply_agent_settings
    #: our download Jobs in jobNamespace (None: not listed, leave Jobs alone) and the
    #: ClusterStorageContainers that pick their image (see controller/jobs.py)
    jobs: Sequence[DownloadJob] | None = None
    storage_containers: Sequence[Mapping[str, Any]] = ()


# --- parsing API objects into views (pure; the edge feeds raw dicts) ------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _intern(text: Any) -> str:
    return sys.intern(str(text)) if text else ""


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _quantity(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_quantity(value if isinstance(value, int) else str(value))
    except UsageError:
        return None


def node_from(obj: Mapping[str, Any]) -> Node:
    meta = _meta(obj)
    conditions = (obj.get("status") or {}).get("conditions") or ()
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    labels = {_intern(k): _intern(v) for k, v in (meta.get("labels") or {}).items()}
    return Node(name=_intern(meta.get("name")), labels=labels, ready=ready)


def group_from(obj: Mapping[str, Any]) -> NodeGroup:
    meta, spec = _meta(obj), obj.get("spec") or {}
    pv_spec = spec.get("persistentVolumeSpec") or {}
    path = (pv_spec.get("local") or {}).get("path") or (pv_spec.get("hostPath") or {}).get("path")
    return NodeGroup(
        name=_intern(meta.get("name")),
        uid=str(meta.get("uid", "")),
        storage_limit=_quantity(spec.get("storageLimit")),
        terms=parse_terms(pv_spec),
        pv_spec=pv_spec,
        pvc_spec=spec.get("persistentVolumeClaimSpec") or {},
        local_path=str(path) if path else None,
        status=dict(obj.get("status") or {}),
    )


def cache_from(obj: Mapping[str, Any]) -> Cache:
    meta, spec = _meta(obj), obj.get("spec") or {}
    namespace = "" if obj.get("kind") == "LocalModelCache" else (meta.get("namespace") or "")
    return Cache(
        namespace=_intern(namespace),
        name=_intern(meta.get("name")),
        uid=str(meta.get("uid", "")),
        source_uri=_intern(spec.get("sourceModelUri")),
        model_size=_quantity(spec.get("modelSize")),
        node_groups=tuple(_intern(g) for g in spec.get("nodeGroups") or ()),
        service_account=_intern(spec.get("serviceAccountName")),
        storage=spec.get("storage") or None,
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(meta.get("finalizers") or ()),
        resource_version=str(meta.get("resourceVersion", "")),
        created=str(meta.get("creationTimestamp", "")),
        generation=meta.get("generation"),
        status=dict(obj.get("status") or {}),
    )


def entry_from(raw: Mapping[str, Any]) -> Entry:
    storage = raw.get("storage")
    return Entry(
        model_name=_intern(raw.get("modelName")),
        source_uri=_intern(raw.get("sourceModelUri")),
        namespace=_intern(raw.get("namespace")),
        node_group=_intern(raw.get("nodeGroup")),
        service_account=_intern(raw.get("serviceAccountName")),
        storage=_intern(_canonical(storage)) if storage else "",
    )


def model_node_from(obj: Mapping[str, Any]) -> ModelNode:
    meta, status = _meta(obj), obj.get("status") or {}
    raw_entries = (obj.get("spec") or {}).get("localModels") or ()
    return ModelNode(
        name=_intern(meta.get("name")),
        entries=tuple(entry_from(e) for e in raw_entries if isinstance(e, Mapping)),
        model_status={_intern(k): _intern(v) for k, v in (status.get("modelStatus") or {}).items()},
        progress={_intern(k): v for k, v in (status.get("models") or {}).items() if isinstance(v, Mapping)},
        uid=str(meta.get("uid", "")),
    )


def service_from(obj: Mapping[str, Any]) -> Service | None:
    """None when the object does not use a cache (no localmodel label)."""
    meta = _meta(obj)
    labels = meta.get("labels") or {}
    cache = labels.get(LOCALMODEL_LABEL)
    if not cache:
        return None
    return Service(
        kind=str(obj.get("kind", "InferenceService")),
        namespace=_intern(meta.get("namespace")),
        name=str(meta.get("name", "")),
        cache=_intern(cache),
        cache_namespace=_intern(labels.get(LOCALMODEL_NAMESPACE_LABEL)),
        node_group=_intern((meta.get("annotations") or {}).get(NODEGROUP_ANNOTATION)),
    )


def pod_service_from(obj: Mapping[str, Any]) -> Service | None:
    """A plain pod that asked for a cache by annotation; None when it did not or has finished."""
    meta = _meta(obj)
    annotations = meta.get("annotations") or {}
    cache = annotations.get(MODEL_ANNOTATION)
    phase = (obj.get("status") or {}).get("phase")
    if not cache or meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
        return None
    return Service(
        kind="Pod",
        namespace=_intern(meta.get("namespace")),
        name=str(meta.get("name", "")),
        cache=_intern(cache),
        node_group=_intern(annotations.get(NODEGROUP_ANNOTATION)),
    )


def volume_from(obj: Mapping[str, Any]) -> Volume | None:
    """None unless we created it (managed-by label and a role)."""
    meta = _meta(obj)
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or not labels.get(VOLUME_ROLE_LABEL):
        return None
    kind = str(obj.get("kind") or ("PersistentVolumeClaim" if meta.get("namespace") else "PersistentVolume"))
    return Volume(
        kind=kind,
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name", "")),
        role=str(labels[VOLUME_ROLE_LABEL]),
        cache=str((meta.get("annotations") or {}).get(VOLUME_CACHE_ANNOTATION, "")),
    )
