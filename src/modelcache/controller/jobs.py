"""KServe-style download Jobs for URIs our engine cannot read (hdfs://, webhdfs://, any prefix a
ClusterStorageContainer declares): pure decisions, observed state in, writes out.

Shaped as KServe's localmodelnode agent launches them (`launchJob`): in `localModel.jobNamespace`,
labels `model` and `node`, the matching ClusterStorageContainer's container (else
`kserve-localmodel-download` running `defaultJobImage`) with args `[uri, /mnt/models]`, the group's
download PVC mounted at /mnt/models with subPath `models/<storage key>`, `nodeName` pinned,
`restartPolicy: Never`, `fsGroup` and `ttlSecondsAfterFinished` from the config, owned by the
LocalModelNode. Differences on purpose: the name is deterministic (level-based: a pass that does not
see its own Job yet recreates nothing, the create gets a 409) and our labels mark it, so Jobs of
entries that left a node are deleted (KServe's cleanupJobs does the same by label).

The Job's state is the entry's `status.modelStatus` on that LocalModelNode (KServe's
getModelStatusFromJobStatus; Downloading on `ready` or `active` pods, since 1.20 has no `ready`); the
agent leaves these entries alone (`agent.plan.entries`). A finished Job removed by its TTL leaves the status
ModelDownloaded (as KServe); a failed Job stays until someone deletes it, then a new one runs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcache import domain
from modelcache.api.types import API_VERSION, ModelStatus
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import MANAGED_BY, MANAGED_BY_LABEL
from modelcache.uri import redact, storage_key

MOUNT_PATH = "/mnt/models"
DOWNLOAD_CONTAINER = "kserve-localmodel-download"
PVC_SOURCE_VOLUME = "kserve-pvc-source"
#: KServe's labels on its download Jobs (its agent finds them by these).
MODEL_LABEL = "model"
NODE_LABEL = "node"
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_COMPONENT = "model-download"
#: The LocalModelNode status key the Job serves ("<name>" or "<namespace>/<name>").
STATUS_KEY_ANNOTATION = "modelcache.io/status-key"


@dataclass(frozen=True, slots=True)
class JobEntry:
    """One LocalModelNode entry a Job downloads."""

    node: str
    node_uid: str
    namespace: str  # the cache's namespace ("" for a LocalModelCache)
    model_name: str
    source_uri: str
    node_group: str
    reported: str  # the entry's status.modelStatus now ("" when none)

    @property
    def status_key(self) -> str:
        return domain.status_key(self.namespace, self.model_name)


@dataclass(frozen=True, slots=True)
class DownloadJob:
    """One of our Jobs as observed."""

    namespace: str
    name: str
    node: str
    status_key: str
    created: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    deleting: bool = False

    @property
    def state(self) -> str:
        """KServe's getModelStatusFromJobStatus."""
        if self.succeeded > 0:
            return ModelStatus.DOWNLOADED.value
        if self.failed > 0:
            return ModelStatus.ERROR.value
        if self.active > 0:
            return ModelStatus.DOWNLOADING.value
        return ModelStatus.PENDING.value


@dataclass
class JobPlan:
    creates: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    #: node -> status key -> modelStatus value (merge patch of status.modelStatus)
    statuses: dict[str, dict[str, str]] = field(default_factory=dict)
    #: (cache namespace, cache name, Normal|Warning, reason, message)
    notes: list[tuple[str, str, str, str, str]] = field(default_factory=list)


def job_from(obj: Mapping[str, Any]) -> DownloadJob | None:
    """None unless we made it (managed-by and component labels)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or labels.get(COMPONENT_LABEL) != JOB_COMPONENT:
        return None
    status = obj.get("status") or {}
    return DownloadJob(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        node=str(labels.get(NODE_LABEL) or ""),
        status_key=str((meta.get("annotations") or {}).get(STATUS_KEY_ANNOTATION) or ""),
        created=str(meta.get("creationTimestamp") or ""),
        active=max(int(status.get("active") or 0), int(status.get("ready") or 0)),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        deleting=bool(meta.get("deletionTimestamp")),
    )


_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def _label_value(text: str) -> str:
    if len(text) <= 63:
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def job_name(entry: JobEntry) -> str:
    """`<model>-<node>` as KServe names them, made a DNS label; hashed when it would not fit."""
    readable = f"{entry.namespace}-{entry.model_name}" if entry.namespace else entry.model_name
    base = _NOT_DNS.sub("-", f"{readable}-{entry.node}".lower()).strip("-")
    if len(base) <= 63 and base == f"{readable}-{entry.node}" and not entry.namespace:
        return base
    digest = hashlib.sha256(f"{entry.status_key}\0{entry.node}".encode()).hexdigest()[:10]
    return f"{base[:52].rstrip('-')}-{digest}"


def download_pvc(entry: JobEntry) -> str:
    """The group's download PVC in jobNamespace (see reconcile.desired_volumes)."""
    if entry.namespace:
        return f"{entry.model_name}-{entry.node_group}-{entry.namespace}-download"
    return domain.pvc_name(entry.model_name, entry.node_group)


def container_for(
    uri: str, cscs: Iterable[Mapping[str, Any]], config: LocalModelConfig
) -> tuple[dict[str, Any], str]:
    """The download container (KServe's getContainerSpecForStorageUri) and where it came from."""
    csc = domain.matching_container(cscs, uri)
    if csc is not None:
        container = dict((csc.get("spec") or {}).get("container") or {})
        container.setdefault("name", DOWNLOAD_CONTAINER)
        name = (csc.get("metadata") or {}).get("name", "?")
        return container, f"ClusterStorageContainer {name}"
    container = {
        "name": DOWNLOAD_CONTAINER,
        "image": config.defaultJobImage,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container, "defaultJobImage"


def download_job(
    entry: JobEntry, cscs: Iterable[Mapping[str, Any]], config: LocalModelConfig
) -> dict[str, Any]:
    container, _ = container_for(entry.source_uri, cscs, config)
    container["args"] = [entry.source_uri, MOUNT_PATH]
    container["volumeMounts"] = [
        {
            "name": PVC_SOURCE_VOLUME,
            "mountPath": MOUNT_PATH,
            "readOnly": False,
            "subPath": f"models/{storage_key(entry.source_uri)}",
        }
    ]
    pod_spec: dict[str, Any] = {
        "nodeName": entry.node,
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": PVC_SOURCE_VOLUME, "persistentVolumeClaim": {"claimName": download_pvc(entry)}}],
    }
    if config.fsGroup is not None:
        pod_spec["securityContext"] = {"fsGroup": config.fsGroup}
    spec: dict[str, Any] = {"template": {"spec": pod_spec}}
    if config.jobTTLSecondsAfterFinished is not None:
        spec["ttlSecondsAfterFinished"] = config.jobTTLSecondsAfterFinished
    meta: dict[str, Any] = {
        "name": job_name(entry),
        "namespace": config.jobNamespace,
        "labels": {
            MODEL_LABEL: _label_value(entry.model_name),
            NODE_LABEL: _label_value(entry.node),
            MANAGED_BY_LABEL: MANAGED_BY,
            COMPONENT_LABEL: JOB_COMPONENT,
        },
        "annotations": {STATUS_KEY_ANNOTATION: entry.status_key},
    }
    if entry.node_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": "LocalModelNode",
                "name": entry.node,
                "uid": entry.node_uid,
                "controller": True,
            }
        ]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def plan_jobs(
    entries: Sequence[JobEntry],
    jobs: Sequence[DownloadJob],
    cscs: Sequence[Mapping[str, Any]],
    config: LocalModelConfig,
) -> JobPlan:
    """Jobs to create and delete, and the statuses they mean, for the entries that need one."""
    out = JobPlan()
    latest: dict[tuple[str, str], DownloadJob] = {}
    for job in jobs:
        key = (job.node, job.status_key)
        if job.deleting:
            continue
        if key not in latest or job.created > latest[key].created:
            latest[key] = job
    wanted = {(e.node, e.status_key) for e in entries}
    for job in jobs:
        if (job.node, job.status_key) not in wanted and not job.deleting:
            out.deletes.append((job.namespace, job.name))
    for entry in entries:
        found = latest.get((entry.node, entry.status_key))
        if found is not None:
            state = found.state
        elif entry.reported == ModelStatus.DOWNLOADED.value:
            continue  # finished and removed by its TTL: the model is there (KServe's rule)
        else:
            body = download_job(entry, cscs, config)
            out.creates.append(body)
            state = ModelStatus.PENDING.value
            _, source = container_for(entry.source_uri, cscs, config)
            where = f"{config.jobNamespace}/{body['metadata']['name']}"
            out.notes.append(
                (
                    entry.namespace,
                    entry.model_name,
                    "Normal",
                    "DownloadJobCreated",
                    f"Job {where} downloads {redact(entry.source_uri)} on node {entry.node} ({source})",
                )
            )
            problem = domain.job_download_problem(entry.source_uri, cscs)
            if problem is not None:
                out.notes.append((entry.namespace, entry.model_name, "Warning", "NoDownloadImage", problem))
        if entry.reported != state:
            out.statuses.setdefault(entry.node, {})[entry.status_key] = state
    return out
