"""What the controller decides to write: the `Plan` (idempotent writes by kind) and the events
that explain them. `Plan.actions()` turns it into typed actions (create, merge patch, delete, and
the three writes with their own rules: finalizers, volumes, agent DaemonSets) that `apply.Writer`
runs in one loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelcache.api.types import API_VERSION
from modelcache.kube.events import ObjectRef as ObjectRef  # what an event is about (involvedObject)

from .views import Cache, Volume

# --- typed actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """An object to write: its kind, name, namespace ("" when cluster-scoped), subresource."""

    kind: str
    name: str
    namespace: str = ""
    subresource: str = ""  # "" or "status"


@dataclass(frozen=True, slots=True)
class Create:
    """Create `body`; an existing object of that name is left as it is (409 ignored)."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MergePatch:
    """JSON merge patch; a missing object is fine (404 ignored)."""

    target: Target
    patch: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete; a missing object is fine (404 ignored). `background`: its dependents go too."""

    target: Target
    background: bool = False


@dataclass(frozen=True, slots=True)
class CreateVolume:
    """Create a PV/PVC for `cache`, adopting KServe's of that name (see manifests.volume_adoption)."""

    cache: ObjectRef
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ApplyDaemonSet:
    """Create or merge-patch an agent DaemonSet; KServe's of that name is replaced."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Step:
    """One action, with what `Recent` keys it by (target, written value) and its phase: finalizer
    patches carry a resourceVersion, so they run before anything else can bump it."""

    key: tuple[str, ...]
    value: Any
    action: Action
    phase: int = 1


# --- the plan -------------------------------------------------------------------------------------


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


Action = Create | MergePatch | Delete | CreateVolume | ApplyDaemonSet | FinalizerPatch


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

    def actions(self, agent_namespace: str) -> list[Step]:
        """Every write as a typed action, finalizer patches first (phase 0). `agent_namespace`:
        the agent DaemonSets'."""
        out = [Step(("finalizers", *fp.cache), fp.finalizers, fp, phase=0) for fp in self.finalizers]
        for body in self.lmn_creates:
            out.append(Step(("lmn", body["metadata"]["name"]), body["spec"], Create(body)))
        for name, entries in self.lmn_updates.items():
            patch: dict[str, Any] = {"spec": {"localModels": entries}}
            out.append(Step(("lmn", name), {"localModels": entries}, MergePatch(Target(LMN, name), patch)))
        for name in self.lmn_deletes:
            out.append(Step(("lmn-delete", name), None, Delete(Target(LMN, name))))
        for (namespace, name), status in self.cache_status:
            kind = "LocalModelNamespaceCache" if namespace else "LocalModelCache"
            target = Target(kind, name, namespace, "status")
            out.append(
                Step(("cache-status", namespace, name), status, MergePatch(target, {"status": status}))
            )
        for name, status in self.group_status:
            target = Target("LocalModelNodeGroup", name, "", "status")
            out.append(Step(("group-status", name), status, MergePatch(target, {"status": status})))
        for cache, body in self.volume_creates:
            meta = body["metadata"]
            key = ("volume", body["kind"], meta.get("namespace", ""), meta["name"])
            out.append(Step(key, None, CreateVolume(cache, body)))
        for volume in self.volume_deletes:
            target = Target(volume.kind, volume.name, volume.namespace)
            out.append(Step(("volume-delete", *volume.key), None, Delete(target)))
        for body in self.daemonset_applies:
            out.append(Step(("daemonset", body["metadata"]["name"]), body["spec"], ApplyDaemonSet(body)))
        for name in self.daemonset_deletes:
            target = Target("DaemonSet", name, agent_namespace)
            out.append(Step(("daemonset-delete", name), None, Delete(target)))
        for node, labels in self.node_labels.items():
            patch = {"metadata": {"labels": labels}}
            out.append(Step(("node-labels", node), labels, MergePatch(Target("Node", node), patch)))
        for body in self.job_creates:
            meta = body["metadata"]
            out.append(Step(("job", meta["namespace"], meta["name"]), None, Create(body)))
        for namespace, name in self.job_deletes:
            target = Target("Job", name, namespace)
            out.append(Step(("job-delete", namespace, name), None, Delete(target, background=True)))
        for node, states in self.lmn_status.items():
            patch = {"status": {"modelStatus": states}}
            out.append(Step(("lmn-status", node), states, MergePatch(Target(LMN, node, "", "status"), patch)))
        return out


LMN = "LocalModelNode"


def cache_ref(cache: Cache) -> ObjectRef:
    """The involvedObject of an event about a cache."""
    return ObjectRef(API_VERSION, cache.kind, cache.name, cache.namespace, cache.uid)
