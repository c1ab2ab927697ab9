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

Split along its seams: `views` (parsing API objects), `placement` (membership, capacity),
`manifests` (PV/PVC, agent DaemonSet), `status` (cache and group status), `jobs` (download Jobs),
`actions` (the plan). This module orchestrates them in `plan()` and re-exports their names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from modelcache import domain
from modelcache.api.types import API_VERSION, ModelStatus
from modelcache.domain import (
    REASON_GROUP_MISSING,
    REASON_STORAGE_LIMIT,
    Placement,
    Requirement,
    requirement_matches,
)
from modelcache.kube.constants import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    READY_NODE_LABEL_PREFIX,
    READY_NODE_LABEL_VALUE,
    ready_label,
)
from modelcache.uri import storage_key

from .actions import Event, FinalizerPatch, ObjectRef, Plan, cache_ref
from .jobs import JobEntry, plan_jobs
from .manifests import (
    AGENT_SETTING_KEYS,
    _volume_key,
    adoption_patch,
    agent_daemonset,
    agent_image,
    apply_agent_settings,
    desired_volumes,
    foreign_agent_image,
    volume_adoption,
)
from .placement import claim_of, format_quantity, group_members, node_in_group, place, term_matches
from .status import (
    _cache_status,
    _group_status,
    _nodes_changed,
    _services_for,
    condition,
    node_status,
    node_status_of,
)
from .views import (
    AGENT_APP_NAME,
    AGENT_COMPONENT,
    COMPONENT_LABEL,
    CONDITION_READY,
    CONDITION_SCHEDULED,
    DEFAULT_AGENT_IMAGE,
    DEFAULT_AGENT_SERVICE_ACCOUNT,
    NODE_GROUP_LABEL,
    SPEC_HASH_ANNOTATION,
    VOLUME_CACHE_ANNOTATION,
    VOLUME_ROLE_LABEL,
    Cache,
    Entry,
    ModelNode,
    Node,
    NodeGroup,
    Observed,
    Service,
    Volume,
    cache_from,
    entry_from,
    group_from,
    model_node_from,
    node_from,
    pod_service_from,
    service_from,
    volume_from,
)

#: The controller's decisions in one namespace: parsing (views), membership and capacity
#: (placement), child manifests (manifests), status (status), the plan (actions); orchestrated here.
__all__ = [
    "AGENT_APP_NAME", "AGENT_COMPONENT", "AGENT_SETTING_KEYS", "COMPONENT_LABEL", "CONDITION_READY",
    "CONDITION_SCHEDULED", "DEFAULT_AGENT_IMAGE", "DEFAULT_AGENT_SERVICE_ACCOUNT", "NODE_GROUP_LABEL",
    "REASON_GROUP_MISSING", "REASON_STORAGE_LIMIT", "SPEC_HASH_ANNOTATION", "VOLUME_CACHE_ANNOTATION",
    "VOLUME_ROLE_LABEL", "Cache", "Entry", "Event", "FinalizerPatch", "ModelNode", "Node", "NodeGroup",
    "ObjectRef", "Observed", "Plan", "Requirement", "Service", "Volume", "adoption_patch",
    "agent_daemonset", "agent_image", "apply_agent_settings", "cache_from", "cache_ref", "claim_of",
    "condition", "desired_entries", "desired_volumes", "entry_from", "foreign_agent_image",
    "format_quantity", "group_from", "group_members", "job_entries", "model_node_from",
    "needs_download_job", "node_from", "node_in_group", "node_status", "node_status_of", "place",
    "plan", "pod_service_from", "requirement_matches", "service_from", "term_matches",
    "volume_adoption", "volume_from",
]  # fmt: skip
needs_download_job = domain.needs_download_job

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
            out.events.append(Event(cache_ref(cache), type_, reason, message))


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
            out.events.append(Event(cache_ref(cache), "Normal", "Finalized", message))


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
                out.volume_creates.append((cache_ref(cache), obj))  # the writer reports success or failure
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
