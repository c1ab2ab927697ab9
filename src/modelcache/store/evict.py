"""Eviction as a pure plan over plain data, so LRU policy is testable without a disk."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    key: str
    size_bytes: int
    last_used_at: float
    pinned: bool = False
    in_use: bool = False
    referenced: bool = False  # wanted by a LocalModelNode (agent) — never evicted
    uri: str = ""  # redacted, for display only

    @property
    def protected(self) -> bool:
        return self.pinned or self.in_use or self.referenced


@dataclass(frozen=True)
class EvictionPlan:
    evict: list[str]
    protected: list[str] = field(default_factory=list)
    total_before: int = 0
    total_after: int = 0
    target: int = 0

    @property
    def satisfied(self) -> bool:
        return self.total_after <= self.target

    @property
    def freed(self) -> int:
        return self.total_before - self.total_after


def plan_eviction(models: list[Candidate], target_bytes: int) -> EvictionPlan:
    """Evict least-recently-used unprotected models until the total fits `target_bytes`.

    Pinned, in-use and referenced models are never chosen; if they alone exceed the target the
    plan says so (`satisfied` is False) instead of evicting anything else it cannot justify.
    """
    total = sum(m.size_bytes for m in models)
    protected = [m.key for m in models if m.protected]
    evict: list[str] = []
    if total > target_bytes:
        for m in sorted(models, key=lambda m: (m.last_used_at, m.key)):
            if total <= target_bytes:
                break
            if m.protected:
                continue
            evict.append(m.key)
            total -= m.size_bytes
    return EvictionPlan(
        evict=evict,
        protected=protected,
        total_before=sum(m.size_bytes for m in models),
        total_after=total,
        target=target_bytes,
    )
