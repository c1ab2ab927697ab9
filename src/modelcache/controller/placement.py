"""Node-group membership and capacity placement over the views (the rules live in
`modelcache.domain`, shared with the webhook and the agent)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from modelcache import domain
from modelcache.domain import (
    Claim,
    Placement,
    StoragePolicy,
    Term,
)
from modelcache.uri import storage_key

from .views import Cache, Node, NodeGroup

# --- node membership ------------------------------------------------------------------------------


def term_matches(term: Term, node: Node) -> bool:
    return domain.term_matches(term, node.name, node.labels)


def node_in_group(group: NodeGroup, node: Node) -> bool:
    """Terms are ORed; no nodeAffinity selects no node (KServe's CheckNodeAffinity): domain.selects."""
    return domain.selects(group.terms, node.name, node.labels)


def group_members(group: NodeGroup, nodes: Iterable[Node]) -> list[str]:
    return sorted(n.name for n in nodes if node_in_group(group, n))


# --- capacity -------------------------------------------------------------------------------------


def claim_of(cache: Cache) -> Claim:
    return Claim(
        ref=cache.ref,
        key=storage_key(cache.source_uri),
        size=cache.model_size,
        groups=cache.node_groups,
        created=cache.created,
        deleting=cache.deleting,
    )


def place(
    caches: Sequence[Cache], groups: Mapping[str, NodeGroup], policy: StoragePolicy = StoragePolicy.ENFORCE
) -> Placement:
    """domain.place over the caches: first come, first served, a storage key counted once."""
    limits = {n: g.storage_limit for n, g in groups.items()}
    return domain.place([claim_of(c) for c in caches], limits, policy)


def format_quantity(n: int) -> str:
    """Bytes as the shortest exact Kubernetes quantity (10Gi, 1700G, 123)."""
    if n == 0:
        return "0"
    for suffix, factor in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    for suffix, factor in (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    if n % 1024 == 0:
        return f"{n // 1024}Ki"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)
