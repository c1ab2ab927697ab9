"""Every controller decision, as pure functions: observed cluster state in, a `Plan` of writes out.

Level-based: `plan()` recomputes the whole desired state (LocalModelNode entries, cache and node-group
status, PV/PVC set, agent DaemonSets, ready-model node labels, finalizers) from what is observed and
emits only the differences, so running it twice on the same input gives the same plan and running it
on a converged cluster gives an empty one. Nothing here talks to a server or reads a clock.

KServe behaviour kept on purpose: LocalModelNode named after its node with one entry per cache
(`modelName`, `sourceModelUri`, `namespace`, `nodeGroup`, `serviceAccountName`, `storage`), status key
`modelName` or `namespace/modelName`, ModelDownload* -> NodeDownload* (missing -> Pending), copies
total/available/failed over nodeStatus, PV/PVC names. KServe gaps fixed on purpose: departed nodes are
pruned from nodeStatus and their LocalModelNodes deleted (#6159), every node group is watched (not only
the first), storageLimit is enforced (#6137), deletion never waits on a missing group or node (#6154),
and a not-ready member node always shows NodeNotReady (KServe keeps an older value if it had one).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcache import domain
from modelcache.api.types import API_VERSION, ModelStatus, NodeStatus
from modelcache.domain import (
    REASON_GROUP_MISSING,
    REASON_STORAGE_LIMIT,
    Claim,
    Placement,
    Requirement,
    StoragePolicy,
    Term,
    parse_terms,
    requirement_matches,
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
    READY_NODE_LABEL_PREFIX,
    READY_NODE_LABEL_VALUE,
    ready_label,
)
from modelcache.quantity import parse_quantity
from modelcache.uri import storage_key

from .jobs import DownloadJob, JobEntry, plan_jobs

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

#: Re-exported: these rules live in `modelcache.domain`, shared with the webhook and the agent.
__all__ = ["REASON_STORAGE_LIMIT", "Requirement", "needs_download_job", "requirement_matches"]
needs_download_job = domain.needs_download_job

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


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """What an event is about (involvedObject)."""

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    ref: ObjectRef
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class FinalizerPatch:
    cache: tuple[str, str]
    resource_version: str
    finalizers: tuple[str, ...]


@dataclass
class Plan:
    """The writes that take the cluster from observed to desired, each one idempotent."""

    finalizers: list[FinalizerPatch] = field(default_factory=list)
    lmn_creates: list[dict[str, Any]] = field(default_factory=list)
    lmn_updates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lmn_deletes: list[str] = field(default_factory=list)
    cache_status: list[tuple[tuple[str, str], dict[str, Any]]] = field(default_factory=list)
    group_status: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    volume_creates: list[tuple[ObjectRef, dict[str, Any]]] = field(default_factory=list)  # (cache, PV/PVC)
    volume_deletes: list[Volume] = field(default_factory=list)
    daemonset_applies: list[dict[str, Any]] = field(default_factory=list)
    daemonset_deletes: list[str] = field(default_factory=list)
    node_labels: dict[str, dict[str, str | None]] = field(default_factory=dict)
    job_creates: list[dict[str, Any]] = field(default_factory=list)
    job_deletes: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    #: LocalModelNode status.modelStatus entries a download Job reports (node -> key -> value)
    lmn_status: dict[str, dict[str, str]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of writes (events excluded): 0 means converged."""
        return (
            len(self.finalizers)
            + len(self.lmn_creates)
            + len(self.lmn_updates)
            + len(self.lmn_deletes)
            + len(self.cache_status)
            + len(self.group_status)
            + len(self.volume_creates)
            + len(self.volume_deletes)
            + len(self.daemonset_applies)
            + len(self.daemonset_deletes)
            + len(self.node_labels)
            + len(self.job_creates)
            + len(self.job_deletes)
            + len(self.lmn_status)
        )


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


# --- node membership ------------------------------------------------------------------------------


def term_matches(term: Term, node: Node) -> bool:
    return domain.term_matches(term, node.name, node.labels)


def node_in_group(group: NodeGroup, node: Node) -> bool:
    """Terms are ORed; no nodeAffinity selects no node (KServe's CheckNodeAffinity): domain.selects."""
    return domain.selects(group.terms, node.name, node.labels)


def group_members(group: NodeGroup, nodes: Iterable[Node]) -> list[str]:
    return sorted(n.name for n in nodes if node_in_group(group, n))


# --- capacity -------------------------------------------------------------------------------------


def claim_of(cache: Cache) -> Claim:
    return Claim(
        ref=cache.ref,
        key=storage_key(cache.source_uri),
        size=cache.model_size,
        groups=cache.node_groups,
        created=cache.created,
        deleting=cache.deleting,
    )


def place(
    caches: Sequence[Cache], groups: Mapping[str, NodeGroup], policy: StoragePolicy = StoragePolicy.ENFORCE
) -> Placement:
    """domain.place over the caches: first come, first served, a storage key counted once."""
    limits = {n: g.storage_limit for n, g in groups.items()}
    return domain.place([claim_of(c) for c in caches], limits, policy)


def format_quantity(n: int) -> str:
    """Bytes as the shortest exact Kubernetes quantity (10Gi, 1700G, 123)."""
    if n == 0:
        return "0"
    for suffix, factor in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    for suffix, factor in (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    if n % 1024 == 0:
        return f"{n // 1024}Ki"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# --- status ---------------------------------------------------------------------------------------

_NODE_STATUS = {
    ModelStatus.PENDING.value: NodeStatus.PENDING.value,
    ModelStatus.DOWNLOADING.value: NodeStatus.DOWNLOADING.value,
    ModelStatus.DOWNLOADED.value: NodeStatus.DOWNLOADED.value,
    ModelStatus.ERROR.value: NodeStatus.ERROR.value,
}


def node_status(model_status: str | None) -> str:
    """KServe's NodeStatusFromLocalModelStatus: unknown or missing -> NodeDownloadPending."""
    return _NODE_STATUS.get(model_status or "", NodeStatus.PENDING.value)


def condition(
    observed: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime kept while the status does not change."""
    value = "True" if status else "False"
    previous = next((c for c in observed or () if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    out: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_NAMES_IN_MESSAGE])
    more = len(items) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} and {more} more" if more > 0 else shown


def _ref(cache: Cache) -> ObjectRef:
    return ObjectRef(API_VERSION, cache.kind, cache.name, cache.namespace, cache.uid)


def _services_for(cache: Cache, services: Sequence[Service]) -> list[Service]:
    """ISVCs/LLMISVCs using the cache: a namespace cache only sees its own namespace's services."""
    if cache.namespace:
        return [
            s
            for s in services
            if s.cache == cache.name
            and s.cache_namespace == cache.namespace
            and s.namespace == cache.namespace
        ]
    return [s for s in services if s.cache == cache.name and not s.cache_namespace]


def _service_list(services: Iterable[Service]) -> list[dict[str, str]] | None:
    out = [
        {"name": s.name, "namespace": s.namespace}
        for s in sorted(services, key=lambda s: (s.namespace, s.name))
    ]
    return out or None


def _progress(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Our nodeProgress from the agent's per-model detail."""
    if not raw:
        return None
    out: dict[str, Any] = {}
    for src, dst in (
        ("bytesDone", "bytesDone"),
        ("bytesTotal", "bytesTotal"),
        ("startedAt", "startedAt"),
        ("finishedAt", "finishedAt"),
        ("lastError", "message"),
    ):
        if raw.get(src) is not None:
            out[dst] = raw[src]
    return out or None


def _map_patch(
    observed: Mapping[str, Any] | None, desired: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """JSON merge patch turning one map into another (null deletes a key); None when equal."""
    have, want = dict(observed or {}), dict(desired or {})
    if have == want:
        return None
    patch: dict[str, Any] = {k: v for k, v in want.items() if have.get(k) != v}
    patch.update(dict.fromkeys((k for k in have if k not in want), None))
    return patch


def _same(a: Any, b: Any) -> bool:
    """Equal, treating missing, null and empty collections alike (omitempty)."""
    return (a or None) == (b or None)


# --- volumes and agent DaemonSets -----------------------------------------------------------------


def _owner(cache: Cache) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": cache.kind,
        "name": cache.name,
        "uid": cache.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _volume_meta(cache: Cache, name: str, role: str, namespace: str | None, owned: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY, VOLUME_ROLE_LABEL: role},
        "annotations": {VOLUME_CACHE_ANNOTATION: cache.status_key},
    }
    if namespace is not None:
        meta["namespace"] = namespace
    if owned and cache.uid:
        meta["ownerReferences"] = [_owner(cache)]
    return meta


def _pv(cache: Cache, group: NodeGroup, name: str, role: str) -> dict[str, Any]:
    # PVs are cluster-scoped: only a cluster-scoped cache can own one (KServe does the same).
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": _volume_meta(cache, name, role, None, owned=not cache.namespace),
        "spec": json.loads(_canonical(group.pv_spec)),
    }


def _pvc(
    cache: Cache, group: NodeGroup, name: str, namespace: str, pv_name: str, role: str
) -> dict[str, Any]:
    spec = json.loads(_canonical(group.pvc_spec))
    spec["volumeName"] = pv_name
    owned = not cache.namespace or cache.namespace == namespace
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _volume_meta(cache, name, role, namespace, owned=owned),
        "spec": spec,
    }


def desired_volumes(
    cache: Cache,
    groups: Sequence[NodeGroup],
    services: Sequence[Service],
    config: LocalModelConfig,
) -> list[dict[str, Any]]:
    """KServe's PV/PVC set for one cache on the groups it is placed on.

    Download: PV `<cache>-<group>-download` + PVC `<cache>-<group>` in jobNamespace (namespace caches:
    `<cache>-<group>-<ns>-download` for both). Serving, per namespace with services using the cache:
    PV `<cache>-<group>-<ns>` + PVC `<cache>-<group>` there, on the group the service names in its
    nodegroup annotation (ignored when not one of the cache's groups) or else the cache's first group.
    """
    out: list[dict[str, Any]] = []
    by_name = {g.name: g for g in groups}
    for group in groups:
        if cache.namespace:
            name = f"{cache.name}-{group.name}-{cache.namespace}-download"
            out.append(_pv(cache, group, name, "download"))
            out.append(_pvc(cache, group, name, config.jobNamespace, name, "download"))
        else:
            pv_name = f"{cache.name}-{group.name}-download"
            out.append(_pv(cache, group, pv_name, "download"))
            out.append(
                _pvc(cache, group, f"{cache.name}-{group.name}", config.jobNamespace, pv_name, "download")
            )
    if config.disableVolumeManagement or not cache.node_groups:
        return out
    default = cache.node_groups[0]
    wanted: dict[str, set[str]] = {}
    for svc in services:
        group_name = svc.node_group or default
        if svc.node_group and svc.node_group not in cache.node_groups:
            wanted.setdefault(svc.namespace, set())
            continue
        wanted.setdefault(svc.namespace, set()).add(group_name)
    for namespace in sorted(wanted):
        for group_name in sorted(wanted[namespace]):
            serving = by_name.get(group_name)
            if serving is None:
                continue
            pvc_name = f"{cache.name}-{serving.name}"
            pv_name = f"{pvc_name}-{namespace}"
            out.append(_pv(cache, serving, pv_name, "serving"))
            out.append(_pvc(cache, serving, pvc_name, namespace, pv_name, "serving"))
    return out


def _local_path(pv_spec: Mapping[str, Any]) -> str | None:
    for kind in ("local", "hostPath"):
        path = (pv_spec.get(kind) or {}).get("path")
        if path:
            return str(path)
    return None


def volume_adoption(existing: Mapping[str, Any], desired: Mapping[str, Any], cache: ObjectRef) -> str:
    """What to do with a PV/PVC of a desired name that already exists: "ours" | "adopt" | "foreign".

    KServe creates the same names without our labels; without adoption every pass would get a 409
    and the volume would never be cleaned up. Adopted: its controller owner is this cache (by uid, or
    by kind and name when the cache was re-created), or it has no owner and points where ours would
    (a PVC bound to our PV name, a PV on our path). Anything else belongs to someone else.
    """
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and labels.get(VOLUME_ROLE_LABEL):
        return "ours"
    owners = meta.get("ownerReferences") or []
    for owner in owners:
        if owner.get("kind") != cache.kind:
            continue
        if (cache.uid and owner.get("uid") == cache.uid) or owner.get("name") == cache.name:
            return "adopt"
    if owners:
        return "foreign"
    have, want = existing.get("spec") or {}, desired.get("spec") or {}
    if existing.get("kind", desired.get("kind")) == "PersistentVolumeClaim":
        same = bool(have.get("volumeName")) and have.get("volumeName") == want.get("volumeName")
    else:
        same = _local_path(have) is not None and _local_path(have) == _local_path(want)
    return "adopt" if same else "foreign"


def adoption_patch(desired: Mapping[str, Any]) -> dict[str, Any]:
    """Our labels and annotation merged onto an adopted PV/PVC (its spec is immutable; owner kept)."""
    meta = desired["metadata"]
    out: dict[str, Any] = {"labels": meta["labels"], "annotations": meta["annotations"]}
    return {"metadata": out}


def _volume_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (str(obj["kind"]), str(meta.get("namespace") or ""), str(meta["name"]))


def _label_value(text: str) -> str:
    """A label value (<= 63 chars); long names become a stable hash."""
    if len(text) <= 63:
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _agent_resources(config: LocalModelConfig) -> dict[str, dict[str, str]]:
    """KServe's localModelAgent{Cpu,Memory}{Request,Limit} keys, with its chart's defaults."""
    extra = config.model_extra or {}

    def pick(key: str, default: str) -> str:
        value = extra.get(key)
        return str(value) if value else default

    return {
        "requests": {
            "cpu": pick("localModelAgentCpuRequest", "100m"),
            "memory": pick("localModelAgentMemoryRequest", "200Mi"),
        },
        "limits": {
            "cpu": pick("localModelAgentCpuLimit", "100m"),
            "memory": pick("localModelAgentMemoryLimit", "300Mi"),
        },
    }


#: Keys of the controller's --agent-settings (the Helm chart's `agent:` values), applied to every
#: `<group>-agent` pod. They win over KServe's localModelAgent* keys: KServe's default config names its
#: own agent image and a 100m CPU limit, neither of which suits our agent (it hashes every byte).
AGENT_SETTING_KEYS = frozenset(
    {
        "image", "imagePullPolicy", "imagePullSecrets", "resources", "tolerations", "nodeSelector",
        "priorityClassName", "securityContext", "podSecurityContext", "serviceAccountName", "extraArgs",
        "env", "podLabels", "podAnnotations",
    }
)  # fmt: skip


def foreign_agent_image(image: str) -> bool:
    """KServe's Go agent (`kserve/kserve-localmodelnode-agent`, any registry or tag): it would run
    with our arguments and download nothing, so `localModelAgentImage` naming it is ignored."""
    repo = image.split("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    name = last.split(":", 1)[0]
    return "kserve-localmodelnode-agent" in name or "localmodelnode-agent" in name


def agent_image(config: LocalModelConfig, image: str) -> tuple[str, str | None]:
    """The agent image to run, and a warning when KServe's `localModelAgentImage` was ignored."""
    configured = str((config.model_extra or {}).get("localModelAgentImage") or "")
    if not configured:
        return image, None
    if foreign_agent_image(configured):
        return image, (
            f"inferenceservice-config localModelAgentImage {configured} is KServe's agent, which cannot "
            f"run as modelcache's agent; ignored, using {image} (remove the key or set agent.image)"
        )
    return configured, None


def _pod_meta(labels: dict[str, Any], annotations: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": labels}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def apply_agent_settings(pod_spec: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """Overlay the install's agent settings on the pod spec (in place); empty values change nothing."""
    container = pod_spec["containers"][0]
    for key in ("image", "imagePullPolicy", "resources", "securityContext"):
        if settings.get(key):
            container[key] = settings[key]
    if settings.get("extraArgs"):
        container["args"] = [*container["args"], *map(str, settings["extraArgs"])]
    if settings.get("env"):
        container["env"] = [*container["env"], *settings["env"]]
    for key in ("tolerations", "nodeSelector", "priorityClassName", "serviceAccountName", "imagePullSecrets"):
        if settings.get(key):
            pod_spec[key] = settings[key]
    if settings.get("podSecurityContext"):
        pod_spec["securityContext"] = {
            **pod_spec.get("securityContext", {}),
            **settings["podSecurityContext"],
        }


def agent_daemonset(
    group: NodeGroup,
    namespace: str,
    config: LocalModelConfig,
    image: str,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """DaemonSet `<group>-agent`: on the group's nodes, mounting the PV's local path at the same path.

    One path for PV and agent means the two can never disagree (KServe #4151). None when the group's
    PV has no local/hostPath path (nothing to mount).
    """
    if group.local_path is None:
        return None
    extra = config.model_extra or {}
    path = group.local_path
    selector = {"app.kubernetes.io/name": AGENT_APP_NAME, NODE_GROUP_LABEL: _label_value(group.name)}
    labels = {**selector, COMPONENT_LABEL: AGENT_COMPONENT, MANAGED_BY_LABEL: MANAGED_BY}
    pod_labels = {**(settings or {}).get("podLabels", {}), **labels}  # ours win: the selector needs them
    required = (group.pv_spec.get("nodeAffinity") or {}).get("required")
    pod_spec: dict[str, Any] = {
        "serviceAccountName": str(
            extra.get("localModelAgentServiceAccount") or DEFAULT_AGENT_SERVICE_ACCOUNT
        ),
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}},
        "terminationGracePeriodSeconds": 30,
        "containers": [
            {
                "name": "agent",
                "image": agent_image(config, image)[0],
                "args": ["agent", "--namespace", namespace],
                "env": [
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "MODELCACHE_HOME", "value": path},
                    {"name": "NODE_GROUP", "value": group.name},
                ],
                "volumeMounts": [{"name": "models", "mountPath": path}, {"name": "tmp", "mountPath": "/tmp"}],
                "resources": _agent_resources(config),
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": [
            {"name": "models", "hostPath": {"path": path, "type": "DirectoryOrCreate"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if config.fsGroup is not None:
        pod_spec["securityContext"] = {"fsGroup": config.fsGroup}
    if settings:
        apply_agent_settings(pod_spec, settings)
    spec = {
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": _pod_meta(pod_labels, (settings or {}).get("podAnnotations")),
            "spec": pod_spec,
        },
    }
    digest = hashlib.sha256(_canonical(spec).encode()).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": f"{group.name}-agent",
            "namespace": namespace,
            "labels": labels,
            "annotations": {SPEC_HASH_ANNOTATION: digest},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "LocalModelNodeGroup",
                    "name": group.name,
                    "uid": group.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            if group.uid
            else [],
        },
        "spec": spec,
    }


# --- the whole plan -------------------------------------------------------------------------------


Wanted = dict[str, dict[tuple[str, str], Entry]]  # node -> (namespace, cache) -> entry


def plan(observed: Observed, now: str) -> Plan:
    """Desired vs observed for everything the controller owns. `now` stamps new condition times."""
    out = Plan()
    placement = place(observed.caches, observed.groups, domain.storage_policy(observed.config.model_extra))
    members = {name: group_members(g, observed.nodes.values()) for name, g in observed.groups.items()}
    wanted, cache_nodes = desired_entries(observed.caches, placement, members)
    _finalizers(observed, out)
    added, removed = _model_nodes(observed, wanted, out)
    for cache in observed.caches:
        if not cache.deleting:
            _cache_status(cache, observed, cache_nodes.get(cache.ref, []), placement, now, out)
            _nodes_changed(cache, added.get(cache.ref, []), removed.get(cache.ref, []), out)
    _group_status(observed, placement, members, out)
    _volumes(observed, placement, out)
    _daemonsets(observed, out)
    _ready_labels(observed, wanted, out)
    _download_jobs(observed, out)
    return out


def job_entries(observed: Observed) -> list[JobEntry]:
    """LocalModelNode entries (of nodes that exist) whose URI only a download Job can read."""
    out = []
    for node_name, mn in sorted(observed.model_nodes.items()):
        if node_name not in observed.nodes:
            continue
        for e in mn.entries:
            if domain.needs_download_job(e.source_uri):
                out.append(
                    JobEntry(
                        node=node_name,
                        node_uid=mn.uid,
                        namespace=e.namespace,
                        model_name=e.model_name,
                        source_uri=e.source_uri,
                        node_group=e.node_group,
                        reported=mn.model_status.get(e.status_key, ""),
                    )
                )
    return out


def _download_jobs(observed: Observed, out: Plan) -> None:
    """KServe-style download Jobs (controller/jobs.py) and the LocalModelNode status they mean."""
    if observed.jobs is None:
        return
    jp = plan_jobs(job_entries(observed), observed.jobs, observed.storage_containers, observed.config)
    out.job_creates.extend(jp.creates)
    out.job_deletes.extend(jp.deletes)
    out.lmn_status.update(jp.statuses)
    caches = {c.ref: c for c in observed.caches}
    for namespace, name, type_, reason, message in jp.notes:
        cache = caches.get((namespace, name))
        if cache is not None:
            out.events.append(Event(_ref(cache), type_, reason, message))


def desired_entries(
    caches: Sequence[Cache], placement: Placement, members: Mapping[str, Sequence[str]]
) -> tuple[Wanted, dict[tuple[str, str], list[str]]]:
    """LocalModelNode entries per node, and nodes per cache; a cache's first matching group wins."""
    wanted: Wanted = {}
    cache_nodes: dict[tuple[str, str], list[str]] = {}
    for cache in caches:
        if cache.deleting:
            continue
        seen: dict[str, Entry] = {}
        for group_name in placement.placed.get(cache.ref, ()):
            entry = cache.entry(group_name)
            for node_name in members[group_name]:
                seen.setdefault(node_name, entry)
        cache_nodes[cache.ref] = sorted(seen)
        for node_name, entry in seen.items():
            wanted.setdefault(node_name, {})[entry.ident] = entry
    return wanted, cache_nodes


def _finalizers(observed: Observed, out: Plan) -> None:
    """Added to live caches; removed once no LocalModelNode holds the cache (groups, nodes: moot)."""
    held = {e.ident for mn in observed.model_nodes.values() for e in mn.entries}
    for cache in observed.caches:
        if not cache.deleting and cache.finalizer not in cache.finalizers:
            added = (*cache.finalizers, cache.finalizer)
            out.finalizers.append(FinalizerPatch(cache.ref, cache.resource_version, added))
        elif cache.deleting and cache.finalizer in cache.finalizers and cache.ref not in held:
            kept = tuple(f for f in cache.finalizers if f != cache.finalizer)
            out.finalizers.append(FinalizerPatch(cache.ref, cache.resource_version, kept))
            message = "removed from every node; deletion proceeds"
            out.events.append(Event(_ref(cache), "Normal", "Finalized", message))


def _model_nodes(
    observed: Observed, wanted: Wanted, out: Plan
) -> tuple[dict[tuple[str, str], list[str]], dict[tuple[str, str], list[str]]]:
    """Create, update (existing order kept, new entries appended sorted) or delete LocalModelNodes.

    Returns the nodes each cache was added to and removed from. A node that left every group keeps
    its LocalModelNode with no entries (its agent cleans up); a node that is gone loses it (#6159).
    """
    added: dict[tuple[str, str], list[str]] = {}
    removed: dict[tuple[str, str], list[str]] = {}
    for node_name, mn in observed.model_nodes.items():
        if node_name not in observed.nodes:
            out.lmn_deletes.append(node_name)
            for e in mn.entries:
                removed.setdefault(e.ident, []).append(node_name)
            continue
        want = wanted.get(node_name, {})
        entries: list[Entry] = []
        kept: set[tuple[str, str]] = set()
        for e in mn.entries:
            if e.ident in want and e.ident not in kept:
                entries.append(want[e.ident])
                kept.add(e.ident)
            else:
                removed.setdefault(e.ident, []).append(node_name)
        for ident in sorted(set(want) - kept):
            entries.append(want[ident])
            added.setdefault(ident, []).append(node_name)
        if tuple(entries) != mn.entries:
            out.lmn_updates[node_name] = [e.to_wire() for e in entries]
    for node_name in sorted(set(wanted) - set(observed.model_nodes)):
        entries = [wanted[node_name][ident] for ident in sorted(wanted[node_name])]
        for e in entries:
            added.setdefault(e.ident, []).append(node_name)
        out.lmn_creates.append(
            {
                "apiVersion": API_VERSION,
                "kind": "LocalModelNode",
                "metadata": {"name": node_name, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                "spec": {"localModels": [e.to_wire() for e in entries]},
            }
        )
    return added, removed


def _nodes_changed(cache: Cache, added: Sequence[str], removed: Sequence[str], out: Plan) -> None:
    changes = []
    if added:
        changes.append(f"sent to {len(added)} node(s): {_names(added)}")
    if removed:
        changes.append(f"removed from {len(removed)} node(s): {_names(removed)}")
    if changes:
        out.events.append(Event(_ref(cache), "Normal", "NodesChanged", "; ".join(changes)))


def _group_status(
    observed: Observed, placement: Placement, members: Mapping[str, list[str]], out: Plan
) -> None:
    """NodeGroup used/available (bytes of the caches placed on it) and member nodes."""
    for name, group in sorted(observed.groups.items()):
        used = placement.used.get(name, 0)
        desired: dict[str, Any] = {"nodes": members[name] or None, "used": format_quantity(used)}
        if group.storage_limit is not None:
            desired["available"] = format_quantity(max(group.storage_limit - used, 0))
        patch = {k: v for k, v in desired.items() if not _same(group.status.get(k), v)}
        if patch:
            out.group_status.append((name, patch))


def _volumes(observed: Observed, placement: Placement, out: Plan) -> None:
    """PV/PVCs created when missing; ours deleted when no longer desired."""
    if observed.volumes is None:
        return
    config = observed.config
    live_refs = {c.status_key for c in observed.caches}
    desired_keys: set[tuple[str, str, str]] = set()
    observed_keys = {v.key for v in observed.volumes}
    for cache in observed.caches:
        if cache.deleting:
            continue
        placed = [observed.groups[g] for g in placement.placed.get(cache.ref, ()) if g in observed.groups]
        for obj in desired_volumes(cache, placed, _services_for(cache, observed.services), config):
            key = _volume_key(obj)
            if key in desired_keys:
                continue  # a name two caches would share: the first keeps it
            desired_keys.add(key)
            if key not in observed_keys:
                out.volume_creates.append((_ref(cache), obj))  # the writer reports success or failure
    for volume in observed.volumes:
        if volume.key in desired_keys:
            continue
        if volume.role == "serving" and config.disableVolumeManagement and volume.cache in live_refs:
            continue  # disableVolumeManagement: serving volumes are the user's business
        out.volume_deletes.append(volume)


def _daemonsets(observed: Observed, out: Plan) -> None:
    """One agent DaemonSet per node group; ours without a group are deleted."""
    if observed.daemonsets is None:
        return
    desired: set[str] = set()
    _, ignored = agent_image(observed.config, observed.agent_image)
    for name, group in sorted(observed.groups.items()):
        if ignored and not (observed.agent_settings or {}).get("image"):
            ref = ObjectRef(API_VERSION, "LocalModelNodeGroup", name, "", group.uid)
            out.events.append(Event(ref, "Warning", "ForeignAgentImage", ignored))
        ds = agent_daemonset(
            group, observed.namespace, observed.config, observed.agent_image, observed.agent_settings
        )
        if ds is None:
            continue
        ds_name = ds["metadata"]["name"]
        desired.add(ds_name)
        if observed.daemonsets.get(ds_name) != ds["metadata"]["annotations"][SPEC_HASH_ANNOTATION]:
            out.daemonset_applies.append(ds)
            verb = "updated" if ds_name in observed.daemonsets else "created"
            ref = ObjectRef(API_VERSION, "LocalModelNodeGroup", name, "", group.uid)
            message = f"DaemonSet {observed.namespace}/{ds_name} {verb}"
            out.events.append(Event(ref, "Normal", "AgentDaemonSet", message))
    out.daemonset_deletes.extend(sorted(set(observed.daemonsets) - desired))


def _ready_labels(observed: Observed, wanted: Wanted, out: Plan) -> None:
    """`models.modelcache.io/<key>=ready` exactly where the agent reports the model ModelDownloaded."""
    for node_name, node in observed.nodes.items():
        reported = observed.model_nodes.get(node_name)
        want: set[str] = set()
        if reported is not None:
            for entry in wanted.get(node_name, {}).values():
                if reported.model_status.get(entry.status_key) == ModelStatus.DOWNLOADED.value:
                    want.add(ready_label(storage_key(entry.source_uri)))
        have = {k for k in node.labels if k.startswith(READY_NODE_LABEL_PREFIX)}
        patch: dict[str, str | None] = {
            label: READY_NODE_LABEL_VALUE
            for label in want
            if node.labels.get(label) != READY_NODE_LABEL_VALUE
        }
        patch.update(dict.fromkeys(have - want))
        if patch:
            out.node_labels[node_name] = patch


def _scheduled(
    cache: Cache, observed: Observed, placement: Placement, seen: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any]:
    """Condition Scheduled: False naming each group that is missing or has no room for the cache."""
    rejected = placement.rejected.get(cache.ref, ())
    over = placement.over.get(cache.ref, ())
    if over and not rejected:  # modelcacheStorageLimit: warn (KServe's behaviour): placed anyway
        message = (
            f"placed beyond the storageLimit of node group(s) {', '.join(over)} "
            f"({domain.STORAGE_POLICY_KEY}=warn: not enforced)"
        )
        return condition(seen, CONDITION_SCHEDULED, True, "OverStorageLimit", message, now, cache.generation)
    if not rejected:
        return condition(
            seen, CONDITION_SCHEDULED, True, "Placed", "fits in every node group", now, cache.generation
        )
    reasons = sorted({why for _, why in rejected})
    details = []
    for group_name, why in rejected:
        group = observed.groups.get(group_name)
        if why == REASON_GROUP_MISSING or group is None:
            details.append(f"node group {group_name} does not exist")
            continue
        limit = group.storage_limit or 0
        free = max(limit - placement.used.get(group_name, 0), 0)
        size = format_quantity(cache.model_size) if cache.model_size is not None else "an invalid modelSize"
        details.append(
            f"node group {group_name}: {size} does not fit in storageLimit "
            f"{format_quantity(limit)} ({format_quantity(free)} free)"
        )
    reason = reasons[0] if len(reasons) == 1 else "NotPlaced"
    return condition(seen, CONDITION_SCHEDULED, False, reason, "; ".join(details), now, cache.generation)


def _cache_status(
    cache: Cache,
    observed: Observed,
    node_names: Sequence[str],
    placement: Placement,
    now: str,
    out: Plan,
) -> None:
    """KServe's status (nodeStatus, copies, services) plus our conditions and progress."""
    status = cache.status
    node_status: dict[str, str] = {}
    progress: dict[str, Any] = {}
    for node_name in node_names:
        node = observed.nodes[node_name]
        mn = observed.model_nodes.get(node_name)
        if not node.ready:
            node_status[node_name] = NodeStatus.NOT_READY.value
        else:
            node_status[node_name] = node_status_of(mn, cache.status_key)
        detail = _progress(mn.progress.get(cache.status_key)) if mn is not None else None
        if detail:
            progress[node_name] = detail
    total = len(node_status)
    available = sum(1 for s in node_status.values() if s == NodeStatus.DOWNLOADED.value)
    failed = sum(1 for s in node_status.values() if s == NodeStatus.ERROR.value)
    copies = {"total": total, "available": available, "failed": failed}

    conditions_seen = status.get("conditions") or []
    scheduled = _scheduled(cache, observed, placement, conditions_seen, now)
    copies_text = f"{available}/{total} copies available" + (f", {failed} failed" if failed else "")
    if total and available == total:
        ready_reason = "AllCopiesAvailable"
    else:
        ready_reason = "NoNodes" if not total else "CopiesUnavailable"
    is_ready = bool(total) and available == total
    ready = condition(
        conditions_seen, CONDITION_READY, is_ready, ready_reason, copies_text, now, cache.generation
    )
    conditions = [ready, scheduled]
    ref = _ref(cache)
    for new in conditions:
        old = next((c for c in conditions_seen if c.get("type") == new["type"]), None)
        if old is None or old.get("status") != new["status"] or old.get("reason") != new["reason"]:
            bad = new["status"] == "False" and (new["type"] == CONDITION_SCHEDULED or failed > 0)
            bad = bad or new["reason"] == "OverStorageLimit"
            kind = "Warning" if bad else "Normal"
            out.events.append(
                Event(ref, kind, new["reason"], f"{new['type']}={new['status']}: {new['message']}")
            )
    # One event per pass summarising per-node transitions (new nodes included), grouped by state.
    seen_status = status.get("nodeStatus") or {}
    moved: dict[str, list[str]] = {}
    for node_name, state in node_status.items():
        if seen_status.get(node_name) != state:
            moved.setdefault(state, []).append(node_name)
    if moved:
        parts = [
            f"{state} on {len(names)} node(s): {_names(names)}" for state, names in sorted(moved.items())
        ]
        trouble = NodeStatus.ERROR.value in moved or NodeStatus.NOT_READY.value in moved
        out.events.append(
            Event(ref, "Warning" if trouble else "Normal", "NodeStatusChanged", "; ".join(parts))
        )

    patch: dict[str, Any] = {}
    ns_patch = _map_patch(status.get("nodeStatus"), node_status)
    if ns_patch is not None:
        patch["nodeStatus"] = ns_patch
    pr_patch = _map_patch(status.get("nodeProgress"), progress)
    if pr_patch is not None:
        patch["nodeProgress"] = pr_patch or None
    if (status.get("copies") or {}) != copies:
        patch["copies"] = copies
    services = _services_for(cache, observed.services)
    for key, kind in (
        ("inferenceServices", "InferenceService"),
        ("llmInferenceServices", "LLMInferenceService"),
    ):
        value = _service_list(s for s in services if s.kind == kind)
        if not _same(status.get(key), value):
            patch[key] = value
    if [dict(c) for c in conditions_seen] != conditions:
        patch["conditions"] = conditions
    if cache.generation is not None and status.get("observedGeneration") != cache.generation:
        patch["observedGeneration"] = cache.generation
    if patch:
        out.cache_status.append((cache.ref, patch))


def node_status_of(mn: ModelNode | None, status_key: str) -> str:
    """A ready node's NodeStatus for one cache, from its LocalModelNode (none yet: pending)."""
    return node_status(mn.model_status.get(status_key) if mn is not None else None)
