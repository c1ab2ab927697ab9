"""Rules that the controller, the webhook and the agent all apply, written once (pure).

- **Membership**: a node is in a LocalModelNodeGroup when it matches the group's
  `persistentVolumeSpec.nodeAffinity.required` (core/v1 NodeSelector: terms ORed, requirements
  ANDed; an empty term matches nothing). A group **without** nodeAffinity selects **no** node, as
  KServe's `CheckNodeAffinity` does (the webhook used to select every node, the controller none).
- **Capacity**: the caches placed on a group may promise at most its `storageLimit`. Caches are
  placed first come, first served (creation time, then namespace and name); caches of one URI share
  one folder (`models/<key>`), so a storage key counts **once**, at its largest `modelSize`. The
  webhook asks the same question by placing the new cache last (`fits`), so whatever it admits the
  controller places. With enforcement off (`StoragePolicy.WARN`) every cache is placed and the
  excess is only reported.
- **Status keys**: `status.modelStatus` of a LocalModelNode is keyed by `modelName`, or
  `namespace/modelName` for namespace caches (KServe's GetStatusKey).
- **Cache matching**: a storageUri is served by a cache whose sourceModelUri equals it or is a
  parent path of it (`uri.sub_path`); namespace caches of the workload's namespace first, then
  cluster caches, each in name order; caches being deleted match nothing.
- **Who downloads**: a scheme our engine knows (`uri.SCHEMES`) is downloaded in process by the
  agent; any other is downloaded by a KServe-style Job the controller runs (`needs_download_job`),
  with the image of the ClusterStorageContainer that declares the URI, else `defaultJobImage`
  (KServe's storage-initializer, which reads hdfs:// and webhdfs://). The webhook admits such a URI
  only when one of the two can read it (`job_download_problem`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from modelcache.uri import SCHEMES, sub_path

#: Key in inferenceservice-config `localModel` (ours; KServe ignores unknown keys).
STORAGE_POLICY_KEY = "modelcacheStorageLimit"


class StoragePolicy(StrEnum):
    ENFORCE = "enforce"  # a cache that does not fit is refused (webhook) and not placed (controller)
    WARN = "warn"  # everything is placed; over-commitment is reported (KServe's behaviour, #6137)


def storage_policy(local_model: Mapping[str, Any] | None) -> StoragePolicy:
    """From the `localModel` config's extra keys; anything unknown means enforce (the safe side)."""
    value = str((local_model or {}).get(STORAGE_POLICY_KEY) or "").strip().lower()
    return StoragePolicy.WARN if value in ("warn", "off", "false") else StoragePolicy.ENFORCE


# -- status keys ---------------------------------------------------------------------------------
def status_key(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def pvc_name(cache: str, group: str) -> str:
    """KServe's PVC for pods using `cache` through `group`: `<cache>-<group>`."""
    return f"{cache}-{group}"


# -- membership ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Term:
    """One nodeSelectorTerm: expressions and fields are ANDed."""

    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()


def _requirement(raw: Any) -> Requirement | None:
    if not isinstance(raw, Mapping):
        return None
    values = raw.get("values")
    return Requirement(
        key=raw["key"] if isinstance(raw.get("key"), str) else "",
        operator=raw["operator"] if isinstance(raw.get("operator"), str) else "",
        values=tuple(v for v in values if isinstance(v, str)) if isinstance(values, list | tuple) else (),
    )


def parse_terms(pv_spec: Any) -> tuple[Term, ...]:
    """`persistentVolumeSpec.nodeAffinity.required.nodeSelectorTerms`; wrong types read as absent
    (the webhook sees hostile JSON). An unreadable requirement makes its term match nothing."""
    affinity = pv_spec.get("nodeAffinity") if isinstance(pv_spec, Mapping) else None
    required = affinity.get("required") if isinstance(affinity, Mapping) else None
    raw_terms = required.get("nodeSelectorTerms") if isinstance(required, Mapping) else None
    terms = []
    for raw in raw_terms if isinstance(raw_terms, list | tuple) else ():
        if not isinstance(raw, Mapping):
            continue
        parts = []
        for key in ("matchExpressions", "matchFields"):
            items = raw.get(key) or ()
            reqs = [_requirement(r) for r in items] if isinstance(items, list | tuple) else [None]
            parts.append(tuple(r if r is not None else Requirement("", "") for r in reqs))
        terms.append(Term(expressions=parts[0], fields=parts[1]))
    return tuple(terms)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def requirement_matches(req: Requirement, value: str | None) -> bool:
    """One NodeSelectorRequirement against a label (or field) value; None: absent. Kubernetes rules."""
    op = req.operator
    if op == "In":
        return value is not None and value in req.values
    if op == "NotIn":
        return value is None or value not in req.values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        if value is None or len(req.values) != 1:
            return False
        have, want = _int(value), _int(req.values[0])
        if have is None or want is None:
            return False
        return have > want if op == "Gt" else have < want
    return False  # unknown operator: the API server would have rejected it; match nothing


def term_matches(term: Term, name: str, labels: Mapping[str, str]) -> bool:
    """A term with neither expressions nor fields matches nothing (MatchNodeSelectorTerms);
    matchFields knows only metadata.name with In/NotIn, as the scheduler."""
    if not term.expressions and not term.fields:
        return False
    for req in term.expressions:
        if not requirement_matches(req, labels.get(req.key)):
            return False
    for req in term.fields:
        if req.key != "metadata.name" or req.operator not in ("In", "NotIn"):
            return False
        if not requirement_matches(req, name):
            return False
    return True


def selects(terms: Sequence[Term], name: str, labels: Mapping[str, str]) -> bool:
    """Terms are ORed; no terms (a group without nodeAffinity) select no node, as KServe."""
    return any(term_matches(t, name, labels) for t in terms)


# -- capacity ------------------------------------------------------------------------------------
REASON_STORAGE_LIMIT = "StorageLimitExceeded"
REASON_GROUP_MISSING = "NodeGroupNotFound"


@dataclass(frozen=True, slots=True)
class Claim:
    """What a cache asks of its groups. `size` None: unparsable, fits nowhere (under enforce)."""

    ref: tuple[str, str]  # (namespace, name); namespace "" for a LocalModelCache
    key: str  # storage key of the source URI
    size: int | None
    groups: tuple[str, ...]
    created: str = ""
    deleting: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    """Where each cache may go. `placed[ref]`: its groups that exist and have room, in spec order."""

    placed: Mapping[tuple[str, str], tuple[str, ...]]
    rejected: Mapping[tuple[str, str], tuple[tuple[str, str], ...]]  # ref -> ((group, reason), ...)
    used: Mapping[str, int]  # group -> bytes promised by the caches placed on it (a key once)
    over: Mapping[tuple[str, str], tuple[str, ...]]  # WARN only: placed beyond storageLimit


def place(
    claims: Iterable[Claim],
    limits: Mapping[str, int | None],
    policy: StoragePolicy = StoragePolicy.ENFORCE,
) -> Placement:
    """First come, first served; a key already on a group costs only what its size adds.

    A cache that does not fit a group is not sent to that group's nodes (its other groups still get
    it). Caches being deleted take no room, so a rejected cache gets its place once room is freed.
    """
    keys: dict[str, dict[str, int]] = {g: {} for g in limits}
    placed: dict[tuple[str, str], tuple[str, ...]] = {}
    rejected: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    over: dict[tuple[str, str], tuple[str, ...]] = {}
    for claim in sorted(claims, key=lambda c: (c.created, c.ref)):
        if claim.deleting:
            continue
        ok: list[str] = []
        bad: list[tuple[str, str]] = []
        beyond: list[str] = []
        for name in dict.fromkeys(claim.groups):
            if name not in limits:
                bad.append((name, REASON_GROUP_MISSING))
                continue
            on_group = keys[name]
            limit = limits[name]
            size = claim.size
            fits = size is not None and limit is not None
            if fits and size is not None and limit is not None:
                extra = max(size - on_group.get(claim.key, 0), 0)
                fits = sum(on_group.values()) + extra <= limit
            if not fits and policy == StoragePolicy.ENFORCE:
                bad.append((name, REASON_STORAGE_LIMIT))
                continue
            if not fits:
                beyond.append(name)
            on_group[claim.key] = max(on_group.get(claim.key, 0), size or 0)
            ok.append(name)
        placed[claim.ref] = tuple(ok)
        if bad:
            rejected[claim.ref] = tuple(bad)
        if beyond:
            over[claim.ref] = tuple(beyond)
    used = {g: sum(k.values()) for g, k in keys.items()}
    return Placement(placed=placed, rejected=rejected, used=used, over=over)


@dataclass(frozen=True, slots=True)
class Fit:
    ok: bool
    committed: int  # bytes already promised on the group by the others
    available: int
    others: tuple[str, ...]  # status keys of the caches placed there


def fits(
    new: Claim,
    group: str,
    others: Iterable[Claim],
    limits: Mapping[str, int | None],
    policy: StoragePolicy = StoragePolicy.ENFORCE,
) -> Fit:
    """Would the controller place `new` on `group`, created after every cache that exists now?"""
    existing = [c for c in others if c.ref != new.ref]
    before = place(existing, limits, policy)
    last = Claim(new.ref, new.key, new.size, new.groups, created="\U0010ffff", deleting=False)
    after = place([*existing, last], limits, policy)
    limit = limits.get(group) or 0
    committed = before.used.get(group, 0)
    names = tuple(sorted(status_key(*c.ref) for c in existing if group in before.placed.get(c.ref, ())))
    ok = group in after.placed.get(new.ref, ()) and group not in after.over.get(new.ref, ())
    return Fit(ok=ok, committed=committed, available=max(limit - committed, 0), others=names)


# -- cache matching -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CacheView:
    name: str
    namespace: str  # "" for a LocalModelCache
    source_uri: str
    groups: tuple[str, ...]
    deleting: bool = False


@dataclass(frozen=True, slots=True)
class CacheMatch:
    name: str
    namespace: str | None  # set for a LocalModelNamespaceCache
    source_uri: str
    pvc_name: str
    group: str


def match_cache(
    storage_uri: str, namespace: str, node_group: str | None, caches: Iterable[CacheView]
) -> CacheMatch | None:
    """KServe's `setLocalModelLabel`. Unlike KServe, a cache being deleted matches nothing."""
    ordered = sorted(caches, key=lambda c: (c.namespace == "", c.name))
    for cache in ordered:
        if cache.namespace and cache.namespace != namespace:
            continue
        if cache.deleting or not cache.groups or sub_path(storage_uri, cache.source_uri) is None:
            continue
        if node_group is not None and node_group not in cache.groups:
            continue
        group = node_group if node_group is not None else cache.groups[0]
        pvc = pvc_name(cache.name, group)
        return CacheMatch(cache.name, cache.namespace or None, cache.source_uri, pvc, group)
    return None


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- who downloads -------------------------------------------------------------------------------
#: ClusterStorageContainer workload type for KServe's local model download Jobs.
LOCAL_MODEL_WORKLOAD = "localModelDownloadJob"
#: Schemes KServe's default job image (its storage-initializer) reads that our engine does not.
DEFAULT_JOB_SCHEMES = frozenset({"hdfs", "webhdfs"})
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def uri_scheme(uri: str) -> str:
    """The scheme of `scheme://...`, lower case; "" for anything else (a path, garbage)."""
    m = _SCHEME.match(uri.strip())
    return m.group(1).lower() if m else ""


def needs_download_job(uri: str) -> bool:
    """A URI with a scheme our engine does not know: a download Job fetches it, not the agent."""
    scheme = uri_scheme(uri)
    return bool(scheme) and scheme not in SCHEMES


def uri_supported(formats: Any, uri: str) -> bool:
    """KServe's IsStorageUriSupported: a prefix match, or an (unanchored) regex search."""
    for f in formats if isinstance(formats, list) else []:
        if not isinstance(f, Mapping):
            continue
        if f.get("prefix"):
            if uri.startswith(str(f["prefix"])):
                return True
        elif f.get("regex"):
            try:
                if re.search(str(f["regex"]), uri):
                    return True
            except re.error:
                continue
    return False


def matching_container(cscs: Iterable[Mapping[str, Any]], uri: str) -> Mapping[str, Any] | None:
    """The first enabled localModelDownloadJob ClusterStorageContainer (by name) supporting `uri`."""
    for csc in sorted(cscs, key=lambda c: str((c.get("metadata") or {}).get("name", ""))):
        if csc.get("disabled"):
            continue
        spec = csc.get("spec") or {}
        if spec.get("workloadType") != LOCAL_MODEL_WORKLOAD:
            continue
        if uri_supported(spec.get("supportedUriFormats"), uri):
            return csc
    return None


def job_download_problem(uri: str, cscs: Iterable[Mapping[str, Any]]) -> str | None:
    """Why no download Job could fetch `uri` (None: one can). Only for URIs `needs_download_job`."""
    scheme = uri_scheme(uri)
    if scheme in DEFAULT_JOB_SCHEMES or matching_container(cscs, uri) is not None:
        return None
    known = ", ".join(sorted({*SCHEMES, *DEFAULT_JOB_SCHEMES}))
    return (
        f"unknown URI scheme {scheme!r} (known: {known}); a ClusterStorageContainer with workloadType "
        f"{LOCAL_MODEL_WORKLOAD} whose supportedUriFormats match the URI makes a download Job fetch it"
    )
