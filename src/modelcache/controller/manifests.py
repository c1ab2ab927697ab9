"""Child objects the controller creates, as manifests (pure): KServe's PV/PVC set per cache and
group, adoption of KServe's volumes, and the `<group>-agent` DaemonSet."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from modelcache.api.types import API_VERSION
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
)

from .actions import ObjectRef
from .views import (
    AGENT_APP_NAME,
    AGENT_COMPONENT,
    COMPONENT_LABEL,
    DEFAULT_AGENT_SERVICE_ACCOUNT,
    NODE_GROUP_LABEL,
    SPEC_HASH_ANNOTATION,
    VOLUME_CACHE_ANNOTATION,
    VOLUME_ROLE_LABEL,
    Cache,
    NodeGroup,
    Service,
    _canonical,
)

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
        "env", "podLabels", "podAnnotations", "peer", "prepareCacheDir",
    }
)  # fmt: skip
#: The Secret (key `token`) with the agents' shared peer token; see `apply_agent_settings`.
PEER_SECRET = "modelcache-peer"


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
    _peer_settings(container, settings.get("peer") or {})


def _peer_settings(container: dict[str, Any], peer: Mapping[str, Any]) -> None:
    """Node-to-node fill (`peer: {port, uploadRate, secret}`): the port as a hostPort, since peers
    are reached at the node's InternalIP, and the token by reference (optional: no Secret, no peering)."""
    port = int(peer.get("port") or 0)
    if port <= 0:
        return
    published = {"name": "peer", "containerPort": port, "hostPort": port}
    container["ports"] = [*container.get("ports", []), published]
    ref = {"name": str(peer.get("secret") or PEER_SECRET), "key": "token", "optional": True}
    env = [
        {"name": "MODELCACHE_PEER_PORT", "value": str(port)},
        {"name": "MODELCACHE_PEER_TOKEN", "valueFrom": {"secretKeyRef": ref}},
    ]
    if peer.get("uploadRate") is not None:
        env.append({"name": "MODELCACHE_PEER_UPLOAD_RATE", "value": str(peer["uploadRate"])})
    container["env"] = [*container["env"], *env]


#: The image's own user (see the Dockerfile): the agent runs as this unless the settings say otherwise.
AGENT_UID = 65532


def _prepare_cache_dir(pod_spec: Mapping[str, Any], path: str) -> dict[str, Any]:
    """An init container that hands the node's cache directory to the agent's user.

    The kubelet creates a missing hostPath (`DirectoryOrCreate`) as root 0755, where the non-root
    agent cannot write: found on a real node. Only the top directory is chowned (never -R: TBs of
    models, and folders another agent left are only read); CAP_CHOWN is all it keeps.
    `prepareCacheDir: false` turns it off where root init containers are not admitted (then the
    directory must exist, owned by the agent's user).
    """
    agent = pod_spec["containers"][0]
    pod_sc = pod_spec.get("securityContext") or {}
    uid = (agent.get("securityContext") or {}).get("runAsUser") or pod_sc.get("runAsUser") or AGENT_UID
    gid = pod_sc.get("fsGroup") or pod_sc.get("runAsGroup") or uid
    return {
        "name": "prepare-cache-dir",
        "image": agent["image"],
        **({"imagePullPolicy": agent["imagePullPolicy"]} if agent.get("imagePullPolicy") else {}),
        "command": ["chown", f"{int(uid)}:{int(gid)}", path],
        "volumeMounts": [{"name": "models", "mountPath": path}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
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
    if (settings or {}).get("prepareCacheDir", True):
        pod_spec["initContainers"] = [_prepare_cache_dir(pod_spec, path)]
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
