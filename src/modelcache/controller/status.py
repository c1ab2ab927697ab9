"""Status the controller writes: cache status (KServe's nodeStatus, copies, services, plus our
conditions and progress), node-group used/available, and the events that summarise changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from modelcache import domain
from modelcache.api.types import ModelStatus, NodeStatus
from modelcache.domain import (
    REASON_GROUP_MISSING,
    Placement,
)

from .actions import Event, Plan, cache_ref
from .placement import format_quantity
from .views import (
    _MAX_NAMES_IN_MESSAGE,
    CONDITION_READY,
    CONDITION_SCHEDULED,
    Cache,
    ModelNode,
    Observed,
    Service,
)

# --- status ---------------------------------------------------------------------------------------

_NODE_STATUS = {
    ModelStatus.PENDING.value: NodeStatus.PENDING.value,
    ModelStatus.DOWNLOADING.value: NodeStatus.DOWNLOADING.value,
    ModelStatus.DOWNLOADED.value: NodeStatus.DOWNLOADED.value,
    ModelStatus.ERROR.value: NodeStatus.ERROR.value,
}


def node_status(model_status: str | None) -> str:
    """KServe's NodeStatusFromLocalModelStatus: unknown or missing -> NodeDownloadPending."""
    return _NODE_STATUS.get(model_status or "", NodeStatus.PENDING.value)


def condition(
    observed: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime kept while the status does not change."""
    value = "True" if status else "False"
    previous = next((c for c in observed or () if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    out: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_NAMES_IN_MESSAGE])
    more = len(items) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} and {more} more" if more > 0 else shown


def _services_for(cache: Cache, services: Sequence[Service]) -> list[Service]:
    """ISVCs/LLMISVCs using the cache: a namespace cache only sees its own namespace's services."""
    if cache.namespace:
        return [
            s
            for s in services
            if s.cache == cache.name
            and s.cache_namespace == cache.namespace
            and s.namespace == cache.namespace
        ]
    return [s for s in services if s.cache == cache.name and not s.cache_namespace]


def _service_list(services: Iterable[Service]) -> list[dict[str, str]] | None:
    out = [
        {"name": s.name, "namespace": s.namespace}
        for s in sorted(services, key=lambda s: (s.namespace, s.name))
    ]
    return out or None


def _progress(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Our nodeProgress from the agent's per-model detail."""
    if not raw:
        return None
    out: dict[str, Any] = {}
    for src, dst in (
        ("bytesDone", "bytesDone"),
        ("bytesTotal", "bytesTotal"),
        ("startedAt", "startedAt"),
        ("finishedAt", "finishedAt"),
        ("lastError", "message"),
    ):
        if raw.get(src) is not None:
            out[dst] = raw[src]
    return out or None


def _map_patch(
    observed: Mapping[str, Any] | None, desired: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """JSON merge patch turning one map into another (null deletes a key); None when equal."""
    have, want = dict(observed or {}), dict(desired or {})
    if have == want:
        return None
    patch: dict[str, Any] = {k: v for k, v in want.items() if have.get(k) != v}
    patch.update(dict.fromkeys((k for k in have if k not in want), None))
    return patch


def _same(a: Any, b: Any) -> bool:
    """Equal, treating missing, null and empty collections alike (omitempty)."""
    return (a or None) == (b or None)


def _nodes_changed(cache: Cache, added: Sequence[str], removed: Sequence[str], out: Plan) -> None:
    changes = []
    if added:
        changes.append(f"sent to {len(added)} node(s): {_names(added)}")
    if removed:
        changes.append(f"removed from {len(removed)} node(s): {_names(removed)}")
    if changes:
        out.events.append(Event(cache_ref(cache), "Normal", "NodesChanged", "; ".join(changes)))


def _group_status(
    observed: Observed, placement: Placement, members: Mapping[str, list[str]], out: Plan
) -> None:
    """NodeGroup used/available (bytes of the caches placed on it) and member nodes."""
    for name, group in sorted(observed.groups.items()):
        used = placement.used.get(name, 0)
        desired: dict[str, Any] = {"nodes": members[name] or None, "used": format_quantity(used)}
        if group.storage_limit is not None:
            desired["available"] = format_quantity(max(group.storage_limit - used, 0))
        patch = {k: v for k, v in desired.items() if not _same(group.status.get(k), v)}
        if patch:
            out.group_status.append((name, patch))


def _scheduled(
    cache: Cache, observed: Observed, placement: Placement, seen: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any]:
    """Condition Scheduled: False naming each group that is missing or has no room for the cache."""
    rejected = placement.rejected.get(cache.ref, ())
    over = placement.over.get(cache.ref, ())
    if over and not rejected:  # modelcacheStorageLimit: warn (KServe's behaviour): placed anyway
        message = (
            f"placed beyond the storageLimit of node group(s) {', '.join(over)} "
            f"({domain.STORAGE_POLICY_KEY}=warn: not enforced)"
        )
        return condition(seen, CONDITION_SCHEDULED, True, "OverStorageLimit", message, now, cache.generation)
    if not rejected:
        return condition(
            seen, CONDITION_SCHEDULED, True, "Placed", "fits in every node group", now, cache.generation
        )
    reasons = sorted({why for _, why in rejected})
    details = []
    for group_name, why in rejected:
        group = observed.groups.get(group_name)
        if why == REASON_GROUP_MISSING or group is None:
            details.append(f"node group {group_name} does not exist")
            continue
        limit = group.storage_limit or 0
        free = max(limit - placement.used.get(group_name, 0), 0)
        size = format_quantity(cache.model_size) if cache.model_size is not None else "an invalid modelSize"
        details.append(
            f"node group {group_name}: {size} does not fit in storageLimit "
            f"{format_quantity(limit)} ({format_quantity(free)} free)"
        )
    reason = reasons[0] if len(reasons) == 1 else "NotPlaced"
    return condition(seen, CONDITION_SCHEDULED, False, reason, "; ".join(details), now, cache.generation)


def _cache_status(
    cache: Cache,
    observed: Observed,
    node_names: Sequence[str],
    placement: Placement,
    now: str,
    out: Plan,
) -> None:
    """KServe's status (nodeStatus, copies, services) plus our conditions and progress."""
    status = cache.status
    node_status: dict[str, str] = {}
    progress: dict[str, Any] = {}
    for node_name in node_names:
        node = observed.nodes[node_name]
        mn = observed.model_nodes.get(node_name)
        if not node.ready:
            node_status[node_name] = NodeStatus.NOT_READY.value
        else:
            node_status[node_name] = node_status_of(mn, cache.status_key)
        detail = _progress(mn.progress.get(cache.status_key)) if mn is not None else None
        if detail:
            progress[node_name] = detail
    total = len(node_status)
    available = sum(1 for s in node_status.values() if s == NodeStatus.DOWNLOADED.value)
    failed = sum(1 for s in node_status.values() if s == NodeStatus.ERROR.value)
    copies = {"total": total, "available": available, "failed": failed}

    conditions_seen = status.get("conditions") or []
    scheduled = _scheduled(cache, observed, placement, conditions_seen, now)
    copies_text = f"{available}/{total} copies available" + (f", {failed} failed" if failed else "")
    if total and available == total:
        ready_reason = "AllCopiesAvailable"
    else:
        ready_reason = "NoNodes" if not total else "CopiesUnavailable"
    is_ready = bool(total) and available == total
    ready = condition(
        conditions_seen, CONDITION_READY, is_ready, ready_reason, copies_text, now, cache.generation
    )
    conditions = [ready, scheduled]
    ref = cache_ref(cache)
    for new in conditions:
        old = next((c for c in conditions_seen if c.get("type") == new["type"]), None)
        if old is None or old.get("status") != new["status"] or old.get("reason") != new["reason"]:
            bad = new["status"] == "False" and (new["type"] == CONDITION_SCHEDULED or failed > 0)
            bad = bad or new["reason"] == "OverStorageLimit"
            kind = "Warning" if bad else "Normal"
            out.events.append(
                Event(ref, kind, new["reason"], f"{new['type']}={new['status']}: {new['message']}")
            )
    # One event per pass summarising per-node transitions (new nodes included), grouped by state.
    seen_status = status.get("nodeStatus") or {}
    moved: dict[str, list[str]] = {}
    for node_name, state in node_status.items():
        if seen_status.get(node_name) != state:
            moved.setdefault(state, []).append(node_name)
    if moved:
        parts = [
            f"{state} on {len(names)} node(s): {_names(names)}" for state, names in sorted(moved.items())
        ]
        trouble = NodeStatus.ERROR.value in moved or NodeStatus.NOT_READY.value in moved
        out.events.append(
            Event(ref, "Warning" if trouble else "Normal", "NodeStatusChanged", "; ".join(parts))
        )

    patch: dict[str, Any] = {}
    ns_patch = _map_patch(status.get("nodeStatus"), node_status)
    if ns_patch is not None:
        patch["nodeStatus"] = ns_patch
    pr_patch = _map_patch(status.get("nodeProgress"), progress)
    if pr_patch is not None:
        patch["nodeProgress"] = pr_patch or None
    if (status.get("copies") or {}) != copies:
        patch["copies"] = copies
    services = _services_for(cache, observed.services)
    for key, kind in (
        ("inferenceServices", "InferenceService"),
        ("llmInferenceServices", "LLMInferenceService"),
    ):
        value = _service_list(s for s in services if s.kind == kind)
        if not _same(status.get(key), value):
            patch[key] = value
    if [dict(c) for c in conditions_seen] != conditions:
        patch["conditions"] = conditions
    if cache.generation is not None and status.get("observedGeneration") != cache.generation:
        patch["observedGeneration"] = cache.generation
    if patch:
        out.cache_status.append((cache.ref, patch))


def node_status_of(mn: ModelNode | None, status_key: str) -> str:
    """A ready node's NodeStatus for one cache, from its LocalModelNode (none yet: pending)."""
    return node_status(mn.model_status.get(status_key) if mn is not None else None)
