"""Removal and gc plans: pure decisions over plain data (no disk)."""

from __future__ import annotations

import pytest

from modelcache.duration import parse_duration
from modelcache.errors import ConflictError, UsageError
from modelcache.store.evict import Candidate
from modelcache.store.plans import Target, plan_gc, plan_removal

DAY = 86400.0
NOW = 100 * DAY


def c(key: str, size: int, days_ago: float, **kw: bool) -> Candidate:
    return Candidate(key, size, NOW - days_ago * DAY, uri=f"s3://b/{key}", **kw)


def test_older_than_removes_only_unprotected_stale_models() -> None:
    models = [
        c("old", 10, 30),
        c("oldpinned", 10, 30, pinned=True),
        c("oldbusy", 10, 30, in_use=True),
        c("oldwanted", 10, 30, referenced=True),
        c("fresh", 10, 1),
    ]
    plan = plan_gc(models, older_than=7 * DAY, now=NOW)
    assert [r.key for r in plan.removals] == ["old"]
    assert plan.protected == ["oldbusy", "oldpinned", "oldwanted"]
    assert plan.total_before == 50 and plan.total_after == 40 and plan.satisfied


def test_older_than_combines_with_max_size_lru_after_stale() -> None:
    models = [c("a", 10, 30), c("b", 10, 3), c("d", 10, 2), c("e", 10, 1)]
    plan = plan_gc(models, older_than=7 * DAY, max_size=15, now=NOW)
    assert [(r.key, r.reason) for r in plan.removals] == [("a", "unused"), ("b", "lru"), ("d", "lru")]
    assert plan.total_after == 10 and plan.satisfied


def test_max_size_unsatisfiable_when_protected_models_exceed_it() -> None:
    plan = plan_gc([c("p", 100, 9, pinned=True), c("x", 5, 9)], max_size=50, now=NOW)
    assert [r.key for r in plan.removals] == ["x"]
    assert not plan.satisfied


def test_removal_refuses_pinned_without_force_and_in_use_always() -> None:
    pinned = Target("k1", "model", 5, "s3://b/k1", pinned=True)
    busy = Target("k2", "model", 5, "s3://b/k2", in_use=True)
    partial = Target("k3", "partial", 3)
    plan = plan_removal([pinned, partial])
    assert [r.reason for r in plan.refused] == ["pinned"]
    with pytest.raises(ConflictError, match="pinned"):
        plan.check()
    forced = plan_removal([pinned, partial, pinned], force=True)
    assert [r.key for r in forced.removals] == ["k1", "k3"] and forced.freed == 8
    with pytest.raises(ConflictError, match="in use"):
        plan_removal([busy], force=True).check()


def test_durations() -> None:
    assert parse_duration("7d") == 7 * DAY
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    for bad in ("", "7x", "d", "-1", "1d2", "nan"):
        with pytest.raises(UsageError):
            parse_duration(bad)
