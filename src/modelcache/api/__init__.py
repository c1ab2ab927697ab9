"""KServe's LocalModel* API (serving.kserve.io/v1alpha1) as pydantic models, and their CRDs.

KServe's CRDs are the wire contract: every object they accept, ours accept unchanged. We add only
optional status fields (conditions, per-node/per-model progress, timings) and printer columns.
"""

from modelcache.api.types import (
    GROUP,
    VERSION,
    LocalModelCache,
    LocalModelCacheSpec,
    LocalModelCacheStatus,
    LocalModelInfo,
    LocalModelNamespaceCache,
    LocalModelNode,
    LocalModelNodeGroup,
    LocalModelNodeGroupSpec,
    LocalModelNodeSpec,
    LocalModelNodeStatus,
    ModelCopies,
    ModelStatus,
    NodeStatus,
)

__all__ = [
    "GROUP",
    "VERSION",
    "LocalModelCache",
    "LocalModelCacheSpec",
    "LocalModelCacheStatus",
    "LocalModelInfo",
    "LocalModelNamespaceCache",
    "LocalModelNode",
    "LocalModelNodeGroup",
    "LocalModelNodeGroupSpec",
    "LocalModelNodeSpec",
    "LocalModelNodeStatus",
    "ModelCopies",
    "ModelStatus",
    "NodeStatus",
]
