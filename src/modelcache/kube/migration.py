"""What stands between a cluster and a safe swap from KServe's local model cache to ours (pure).

`modelcache kserve check` gathers a `ClusterView` (plain API dicts, plus cache roots it can read)
and prints `findings` in the order a user should act on them: first what would fight us (KServe's
controller, its webhook, its agents), then configuration, then capacity, then what we have not
adopted yet. The same list, read after the swap, must be empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcache import domain
from modelcache.controller import reconcile as r
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import MANAGED_BY, MANAGED_BY_LABEL

#: KServe's validating webhook for caches: with failurePolicy Fail and its pod gone, it blocks every
#: LocalModelCache write.
KSERVE_CACHE_WEBHOOK = "localmodelcache.serving.kserve.io"
_CACHE_KINDS = ("LocalModelCache", "LocalModelNamespaceCache")


@dataclass(frozen=True)
class Finding:
    step: int  # the order to act in (lower first)
    what: str
    todo: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "what": self.what, "todo": self.todo}


@dataclass(frozen=True)
class ClusterView:
    namespace: str  # where inferenceservice-config and the agent DaemonSets live
    config: LocalModelConfig
    deployments: Sequence[Mapping[str, Any]] = ()
    daemonsets: Sequence[Mapping[str, Any]] = ()
    webhook_configurations: Sequence[Mapping[str, Any]] = ()  # validating and mutating
    volumes: Sequence[Mapping[str, Any]] = ()  # PVs and PVCs, each with "kind"
    caches: Sequence[Mapping[str, Any]] = ()  # LocalModelCache / LocalModelNamespaceCache, with "kind"
    groups: Sequence[Mapping[str, Any]] = ()
    foreign_folders: Mapping[str, Sequence[str]] = field(default_factory=dict)  # cache root -> keys
    #: RoleBindings in the config's jobNamespace; None: not read (e.g. no permission), not judged
    job_role_bindings: Sequence[Mapping[str, Any]] | None = None


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _where(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))


def _ours(obj: Mapping[str, Any]) -> bool:
    return (_meta(obj).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def _images(obj: Mapping[str, Any]) -> list[str]:
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [
        str(c.get("image") or "")
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    ]


def _kserve_controller(obj: Mapping[str, Any]) -> bool:
    name = str(_meta(obj).get("name") or "")
    return not _ours(obj) and ("localmodel-controller" in name or "localmodel" in " ".join(_images(obj)))


def findings(view: ClusterView) -> list[Finding]:
    """Everything to do before (or still left after) the swap, in order."""
    out: list[Finding] = []
    for dep in view.deployments:
        if _kserve_controller(dep) and ((dep.get("spec") or {}).get("replicas", 1) or 0) > 0:
            out.append(
                Finding(
                    1,
                    f"KServe's localmodel controller runs (Deployment {_where(dep)})",
                    f"scale it to 0 or uninstall kserve-localmodel-resources: two controllers fight, and its "
                    f"Status().Update drops our status fields (kubectl scale deploy -n "
                    f"{_meta(dep).get('namespace')} {_meta(dep).get('name')} --replicas=0)",
                )
            )
    for cfg in view.webhook_configurations:
        for hook in cfg.get("webhooks") or []:
            if hook.get("name") == KSERVE_CACHE_WEBHOOK:
                kind = str(cfg.get("kind") or "ValidatingWebhookConfiguration")
                policy = hook.get("failurePolicy", "Fail")
                out.append(
                    Finding(
                        2,
                        f"KServe's {KSERVE_CACHE_WEBHOOK} webhook is registered "
                        f"({kind} {_where(cfg)}, failurePolicy {policy})",
                        "remove it (ours validates caches): once KServe's pod is gone it blocks every cache "
                        f"write (kubectl delete {kind.lower()} {_meta(cfg).get('name')}, or drop "
                        "that webhook from it)",
                    )
                )
    for ds in view.daemonsets:
        if not _ours(ds) and any(r.foreign_agent_image(i) for i in _images(ds)):
            out.append(
                Finding(
                    3,
                    f"KServe's node agent runs (DaemonSet {_where(ds)})",
                    f"delete it (kubectl delete ds -n {_meta(ds).get('namespace')} {_meta(ds).get('name')}); "
                    "ours, with the same name, is created on the controller's next pass and adopts the "
                    "folders it left",
                )
            )
    _, ignored = r.agent_image(view.config, r.DEFAULT_AGENT_IMAGE)
    if ignored:
        out.append(
            Finding(
                4,
                f"inferenceservice-config localModelAgentImage names KServe's agent "
                f"({(view.config.model_extra or {}).get('localModelAgentImage')})",
                f"remove localModelAgentImage from {view.namespace}/inferenceservice-config or set it to "
                "modelcache's image (ours ignores KServe's, with a warning)",
            )
        )
    out.extend(_capacity(view))
    out.extend(_job_namespace_rbac(view))
    for vol in view.volumes:
        owners = _meta(vol).get("ownerReferences") or []
        if not _ours(vol) and any(o.get("kind") in _CACHE_KINDS for o in owners):
            out.append(
                Finding(
                    6,
                    f"{vol.get('kind')} {_where(vol)} was created by KServe and is not adopted yet",
                    "start modelcache's controller (it adopts it on its next pass); if it stays, see the "
                    "VolumeConflict events of the cache",
                )
            )
    for root, keys in sorted(view.foreign_folders.items()):
        if keys:
            out.append(
                Finding(
                    7,
                    f"{len(keys)} model folder(s) under {root}/models have no manifest yet "
                    f"({', '.join(sorted(keys)[:5])}{', ...' if len(keys) > 5 else ''})",
                    "the node's agent adopts the folders of models its LocalModelNode wants; others are "
                    "left alone (see the Adopted / AdoptionBlocked events, or `modelcache rm --force KEY`)",
                )
            )
    return sorted(out, key=lambda f: f.step)


AGENT_SERVICE_ACCOUNT = "modelcache-agent"


def _job_namespace_rbac(view: ClusterView) -> list[Finding]:
    """The agents read credentials in `localModel.jobNamespace`: RBAC must follow the config there."""
    if view.job_role_bindings is None:
        return []
    for rb in view.job_role_bindings:
        for subject in rb.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount" and subject.get("name") == AGENT_SERVICE_ACCOUNT:
                return []
    ns = view.config.jobNamespace
    return [
        Finding(
            4,
            f"no RoleBinding in jobNamespace {ns} (inferenceservice-config) lets {AGENT_SERVICE_ACCOUNT} "
            "read credentials there",
            f"helm upgrade modelcache ... --set jobNamespace={ns} (or kubectl apply -n {ns} "
            "-f deploy/rbac/job-namespace/); otherwise downloads that need a Secret or ServiceAccount fail",
        )
    ]


def _capacity(view: ClusterView) -> list[Finding]:
    """Caches that have copies today but would not be placed under our storageLimit accounting."""
    groups = {g.name: g for g in (r.group_from(o) for o in view.groups)}
    caches = [r.cache_from(o) for o in view.caches]
    placement = r.place(caches, groups, domain.storage_policy(view.config.model_extra))
    out = []
    for cache, raw in zip(caches, view.caches, strict=True):
        rejected = [g for g, why in placement.rejected.get(cache.ref, ()) if why == r.REASON_STORAGE_LIMIT]
        copies = ((raw.get("status") or {}).get("copies") or {}).get("available") or 0
        if rejected and copies:
            name = f"{cache.namespace}/{cache.name}" if cache.namespace else cache.name
            out.append(
                Finding(
                    5,
                    f"{cache.kind} {name} has {copies} copies but does not fit storageLimit of node "
                    f"group(s) {', '.join(rejected)} (caches are counted in creation order)",
                    "raise those groups' storageLimit first, or set "
                    f'"{domain.STORAGE_POLICY_KEY}": "warn" in inferenceservice-config localModel '
                    "(otherwise its copies are taken away)",
                )
            )
    return out
