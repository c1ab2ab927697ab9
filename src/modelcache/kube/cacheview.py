"""What the cluster CLI shows, computed from plain API objects (dicts): no I/O, no clock reads.

Every figure comes from status the controller and the agents already report: LocalModelCache
`status.nodeStatus` / `nodeProgress` / `copies`, LocalModelNode `status.modelStatus` / `models`,
LocalModelNodeGroup `spec.storageLimit`. Node-group membership and "which workloads use this cache"
are the controller's own rules (`controller.reconcile`), imported, not re-implemented.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelcache.controller.reconcile import Node, NodeGroup, Service, group_members
from modelcache.quantity import parse_quantity
from modelcache.safepath import printable
from modelcache.uri import redact, storage_key

_SHORT = {
    "NodeDownloaded": "Downloaded",
    "NodeDownloading": "Downloading",
    "NodeDownloadPending": "Pending",
    "NodeDownloadError": "Error",
    "NodeNotReady": "NotReady",
    "": "Unknown",
}


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>()]+")


def scrub(text: str, limit: int = 300) -> str:
    """Free text from the cluster (errors, events) with every URI in it redacted, printable."""
    return printable(_URL.sub(lambda m: redact(m.group(0)), text), limit)


def timestamp(value: Any) -> float | None:
    """An RFC 3339 time from the API as seconds since the epoch; None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _size(value: Any) -> int | None:
    try:
        return parse_quantity(value) if value is not None else None
    except Exception:  # hostile or odd quantity in someone's object: show nothing, do not crash
        return None


@dataclass(frozen=True)
class NodeCopy:
    node: str
    state: str  # Downloaded | Downloading | Pending | Error | NotReady | Unknown
    bytes_done: int | None = None
    bytes_total: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""

    @property
    def percent(self) -> float | None:
        if self.state == "Downloaded":
            return 100.0
        if self.bytes_total and self.bytes_done is not None:
            return min(100.0, 100.0 * self.bytes_done / self.bytes_total)
        return None

    def rate(self, now: float) -> float | None:
        """Bytes per second since the download started (downloading copies only)."""
        if self.state != "Downloading" or not self.started_at or self.bytes_done is None:
            return None
        return self.bytes_done / max(now - self.started_at, 1e-3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "percent": None if self.percent is None else round(self.percent, 1),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "message": self.message,
        }


@dataclass(frozen=True)
class CacheView:
    name: str
    namespace: str  # "" for a cluster LocalModelCache
    uri: str  # redacted and printable
    key: str
    size_bytes: int | None
    node_groups: list[str]
    available: int
    total: int
    failed: int
    nodes: list[NodeCopy]
    created_at: float | None
    deleting: bool = False
    services: list[str] = field(default_factory=list)  # from status.inferenceServices

    @property
    def status_key(self) -> str:
        """How LocalModelNode status names this cache (KServe: `ns/name` for namespace caches)."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def downloading(self) -> list[NodeCopy]:
        return [n for n in self.nodes if n.state == "Downloading"]

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace or None,
            "uri": self.uri,
            "storage_key": self.key,
            "size_bytes": self.size_bytes,
            "node_groups": self.node_groups,
            "copies": {"available": self.available, "total": self.total, "failed": self.failed},
            "downloading": [
                {"node": n.node, "percent": None if n.percent is None else round(n.percent, 1)}
                for n in self.downloading
            ],
            "nodes": [n.as_dict() for n in self.nodes],
            "age_seconds": None if self.created_at is None else round(max(0.0, now - self.created_at)),
            "deleting": self.deleting,
            "inference_services": self.services,
        }


def cache_view(obj: Mapping[str, Any]) -> CacheView:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    copies = status.get("copies") or {}
    progress = status.get("nodeProgress") or {}
    nodes = []
    for node, state in sorted((status.get("nodeStatus") or {}).items()):
        p = progress.get(node) or {}
        nodes.append(
            NodeCopy(
                node=str(node),
                state=_SHORT.get(str(state), printable(str(state), 40)),
                bytes_done=_int(p.get("bytesDone")),
                bytes_total=_int(p.get("bytesTotal")),
                started_at=timestamp(p.get("startedAt")),
                finished_at=timestamp(p.get("finishedAt")),
                message=scrub(str(p.get("message") or "")),
            )
        )
    uri = str(spec.get("sourceModelUri") or "")
    services = [
        f"{s.get('namespace', '')}/{s.get('name', '')}"
        for s in (status.get("inferenceServices") or []) + (status.get("llmInferenceServices") or [])
        if isinstance(s, Mapping)
    ]
    return CacheView(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace") or "") if obj.get("kind") == "LocalModelNamespaceCache" else "",
        uri=printable(redact(uri), 1000),
        key=storage_key(uri) if uri else "",
        size_bytes=_size(spec.get("modelSize")),
        node_groups=[str(g) for g in spec.get("nodeGroups") or []],
        available=_int(copies.get("available")) or 0,
        total=_int(copies.get("total")) or 0,
        failed=_int(copies.get("failed")) or 0,
        nodes=nodes,
        created_at=timestamp(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        services=services,
    )


# -- preload --wait -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    ready: bool
    errors: list[tuple[str, str]]  # (node, reason)


def progress(view: CacheView, node_errors: Mapping[str, str] | None = None) -> Progress:
    """One bar summed over the nodes: done/total bytes; ready when every copy is available.

    A node without a byte count yet counts the cache's modelSize as its total, so the bar never
    jumps backwards when a node starts reporting."""
    done = total = 0
    errors: list[tuple[str, str]] = []
    for n in view.nodes:
        t = n.bytes_total or view.size_bytes or 0
        total += t
        done += t if n.state == "Downloaded" else min(n.bytes_done or 0, t)
        if n.state == "Error":
            reason = n.message or (node_errors or {}).get(n.node) or "download failed"
            errors.append((n.node, reason))
    ready = view.total > 0 and view.available >= view.total and not errors
    return Progress(done, total, ready, errors)


# -- workloads ------------------------------------------------------------------------------------
def users(view: CacheView, services: Iterable[Service]) -> list[str]:
    """Workloads using the cache: `Kind namespace/name`, sorted (from the controller's own rule)."""
    out = {f"InferenceService {s}" for s in view.services}
    for s in services:
        if s.cache == view.name and (s.cache_namespace or "") == view.namespace:
            out.add(f"{s.kind} {s.namespace}/{s.name}")
    return sorted(out)


def frees(view: CacheView, model_nodes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Bytes each node holds for this cache (what deleting it frees there)."""
    out: dict[str, int] = {}
    for n in view.nodes:
        if n.bytes_done:
            out[n.node] = n.bytes_done
    for lmn in model_nodes:
        node = str((lmn.get("metadata") or {}).get("name", ""))
        detail = ((lmn.get("status") or {}).get("models") or {}).get(view.status_key) or {}
        done = _int(detail.get("bytesDone"))
        if done and node not in out:
            out[node] = done
    return dict(sorted(out.items()))


# -- nodes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeRow:
    group: str
    node: str
    budget: int | None
    used: int
    models: int
    health: str
    errors: list[str] = field(default_factory=list)

    @property
    def free(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.used)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "node": self.node,
            "budget_bytes": self.budget,
            "used_bytes": self.used,
            "free_bytes": self.free,
            "models": self.models,
            "health": self.health,
            "errors": self.errors,
        }


def node_rows(
    groups: Sequence[NodeGroup], nodes: Sequence[Node], model_nodes: Iterable[Mapping[str, Any]]
) -> list[NodeRow]:
    """Per group and member node: budget (storageLimit), bytes held, models held, agent health.

    Health is what the cluster shows of the agent: `ok` when the node is Ready and its
    LocalModelNode reports no failed model; else why not."""
    by_name = {str((m.get("metadata") or {}).get("name", "")): m for m in model_nodes}
    ready = {n.name: n.ready for n in nodes}
    rows: list[NodeRow] = []
    for g in sorted(groups, key=lambda g: g.name):
        for node in sorted(group_members(g, nodes)):
            lmn = by_name.get(node)
            status = (lmn or {}).get("status") or {}
            phases = status.get("modelStatus") or {}
            details = status.get("models") or {}
            used = held = 0
            errors: list[str] = []
            for name, phase in phases.items():
                d = details.get(name) or {}
                if phase == "ModelDownloaded":
                    held += 1
                    used += _int(d.get("bytesTotal")) or _int(d.get("bytesDone")) or 0
                elif phase == "ModelDownloading":
                    used += _int(d.get("bytesDone")) or 0
                elif phase == "ModelDownloadError":
                    errors.append(f"{name}: {scrub(str(d.get('lastError') or 'failed'), 200)}")
            if not ready.get(node, False):
                health = "node not ready"
            elif lmn is None:
                health = "no LocalModelNode"
            elif errors:
                health = f"{len(errors)} error(s)"
            elif phases and not status:
                health = "no status"
            else:
                health = "ok"
            rows.append(NodeRow(g.name, node, g.storage_limit, used, held, health, errors))
    return rows
