"""The agent's decisions, as pure functions: admission, eviction, re-fetch, status, throttling."""

from __future__ import annotations

import random
from typing import Any

from modelcache.agent import plan as pl
from modelcache.api.types import LocalModelNodeSpec
from modelcache.uri import storage_key

MiB = 1 << 20
NOW = 1_000_000.0


def spec(*models: dict[str, Any]) -> LocalModelNodeSpec:
    return LocalModelNodeSpec.model_validate({"localModels": list(models)})


def m(name: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"modelName": name, "sourceModelUri": uri, **extra}


def disk(uri: str, size: int, used: float = 0.0, **kw: Any) -> tuple[str, pl.OnDisk]:
    k = storage_key(uri)
    return k, pl.OnDisk(k, uri, size, used, **kw)


def budget(limit: int | None = 10 * MiB, free: int = 1 << 40) -> pl.Budget:
    return pl.Budget(storage_limit=limit, fs_free=free, reserve=0)


def run(
    wanted: list[pl.Entry],
    on_disk: dict[str, pl.OnDisk] | None = None,
    sizes: dict[str, int] | None = None,
    *,
    active: set[str] | None = None,
    progress: dict[str, pl.Progress] | None = None,
    mounted: set[str] | None = None,
    b: pl.Budget | None = None,
    partials: dict[str, pl.Partial] | None = None,
    **kw: Any,
) -> pl.Plan:
    return pl.plan(
        wanted,
        on_disk or {},
        partials or {},
        sizes or {},
        active or set(),
        progress or {},
        mounted or set(),
        b or budget(),
        NOW,
        **kw,
    )


def test_entries_keys_and_group_filter() -> None:
    s = spec(
        m("a", "s3://b/a", nodeGroup="g1"),
        m("a", "s3://b/a", namespace="ns"),
        m("c", "s3://b/c", nodeGroup="g2"),
    )
    es = pl.entries(s, "g1")
    assert [e.status_key for e in es] == ["a", "ns/a"]
    assert es[0].key == storage_key("s3://b/a") == es[1].key
    assert es[0].pvc_name(None) == "a-g1" and es[1].pvc_name("g1") == "a-g1"
    assert len(pl.entries(s)) == 3 and pl.entries(None) == []


def test_shared_uri_is_one_download_and_unknown_size_is_probed_first() -> None:
    es = pl.entries(spec(m("a", "s3://b/x"), m("a", "s3://b/x", namespace="n")))
    p = run(es)
    assert p.probe == [storage_key("s3://b/x")] and p.download == []
    p = run(es, sizes={storage_key("s3://b/x"): MiB})
    assert p.download == [storage_key("s3://b/x")]


def test_concurrency_limit_keeps_the_rest_pending() -> None:
    es = pl.entries(spec(*(m(f"m{i}", f"s3://b/{i}") for i in range(4))))
    sizes = {e.key: MiB for e in es}
    p = run(es, sizes=sizes, max_concurrent=2)
    assert p.download == [es[0].key, es[1].key]
    p = run(es, sizes=sizes, active={es[0].key, es[1].key}, max_concurrent=2)
    assert p.download == [] and not p.no_space


def test_too_big_is_reported_and_nothing_is_evicted_for_it() -> None:
    wanted = pl.entries(spec(m("small", "s3://b/s"), m("huge", "s3://b/h")))
    k_old, old = disk("s3://b/old", 2 * MiB)
    k_s, small = disk("s3://b/s", 3 * MiB)
    p = run(wanted, {k_old: old, k_s: small}, {wanted[1].key: 20 * MiB})
    assert wanted[1].key in p.no_space and p.download == [] and p.evict == []
    msg = p.no_space[wanted[1].key]
    assert "20.0 MiB" in msg and "storageLimit of 10.0 MiB" in msg


def test_evicts_lru_unprotected_only_as_much_as_needed() -> None:
    wanted = pl.entries(spec(m("keep", "s3://b/keep"), m("new", "s3://b/new")))
    kk, keep = disk("s3://b/keep", 3 * MiB, used=50)
    k1, oldest = disk("s3://b/1", 2 * MiB, used=1)
    k2, older = disk("s3://b/2", 2 * MiB, used=2)
    k3, mounted = disk("s3://b/3", 2 * MiB, used=0)
    k4, pinned = disk("s3://b/4", 1 * MiB, used=0, pinned=True)
    on_disk = {kk: keep, k1: oldest, k2: older, k3: mounted, k4: pinned}  # 10 MiB: full
    p = run(wanted, on_disk, {wanted[1].key: 3 * MiB}, mounted={k3})
    assert p.download == [wanted[1].key]
    assert p.evict == [k1, k2]  # LRU first; the mounted, pinned and wanted ones stay
    assert p.committed <= 10 * MiB


def test_removed_entries_stay_until_space_is_needed_or_delete_at_once() -> None:
    k, old = disk("s3://b/old", 2 * MiB)
    assert run([], {k: old}).evict == []
    assert run([], {k: old}, delete_unreferenced=True).evict == [k]
    assert run([], {k: old}, mounted={k}, delete_unreferenced=True).evict == []


def test_high_watermark_evicts_down_to_low() -> None:
    items = dict(disk(f"s3://b/{i}", MiB, used=i) for i in range(10))  # 10 MiB of 10 MiB: above 95%
    p = run([], items)
    assert len(p.evict) == 2 and p.committed <= int(0.85 * 10 * MiB)


def test_filesystem_free_space_and_reserve_cap_the_budget() -> None:
    wanted = pl.entries(spec(m("a", "s3://b/a")))
    b = pl.Budget(storage_limit=None, fs_free=5 * MiB, reserve=2 * MiB)
    p = run(wanted, sizes={wanted[0].key: 4 * MiB}, b=b)
    assert wanted[0].key in p.no_space and "kept in reserve" in p.no_space[wanted[0].key]
    b = pl.Budget(storage_limit=None, fs_free=7 * MiB, reserve=2 * MiB)
    assert run(wanted, sizes={wanted[0].key: 4 * MiB}, b=b).download == [wanted[0].key]


def test_partial_download_needs_only_the_rest() -> None:
    wanted = pl.entries(spec(m("a", "s3://b/a")))
    k = wanted[0].key
    partial = {k: pl.Partial(k, "s3://b/a", 6 * MiB)}
    b = pl.Budget(storage_limit=None, fs_free=5 * MiB, reserve=0)  # 6 staged + 5 free = 11
    assert run(wanted, sizes={k: 10 * MiB}, partials=partial, b=b).download == [k]


def test_broken_models_refetch_and_abandoned_staging_is_cleaned() -> None:
    wanted = pl.entries(spec(m("a", "s3://b/a")))
    k, broken = disk("s3://b/a", MiB, healthy=False)
    ko, other = disk("s3://b/o", MiB, healthy=False)
    parts = {
        "f" * 16: pl.Partial("f" * 16, "s3://b/gone", 10),
        "e" * 16: pl.Partial("e" * 16, "x", 1, held=True),
    }
    p = run(wanted, {k: broken, ko: other}, {k: MiB}, partials=parts)
    assert p.refetch == [k] and p.evict == [ko]
    assert p.clean_staging == ["f" * 16]  # the one held by another process is left alone


def test_backoff_defers_and_sets_wake_time() -> None:
    wanted = pl.entries(spec(m("a", "s3://b/a")))
    k = wanted[0].key
    prog = {k: pl.Progress(phase="error", attempts=2, last_error="x", retry_at=NOW + 30)}
    p = run(wanted, sizes={k: MiB}, progress=prog)
    assert p.download == [] and p.wake_at == NOW + 30
    prog[k].retry_at = NOW - 1
    assert run(wanted, sizes={k: MiB}, progress=prog).download == [k]


def test_no_space_clears_when_it_fits() -> None:
    wanted = pl.entries(spec(m("a", "s3://b/a")))
    k = wanted[0].key
    prog = {k: pl.Progress(phase="error", last_error="too big", no_space=True, retry_at=NOW + 99)}
    p = run(wanted, sizes={k: MiB}, progress=prog)
    assert p.download == [k] and p.fits == [k]


def test_mounted_keys_from_pvc_names_and_subpaths() -> None:
    pods = [
        {"spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "llm-workers"}}]}},
        {
            "spec": {
                "containers": [
                    {"name": "c", "volumeMounts": [{"name": "v", "subPath": "models/0123456789abcdef/x"}]}
                ]
            }
        },
        {
            "status": {"phase": "Succeeded"},
            "spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "done-workers"}}]},
        },
    ]
    got = pl.mounted_keys(pods, {"llm-workers": "a" * 16, "done-workers": "b" * 16})
    assert got == {"a" * 16, "0123456789abcdef"}


def test_status_phases_and_fields() -> None:
    wanted = pl.entries(
        spec(
            m("done", "s3://b/d"),
            m("dl", "s3://b/l", namespace="ns"),
            m("bad", "s3://b/x"),
            m("new", "s3://b/n"),
        )
    )
    kd, d = disk("s3://b/d", 5)
    progress = {
        wanted[1].key: pl.Progress(
            phase="downloading", bytes_done=3, bytes_total=9, attempts=1, started_at=NOW
        ),
        wanted[2].key: pl.Progress(phase="error", attempts=3, last_error="HTTP 503"),
    }
    phases, details = pl.desired_status(wanted, {kd: d}, {wanted[1].key}, progress)
    assert phases == {
        "done": "ModelDownloaded",
        "ns/dl": "ModelDownloading",
        "bad": "ModelDownloadError",
        "new": "ModelDownloadPending",
    }
    assert details["done"] == {"bytesDone": 5, "bytesTotal": 5, "storageKey": kd}
    assert details["ns/dl"]["bytesDone"] == 3 and details["ns/dl"]["startedAt"].endswith("Z")
    assert details["bad"]["lastError"] == "HTTP 503" and details["bad"]["attempts"] == 3


def test_status_patch_throttles_bytes_but_not_phases() -> None:
    observed = {
        "modelStatus": {"a": "ModelDownloading", "gone": "ModelDownloaded"},
        "models": {"a": {"bytesDone": 1, "storageKey": "k"}, "gone": {"storageKey": "g"}},
    }
    phases = {"a": "ModelDownloading"}
    moved = {"a": {"bytesDone": 5, "storageKey": "k"}}
    # Entry removal is a real change: written at once, with nulls.
    patch = pl.status_patch(observed, phases, moved, progress_due=False)
    assert patch == {
        "status": {
            "modelStatus": {"gone": None},
            "models": {"a": {"bytesDone": 5, "storageKey": "k"}, "gone": None},
        }
    }
    observed = {"modelStatus": dict(phases), "models": {"a": {"bytesDone": 1, "storageKey": "k"}}}
    assert pl.status_patch(observed, phases, moved, progress_due=False) is None
    assert pl.status_patch(observed, phases, moved, progress_due=True) is not None
    done = {"a": {"bytesDone": 5, "bytesTotal": 5, "storageKey": "k"}}
    patch = pl.status_patch(
        {"modelStatus": dict(phases), "models": {"a": {"lastError": "x", "storageKey": "k"}}},
        {"a": "ModelDownloaded"},
        done,
        progress_due=False,
    )
    assert patch is not None
    assert patch["status"]["models"]["a"]["lastError"] is None  # cleared, not left behind
    assert (
        pl.status_patch(
            {"modelStatus": {"a": "ModelDownloaded"}, "models": done},
            {"a": "ModelDownloaded"},
            done,
            progress_due=True,
        )
        is None
    )


def test_retry_delay_grows_and_is_capped() -> None:
    rng = random.Random(1)
    d1, d4, d20 = (pl.retry_delay(n, 10, 600, rng) for n in (1, 4, 20))
    assert 5 <= d1 <= 10 and 40 <= d4 <= 80 and 300 <= d20 <= 600


def test_scrub_removes_secret_values() -> None:
    assert pl.scrub("auth tok-123456 failed", {"tok-123456", "ab"}) == "auth *** failed"


def test_next_full_verify_picks_oldest_overdue_wanted() -> None:
    a, da = disk("s3://b/a", 1)
    b, db = disk("s3://b/b", 1)
    c, dc = disk("s3://b/c", 1)
    healthy = {a: da, b: db, c: dc}
    verified = {a: NOW - 50, b: NOW - 100, c: NOW - 500}
    assert pl.next_full_verify(healthy, {a, b}, verified, set(), NOW, 40) == b  # c is not wanted
    assert pl.next_full_verify(healthy, {a, b}, verified, {b}, NOW, 40) == a
    assert pl.next_full_verify(healthy, {a, b}, verified, set(), NOW, 1000) is None


def test_spec_changed_ignores_status_only_events() -> None:
    a = {"metadata": {"uid": "u", "generation": 1}, "spec": {"localModels": []}}
    assert not pl.spec_changed(a, {**a, "status": {"modelStatus": {"x": "ModelDownloaded"}}})
    assert pl.spec_changed(a, {"metadata": {"uid": "u", "generation": 2}, "spec": {"localModels": [1]}})
    assert pl.spec_changed(None, a) and pl.spec_changed(a, None) and not pl.spec_changed(None, None)


def test_status_patch_leaves_other_groups_entries_alone() -> None:
    observed = {
        "modelStatus": {
            "mine": "ModelDownloading",
            "theirs": "ModelDownloaded",
            "removed": "ModelDownloaded",
        },
        "models": {"theirs": {"storageKey": "t"}},
    }
    patch = pl.status_patch(
        observed,
        {"mine": "ModelDownloaded"},
        {"mine": {"storageKey": "m"}},
        progress_due=False,
        others={"theirs"},
    )
    assert patch == {
        "status": {
            "modelStatus": {"mine": "ModelDownloaded", "removed": None},
            "models": {"mine": {"storageKey": "m"}},
        }
    }
