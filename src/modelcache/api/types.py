"""The LocalModel* resources. Field names are the wire names (camelCase), as in KServe's Go types.

Schema hints for the CRD generator ride on `Annotated[...]` metadata (`Quantity`, `Immutable`,
`MinItems`, `PreserveUnknown`), so the model and its CRD cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "serving.kserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Quantity:
    """A Kubernetes resource quantity: integer or string such as 10Gi."""


@dataclass(frozen=True)
class Immutable:
    """Cannot change after creation (CEL on clusters >= 1.25; our webhook everywhere)."""

    message: str


@dataclass(frozen=True)
class MinItems:
    n: int


@dataclass(frozen=True)
class PreserveUnknown:
    """An embedded core type (PV/PVC spec): typed where we read it, everything else kept as sent."""


@dataclass(frozen=True)
class DateTime:
    """RFC 3339 timestamp."""


QuantityValue = Annotated[int | str, Quantity()]
Timestamp = Annotated[str, DateTime()]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class NodeStatus(StrEnum):
    """LocalModelCache status.nodeStatus values (KServe's, including the empty string)."""

    EMPTY = ""
    NOT_READY = "NodeNotReady"
    PENDING = "NodeDownloadPending"
    DOWNLOADING = "NodeDownloading"
    DOWNLOADED = "NodeDownloaded"
    ERROR = "NodeDownloadError"


class ModelStatus(StrEnum):
    """LocalModelNode status.modelStatus values (KServe's)."""

    EMPTY = ""
    PENDING = "ModelDownloadPending"
    DOWNLOADING = "ModelDownloading"
    DOWNLOADED = "ModelDownloaded"
    ERROR = "ModelDownloadError"


class StorageSpec(_Model):
    """Which storage-config secret key and parameters to use for the source credentials."""

    key: str | None = None
    parameters: dict[str, str] | None = None


class NamespacedName(_Model):
    name: str | None = None
    namespace: str | None = None


class ModelCopies(_Model):
    total: int | None = None
    available: int | None = None
    failed: int | None = None


class Condition(_Model):
    """metav1.Condition, as every Kubernetes controller reports state."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: Timestamp | None = None
    observedGeneration: int | None = None


class NodeProgress(_Model):
    """Ours: download progress of one node, so `kubectl get -o yaml` shows more than a word."""

    bytesDone: int | None = None
    bytesTotal: int | None = None
    startedAt: Timestamp | None = None
    finishedAt: Timestamp | None = None
    message: str | None = None


class LocalModelCacheSpec(_Model):
    sourceModelUri: Annotated[str, Immutable("StorageUri is immutable")]
    modelSize: QuantityValue
    nodeGroups: Annotated[list[str], MinItems(1)]
    serviceAccountName: str | None = None
    storage: StorageSpec | None = None


class LocalModelCacheStatus(_Model):
    copies: ModelCopies | None = None
    nodeStatus: dict[str, NodeStatus] | None = None
    inferenceServices: list[NamespacedName] | None = None
    llmInferenceServices: list[NamespacedName] | None = None
    # ours (optional, additive)
    conditions: list[Condition] | None = None
    nodeProgress: dict[str, NodeProgress] | None = None
    observedGeneration: int | None = None


class ObjectMeta(_Model):
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    deletionTimestamp: str | None = None
    finalizers: list[str] | None = None


class _Resource(_Model):
    apiVersion: str = API_VERSION
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


class LocalModelCache(_Resource):
    kind: str = "LocalModelCache"
    spec: LocalModelCacheSpec
    status: LocalModelCacheStatus | None = None


class LocalModelNamespaceCache(_Resource):
    kind: str = "LocalModelNamespaceCache"
    spec: LocalModelCacheSpec
    status: LocalModelCacheStatus | None = None


class NodeSelectorRequirement(_Model):
    key: str
    operator: str
    values: list[str] | None = None


class NodeSelectorTerm(_Model):
    matchExpressions: list[NodeSelectorRequirement] | None = None
    matchFields: list[NodeSelectorRequirement] | None = None


class NodeSelector(_Model):
    nodeSelectorTerms: list[NodeSelectorTerm]


class VolumeNodeAffinity(_Model):
    required: NodeSelector | None = None


class LocalVolumeSource(_Model):
    path: str
    fsType: str | None = None


class HostPathVolumeSource(_Model):
    path: str
    type: str | None = None


class PersistentVolumeSpec(_Model):
    """core/v1 PersistentVolumeSpec: the fields we read are typed; the rest is kept as sent."""

    accessModes: list[str] | None = None
    capacity: dict[str, QuantityValue] | None = None
    local: LocalVolumeSource | None = None
    hostPath: HostPathVolumeSource | None = None
    nodeAffinity: VolumeNodeAffinity | None = None
    persistentVolumeReclaimPolicy: str | None = None
    storageClassName: str | None = None
    volumeMode: str | None = None


class ResourceRequirements(_Model):
    requests: dict[str, QuantityValue] | None = None
    limits: dict[str, QuantityValue] | None = None


class PersistentVolumeClaimSpec(_Model):
    """core/v1 PersistentVolumeClaimSpec: typed where we read it, the rest kept as sent."""

    accessModes: list[str] | None = None
    resources: ResourceRequirements | None = None
    storageClassName: str | None = None
    volumeMode: str | None = None
    volumeName: str | None = None


class LocalModelNodeGroupSpec(_Model):
    storageLimit: QuantityValue
    persistentVolumeSpec: Annotated[PersistentVolumeSpec, PreserveUnknown()]
    persistentVolumeClaimSpec: Annotated[PersistentVolumeClaimSpec, PreserveUnknown()]


class LocalModelNodeGroupStatus(_Model):
    used: QuantityValue | None = None
    available: QuantityValue | None = None
    # ours
    nodes: list[str] | None = None
    conditions: list[Condition] | None = None


class LocalModelNodeGroup(_Resource):
    kind: str = "LocalModelNodeGroup"
    spec: LocalModelNodeGroupSpec
    status: LocalModelNodeGroupStatus | None = None


class LocalModelInfo(_Model):
    modelName: str
    sourceModelUri: str
    namespace: str | None = None
    nodeGroup: str | None = None
    serviceAccountName: str | None = None
    storage: StorageSpec | None = None


class LocalModelNodeSpec(_Model):
    localModels: list[LocalModelInfo]


class ModelProgress(_Model):
    """Ours: per-model detail next to KServe's one-word modelStatus."""

    bytesDone: int | None = None
    bytesTotal: int | None = None
    startedAt: Timestamp | None = None
    finishedAt: Timestamp | None = None
    attempts: int | None = None
    lastError: str | None = None
    storageKey: str | None = None


class LocalModelNodeStatus(_Model):
    modelStatus: dict[str, ModelStatus] | None = None
    # ours
    models: dict[str, ModelProgress] | None = None
    conditions: list[Condition] | None = None


class LocalModelNode(_Resource):
    kind: str = "LocalModelNode"
    spec: LocalModelNodeSpec
    status: LocalModelNodeStatus | None = None


def parse(obj: dict[str, Any]) -> _Resource:
    """Typed view of a LocalModel* object from the API server (unknown fields kept)."""
    kinds: dict[str, type[_Resource]] = {
        "LocalModelCache": LocalModelCache,
        "LocalModelNamespaceCache": LocalModelNamespaceCache,
        "LocalModelNodeGroup": LocalModelNodeGroup,
        "LocalModelNode": LocalModelNode,
    }
    return kinds[obj["kind"]].model_validate(obj)
