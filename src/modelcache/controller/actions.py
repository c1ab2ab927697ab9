"""What the controller decides to write: the `Plan` (idempotent writes by kind) and the events
that explain them; `apply.Writer` executes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelcache.api.types import API_VERSION

from .views import Cache, Volume

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


def cache_ref(cache: Cache) -> ObjectRef:
    """The involvedObject of an event about a cache."""
    return ObjectRef(API_VERSION, cache.kind, cache.name, cache.namespace, cache.uid)
