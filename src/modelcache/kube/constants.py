"""Names on the wire. KServe's are a contract (its pod mutator and tools read them); ours are
prefixed modelcache.io. One place, so the controller, webhook and agent cannot disagree."""

from __future__ import annotations

from modelcache.api.types import API_VERSION, GROUP, VERSION

__all__ = ["API_VERSION", "GROUP", "VERSION"]

# -- KServe -------------------------------------------------------------------------------------
LOCALMODEL_LABEL = "internal.serving.kserve.io/localmodel"
LOCALMODEL_NAMESPACE_LABEL = "internal.serving.kserve.io/localmodel-namespace"
LOCALMODEL_SOURCEURI_ANNOTATION = "internal.serving.kserve.io/localmodel-sourceuri"
LOCALMODEL_PVC_ANNOTATION = "internal.serving.kserve.io/localmodel-pvc-name"
DISABLE_LOCALMODEL_ANNOTATION = "serving.kserve.io/disable-localmodel"
NODEGROUP_ANNOTATION = "serving.kserve.io/nodegroup"
CACHE_FINALIZER = "localmodel.kserve.io/finalizer"
NAMESPACE_CACHE_FINALIZER = "localmodelnamespacecache.kserve.io/finalizer"
STORAGE_INITIALIZER_CONTAINER = "storage-initializer"
DEFAULT_MODEL_MOUNT_PATH = "/mnt/models"
CONFIGMAP_NAME = "inferenceservice-config"
CONFIGMAP_KEY = "localModel"
DEFAULT_CONTROLLER_NAMESPACE = "kserve"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# -- ours ---------------------------------------------------------------------------------------
#: Plain pods (no KServe) opt in with this annotation naming a LocalModelCache.
MODEL_ANNOTATION = "modelcache.io/model"
#: Where such a pod wants the model (default /mnt/models).
MOUNT_PATH_ANNOTATION = "modelcache.io/mount-path"
#: Set by our pod webhook on every pod it admits carrying MODEL_ANNOTATION, so that the controller
#: can watch those pods with a label selector (no selector can express "has an annotation").
MODEL_POD_LABEL = "modelcache.io/uses-cache"
MODEL_POD_LABEL_VALUE = "true"
#: Set on a Node for every model that is downloaded and verified there: `<prefix><storage-key>=ready`.
#: The controller keeps it current from LocalModelNode status; the webhook schedules on it.
READY_NODE_LABEL_PREFIX = "models.modelcache.io/"
READY_NODE_LABEL_VALUE = "ready"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelcache"


def ready_label(storage_key: str) -> str:
    return READY_NODE_LABEL_PREFIX + storage_key
