"""Removal and garbage collection as plans of the store: decide over plain data, then execute.

As huggingface_hub's `DeleteCacheStrategy`: `plan_removal` and `plan_gc` are pure (models, pins,
leases, sizes, last use in; a `Plan` out), so every policy is testable without a disk and a dry run
is the same plan, printed. `Plan.execute(store)` is the only I/O, and the store re-checks its own
rules for each model (a model that became pinned or in use after planning is never removed), so
the local CLI, the gc CronJob, `cache clear` on a node and the agent can share one path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from modelcache.errors import ConflictError, IntegrityError, NotFoundError
from modelcache.safepath import printable
from modelcache.store.evict import Candidate, plan_eviction
from modelcache.uri import redact

if TYPE_CHECKING:
    from modelcache.store.core import Store

log = logging.getLogger("modelcache")

Kind = Literal["model", "partial", "damaged"]


@dataclass(frozen=True)
class Target:
    """What `rm` was asked to remove, as observed: plain data for `plan_removal`."""

    key: str
    kind: Kind
    size_bytes: int = 0
    uri: str = ""
    pinned: bool = False
    in_use: bool = False


@dataclass(frozen=True)
class Removal:
    key: str
    kind: Kind
    size_bytes: int
    uri: str = ""
    force: bool = False  # remove although pinned (rm --force)
    reason: str = ""  # gc: "older than 7d" / "lru"

    def describe(self) -> str:
        shown = printable(redact(self.uri), 1000) if self.uri else ""
        what = {"model": "", "partial": "partial download ", "damaged": "damaged "}[self.kind]
        return " ".join(x for x in (f"{what}{self.key}", shown) if x)


@dataclass(frozen=True)
class Refusal:
    key: str
    uri: str
    reason: str  # "pinned" | "in use"

    @property
    def message(self) -> str:
        shown = printable(redact(self.uri), 1000) if self.uri else self.key
        if self.reason == "pinned":
            return f"{shown} is pinned; unpin it or use --force"
        return f"{shown} is in use; stop its users first"


@dataclass(frozen=True)
class Outcome:
    removed: list[Removal] = field(default_factory=list)
    skipped: list[tuple[Removal, str]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(r.size_bytes for r in self.removed)


@dataclass(frozen=True)
class Plan:
    """Models to remove, the ones refused and why, and the sizes before/after (bytes)."""

    removals: list[Removal]
    refused: list[Refusal] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    total_before: int = 0
    target: int | None = None  # gc --max-size
    strict: bool = True  # rm: any conflict is an error; gc: skip what became protected

    @property
    def freed(self) -> int:
        return sum(r.size_bytes for r in self.removals)

    @property
    def total_after(self) -> int:
        return self.total_before - sum(r.size_bytes for r in self.removals if r.kind == "model")

    @property
    def satisfied(self) -> bool:
        return self.target is None or self.total_after <= self.target

    def check(self) -> None:
        """Raise the first refusal (exit 7): `rm` removes all it was asked to, or nothing."""
        if self.refused:
            raise ConflictError(self.refused[0].message)

    def execute(self, store: Store) -> Outcome:
        """Remove each planned model. The store re-checks pins and leases; a strict plan stops at
        the first conflict, a gc plan logs and skips (the model became in use since planning)."""
        self.check()
        out = Outcome()
        for r in self.removals:
            try:
                if r.kind == "partial":
                    store.remove_partial(r.key)
                else:
                    store.remove(r.key, force=r.force or r.kind == "damaged")
            except (ConflictError, NotFoundError) as exc:
                if self.strict:
                    raise
                log.warning("skipped %s: %s", r.key, exc)
                out.skipped.append((r, exc.message))
                continue
            out.removed.append(r)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "remove": [
                {
                    "key": r.key,
                    "kind": r.kind,
                    "size_bytes": r.size_bytes,
                    "uri": redact(r.uri),
                    "reason": r.reason,
                }
                for r in self.removals
            ],
            "refused": [{"key": r.key, "reason": r.reason} for r in self.refused],
            "protected": self.protected,
            "total_before": self.total_before,
            "total_after": self.total_after,
            "target": self.target,
            "satisfied": self.satisfied,
        }


def plan_removal(targets: Iterable[Target], *, force: bool = False) -> Plan:
    """`rm`: every target, unless one is pinned (without force) or in use: then a refusal."""
    removals: list[Removal] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for t in targets:
        if t.key in seen:
            continue
        seen.add(t.key)
        if t.kind == "model" and t.in_use:
            refused.append(Refusal(t.key, t.uri, "in use"))
        elif t.kind == "model" and t.pinned and not force:
            refused.append(Refusal(t.key, t.uri, "pinned"))
        else:
            removals.append(Removal(t.key, t.kind, t.size_bytes, t.uri, force=force))
    return Plan(removals=removals, refused=refused, strict=True)


def plan_gc(
    models: Iterable[Candidate],
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    now: float = 0.0,
) -> Plan:
    """`gc`: first every unprotected model unused for `older_than` seconds, then least recently
    used ones until the rest fits `max_size`. Pinned, in-use and referenced models never go; when
    they alone exceed `max_size` the plan is not `satisfied` rather than evicting anything else.
    """
    pool = list(models)
    removals: list[Removal] = []
    if older_than is not None:
        cutoff = now - older_than
        for m in sorted(pool, key=lambda m: (m.last_used_at, m.key)):
            if not m.protected and m.last_used_at < cutoff:
                removals.append(Removal(m.key, "model", m.size_bytes, m.uri, reason="unused"))
    if max_size is not None:
        gone = {r.key for r in removals}
        lru = plan_eviction([m for m in pool if m.key not in gone], max_size)
        by_key = {m.key: m for m in pool}
        removals += [
            Removal(k, "model", by_key[k].size_bytes, by_key[k].uri, reason="lru") for k in lru.evict
        ]
    return Plan(
        removals=removals,
        protected=sorted(m.key for m in pool if m.protected),
        total_before=sum(m.size_bytes for m in pool),
        target=max_size,
        strict=False,
    )


# -- observing (I/O) ------------------------------------------------------------------------------
def observe_targets(store: Store, refs: Iterable[str], *, force: bool = False) -> list[Target]:
    """What each ref names on disk: a model, an interrupted download, or damage (e.g. a symlink at
    models/<key>; only with force, else exit 4). Not cached at all is exit 3."""
    out: list[Target] = []
    for ref in refs:
        try:
            is_model = store.lookup(ref) is not None
        except IntegrityError:
            is_model = True
        key = store.key_for(ref)
        if not is_model and store.staging_dir(key).is_dir():
            out.append(Target(key, "partial", _partial_bytes(store, key)))
            continue
        try:
            rec = store.get(ref)
        except IntegrityError:
            if not force:
                raise
            out.append(Target(key, "damaged"))
            continue
        out.append(Target(rec.key, "model", rec.size_bytes, rec.uri, pinned=rec.pinned, in_use=rec.in_use))
    return out


def _partial_bytes(store: Store, key: str) -> int:
    from modelcache.transfer import read_staging_summary

    summary = read_staging_summary(store.staging_dir(key))
    return summary.done_bytes if summary else 0


def observe_candidates(store: Store) -> list[Candidate]:
    """Every complete model with its size, last use, pin and lease, after a repair."""
    store.repair()
    return store.candidates()
