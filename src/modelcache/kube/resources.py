"""KServe's custom resources as lightkube generic resources, defined once for the controller, the
agent, the webhook and the cluster CLI (KServe's names and versions are the contract)."""

from __future__ import annotations

from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from modelcache.api.types import GROUP, VERSION

LocalModelCache = create_global_resource(GROUP, VERSION, "LocalModelCache", "localmodelcaches")
LocalModelNamespaceCache = create_namespaced_resource(
    GROUP, VERSION, "LocalModelNamespaceCache", "localmodelnamespacecaches"
)
LocalModelNodeGroup = create_global_resource(GROUP, VERSION, "LocalModelNodeGroup", "localmodelnodegroups")
LocalModelNode = create_global_resource(GROUP, VERSION, "LocalModelNode", "localmodelnodes")
ClusterStorageContainer = create_global_resource(
    GROUP, "v1alpha1", "ClusterStorageContainer", "clusterstoragecontainers"
)
InferenceService = create_namespaced_resource(GROUP, "v1beta1", "InferenceService", "inferenceservices")
#: Newest first: a cluster with an older KServe serves only v1alpha1.
LLMInferenceServices = tuple(
    create_namespaced_resource(GROUP, version, "LLMInferenceService", "llminferenceservices")
    for version in ("v1alpha2", "v1alpha1")
)
