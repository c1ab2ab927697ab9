"""What the node agent should do next, as pure functions over plain data.

Observed state in (the LocalModelNode's entries, what is on disk, what pods mount, the budget, the
agent's own per-model progress), desired actions and the status to report out. The agent's loop
(`modelcache.agent.agent`) gathers the inputs, applies the plan and patches the status; nothing in
this module touches a disk, a socket or a clock.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from modelcache.api.types import LocalModelInfo, LocalModelNodeSpec, ModelProgress, ModelStatus
from modelcache.domain import needs_download_job, pvc_name, status_key
from modelcache.kube import backoff
from modelcache.quantity import format_bytes
from modelcache.uri import storage_key

Phase = Literal["pending", "downloading", "downloaded", "error"]

#: A container volumeMount subPath under a cache volume: `models/<key>[/sub/path]`.
_SUBPATH_RE = re.compile(r"^/?models/([0-9a-f]{16})(?:/|$)")


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One `spec.localModels` item, with the two names the agent derives from it."""

    info: LocalModelInfo

    @property
    def status_key(self) -> str:
        """KServe's key in status.modelStatus: modelName, or namespace/modelName."""
        return status_key(self.info.namespace, self.info.modelName)

    @property
    def uri(self) -> str:
        return self.info.sourceModelUri

    @property
    def key(self) -> str:
        return storage_key(self.info.sourceModelUri)

    def pvc_name(self, default_group: str | None) -> str | None:
        """KServe's PVC name for pods using this model: `<cache>-<group>`."""
        group = self.info.nodeGroup or default_group
        return pvc_name(self.info.modelName, group) if group else None


def entries(spec: LocalModelNodeSpec | None, node_group: str | None = None) -> list[Entry]:
    """The entries this agent serves: all, or those of its node group (entries without a group too).
    URIs our engine cannot read are not served here: the controller's download Job fetches them and
    reports their status (`domain.needs_download_job`)."""
    if spec is None:
        return []
    out = []
    for info in spec.localModels:
        if node_group and info.nodeGroup and info.nodeGroup != node_group:
            continue
        if needs_download_job(info.sourceModelUri):
            continue
        out.append(Entry(info))
    return out


def status_keys(spec: LocalModelNodeSpec | None) -> set[str]:
    """Status keys of every entry, served here or not (another group's agent, a download Job)."""
    return {status_key(i.namespace, i.modelName) for i in (spec.localModels if spec else [])}


@dataclass(frozen=True)
class OnDisk:
    """A complete model in the store. `healthy`: it passes the fast check (file set and sizes)."""

    key: str
    uri: str
    size_bytes: int
    last_used_at: float
    healthy: bool = True
    pinned: bool = False
    in_use: bool = False  # a local lease (e.g. a process on this node reading it)
    created_at: float | None = None  # when it was published (adopted models have no other record)


@dataclass(frozen=True)
class Partial:
    """An unfinished download in staging. `held`: someone (this agent or another process) is on it."""

    key: str
    uri: str
    done_bytes: int
    held: bool = False


@dataclass
class Progress:
    """The agent's memory of one storage key; the loop mutates it, the plan only reads it."""

    phase: Phase = "pending"
    bytes_done: int = 0
    bytes_total: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    last_error: str | None = None
    retry_at: float | None = None  # after a failure: not before this time
    no_space: bool = False  # the error is the budget, not the source: re-evaluated every pass


@dataclass(frozen=True)
class Budget:
    """How many bytes the cache may hold. Watermarks are fractions of the capacity."""

    storage_limit: int | None  # the node group's storageLimit (or an override); None: disk only
    fs_free: int  # free bytes on the filesystem holding the cache, now
    reserve: int = 0  # never fill the filesystem beyond this much free
    high: float = 0.95
    low: float = 0.85

    def capacity(self, on_disk: int) -> int:
        """Bytes the cache may hold in all: its current use plus free space, capped by the limit."""
        fs_cap = on_disk + self.fs_free - self.reserve
        cap = fs_cap if self.storage_limit is None else min(self.storage_limit, fs_cap)
        return max(0, cap)

    def describe(self, on_disk: int) -> str:
        fs_cap = max(0, on_disk + self.fs_free - self.reserve)
        if self.storage_limit is not None and self.storage_limit <= fs_cap:
            return f"the node group's storageLimit of {format_bytes(self.storage_limit)}"
        return (
            f"{format_bytes(fs_cap)} of disk for the cache ({format_bytes(self.fs_free)} free, "
            f"{format_bytes(self.reserve)} kept in reserve)"
        )


# -- the plan ----------------------------------------------------------------------------------
@dataclass
class Plan:
    download: list[str] = field(default_factory=list)  # storage keys to pull now
    probe: list[str] = field(default_factory=list)  # missing keys whose size is not known yet
    refetch: list[str] = field(default_factory=list)  # on disk but broken: remove, then download
    evict: list[str] = field(default_factory=list)  # unreferenced models to delete now
    clean_staging: list[str] = field(default_factory=list)  # abandoned partial downloads
    no_space: dict[str, str] = field(default_factory=dict)  # wanted keys that cannot fit, and why
    fits: list[str] = field(default_factory=list)  # keys whose no-space error no longer holds
    wake_at: float | None = None  # earliest retry time among models in backoff
    committed: int = 0  # bytes the cache will hold once admitted downloads finish
    capacity: int = 0


def uris_by_key(wanted: Iterable[Entry]) -> dict[str, str]:
    """Storage key -> URI, first entry wins (entries sharing a URI share one download)."""
    out: dict[str, str] = {}
    for e in wanted:
        out.setdefault(e.key, e.uri)
    return out


def plan(
    wanted: list[Entry],
    disk: Mapping[str, OnDisk],
    partials: Mapping[str, Partial],
    sizes: Mapping[str, int],
    active: set[str],
    progress: Mapping[str, Progress],
    mounted: set[str],
    budget: Budget,
    now: float,
    *,
    max_concurrent: int = 2,
    delete_unreferenced: bool = False,
) -> Plan:
    """Level-based: the same inputs always give the same plan, so a resync after a crash is safe.

    Admission walks the wanted models in spec order. A model is started only when it fits in the
    budget, after evicting least-recently-used models that nothing references, mounts, pins or
    leases. One that cannot fit even then is reported (`no_space`) and not started: the agent
    never evicts one wanted model to make room for another, so it cannot thrash.
    """
    p = Plan()
    keys = uris_by_key(wanted)
    referenced = set(keys)
    on_disk_bytes = sum(d.size_bytes for d in disk.values()) + sum(x.done_bytes for x in partials.values())
    cap = budget.capacity(on_disk_bytes)
    p.capacity = cap

    def protected(d: OnDisk) -> bool:
        return d.key in referenced or d.key in mounted or d.pinned or d.in_use

    # Broken wanted models are fetched again; broken unwanted ones are simply dropped.
    for d in disk.values():
        if not d.healthy and d.key not in active:
            if d.key in referenced:
                p.refetch.append(d.key)
            elif not protected(d):
                p.evict.append(d.key)
    healthy = {k: d for k, d in disk.items() if d.healthy and k not in p.refetch and k not in p.evict}

    for x in partials.values():
        if x.key not in referenced and not x.held and x.key not in active:
            p.clean_staging.append(x.key)

    committed = sum(d.size_bytes for d in healthy.values())
    for k in active:
        committed += max(sizes.get(k, 0), partials[k].done_bytes if k in partials else 0)
    for k, x in partials.items():
        if k in referenced and k not in active:
            committed += x.done_bytes  # kept for resume
    pool = sorted((d for d in healthy.values() if not protected(d)), key=lambda d: (d.last_used_at, d.key))
    evicted: set[str] = set()

    def evict_until(limit: int) -> bool:
        nonlocal committed
        for d in pool:
            if committed <= limit:
                break
            if d.key in evicted:
                continue
            evicted.add(d.key)
            p.evict.append(d.key)
            committed -= d.size_bytes
        return committed <= limit

    slots = max(0, max_concurrent - len(active))
    for k, _uri in keys.items():
        if k in active or k in healthy:
            continue
        prog = progress.get(k)
        if prog is not None and prog.retry_at is not None and prog.retry_at > now and not prog.no_space:
            p.wake_at = prog.retry_at if p.wake_at is None else min(p.wake_at, prog.retry_at)
            continue
        size = sizes.get(k)
        if size is None:
            if slots > 0:
                p.probe.append(k)
                slots -= 1
            continue
        staged = partials[k].done_bytes if k in partials else 0
        need = max(0, size - staged)
        if committed + need > cap:
            # Would evicting every unprotected model be enough? Only then evict anything.
            evictable = sum(d.size_bytes for d in pool if d.key not in evicted)
            if committed + need - evictable > cap:
                held = committed - evictable
                p.no_space[k] = (
                    f"model needs {format_bytes(size)} but the cache budget is "
                    f"{budget.describe(on_disk_bytes)}; "
                    f"{format_bytes(held)} is held by models that are wanted or in use"
                )
                continue
        if slots <= 0:
            continue  # fits, but waits for a download slot (stays Pending)
        if committed + need > cap:
            evict_until(cap - need)
        committed += need
        p.download.append(k)
        slots -= 1
        if prog is not None and prog.no_space:
            p.fits.append(k)

    # Housekeeping: above the high watermark, drop unreferenced models down to the low one; or drop
    # them all at once when so configured.
    if delete_unreferenced:
        evict_until(-1)
    elif committed > budget.high * cap:
        evict_until(int(budget.low * cap))
    p.committed = committed
    return p


def spec_changed(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> bool:
    """Whether a watch event is news to the planner: created, deleted, or a new spec.

    Our own status writes come back as watch events too; replanning on each would double the
    work during downloads, so they only refresh the observed status.
    """
    if before is None or after is None:
        return before is not after
    meta_b, meta_a = before.get("metadata") or {}, after.get("metadata") or {}
    return bool(
        meta_b.get("uid") != meta_a.get("uid")
        or meta_b.get("generation") != meta_a.get("generation")
        or before.get("spec") != after.get("spec")
    )


# -- pods --------------------------------------------------------------------------------------
def mounted_keys(pods: Iterable[Mapping[str, Any]], pvc_to_key: Mapping[str, str]) -> set[str]:
    """Storage keys that pods on this node may be reading, from their volumes and mounts.

    Two signals: a PVC volume whose claim is a known cache PVC (`<cache>-<group>`), and any volume
    mount whose subPath is `models/<key>` (how KServe's mutator mounts a model). Finished pods
    (Succeeded/Failed) do not count.
    """
    found: set[str] = set()
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        spec = pod.get("spec") or {}
        for vol in spec.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim in pvc_to_key:
                found.add(pvc_to_key[claim])
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            for m in c.get("volumeMounts") or []:
                match = _SUBPATH_RE.match(m.get("subPath") or "")
                if match:
                    found.add(match.group(1))
    return found


# -- status ------------------------------------------------------------------------------------
def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_status(
    wanted: list[Entry], healthy: Mapping[str, OnDisk], active: set[str], progress: Mapping[str, Progress]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(modelStatus, models) for the wanted entries, as JSON-ready dicts (None fields dropped)."""
    phases: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    for e in wanted:
        k = e.key
        prog = progress.get(k) or Progress()
        d = healthy.get(k)
        if d is not None and k not in active:
            status = ModelStatus.DOWNLOADED
            mp = ModelProgress(
                bytesDone=d.size_bytes,
                bytesTotal=d.size_bytes,
                startedAt=rfc3339(prog.started_at),
                finishedAt=rfc3339(prog.finished_at or d.created_at),
                attempts=prog.attempts or None,
                storageKey=k,
            )
        else:
            if k in active:
                status = ModelStatus.DOWNLOADING
            elif prog.phase == "error":
                status = ModelStatus.ERROR
            else:
                status = ModelStatus.PENDING
            mp = ModelProgress(
                bytesDone=prog.bytes_done if (k in active or prog.bytes_done) else None,
                bytesTotal=prog.bytes_total,
                startedAt=rfc3339(prog.started_at),
                attempts=prog.attempts or None,
                lastError=prog.last_error if status == ModelStatus.ERROR else None,
                storageKey=k,
            )
        phases[e.status_key] = status.value
        details[e.status_key] = mp.model_dump(exclude_none=True)
    return phases, details


_VOLATILE = ("bytesDone",)


def _significant(details: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {f: v for f, v in d.items() if f not in _VOLATILE} for k, d in details.items()}


def status_patch(
    observed: Mapping[str, Any] | None,
    phases: Mapping[str, str],
    details: Mapping[str, Mapping[str, Any]],
    *,
    progress_due: bool,
    others: Iterable[str] = (),
) -> dict[str, Any] | None:
    """A JSON merge patch for `status`, or None when nothing worth a write changed.

    Phase, error and attempt changes are written at once; byte counters only when `progress_due`
    (the caller's throttle), so a fleet of downloading nodes does not flood the apiserver.
    Entries that left the spec are removed (null in a merge patch); `others` are keys of entries
    still in the spec that another agent on this node serves (another node group): left alone.
    """
    keep = set(others)
    obs = observed or {}
    obs_phases: dict[str, Any] = {k: v for k, v in (obs.get("modelStatus") or {}).items() if k not in keep}
    obs_details: dict[str, Any] = {k: v for k, v in (obs.get("models") or {}).items() if k not in keep}
    changed = obs_phases != dict(phases) or _significant(obs_details) != _significant(details)
    moved = obs_details != dict(details)
    if not changed and not (moved and progress_due):
        return None
    ms: dict[str, Any] = {k: v for k, v in phases.items() if obs_phases.get(k) != v}
    ms.update({k: None for k in obs_phases if k not in phases})
    md: dict[str, Any] = {}
    for k, d in details.items():
        if obs_details.get(k) != d:
            # replace the whole entry: null out fields that are gone (e.g. lastError after success)
            old = obs_details.get(k) or {}
            md[k] = {**{f: None for f in old if f not in d}, **d}
    md.update({k: None for k in obs_details if k not in details})
    patch: dict[str, Any] = {}
    if ms:
        patch["modelStatus"] = ms
    if md:
        patch["models"] = md
    return {"status": patch} if patch else None


# -- retries -----------------------------------------------------------------------------------
def retry_delay(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with equal jitter: never sooner than half the step, never beyond the cap
    (the one backoff, `kube.backoff.delay`)."""
    return backoff.delay(attempts, base, cap, rng or random.Random())


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove credential values from a message (defence in depth: sources already redact)."""
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


# -- full verification schedule ----------------------------------------------------------------
def next_full_verify(
    healthy: Mapping[str, OnDisk],
    referenced: set[str],
    verified_at: Mapping[str, float],
    active: set[str],
    now: float,
    interval: float,
) -> str | None:
    """The wanted model whose last full sha256 check is oldest and overdue (None: nothing due)."""
    best: tuple[float, str] | None = None
    for k in healthy:
        if k not in referenced or k in active:
            continue
        last = verified_at.get(k, 0.0)
        if now - last < interval:
            continue
        if best is None or (last, k) < best:
            best = (last, k)
    return best[1] if best else None
