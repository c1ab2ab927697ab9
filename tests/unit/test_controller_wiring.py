"""The controller's kopf wiring: what it asks the API server to filter, and how pods become users."""

from __future__ import annotations

import kopf

from modelcache.controller import handlers
from modelcache.controller import reconcile as r


def test_pods_are_watched_by_label_server_side() -> None:
    settings = kopf.OperatorSettings()
    handlers.configure_selectors(settings)
    pods = kopf.Resource("", "v1", "pods", namespaced=True)
    nodes = kopf.Resource("", "v1", "nodes", namespaced=False)
    assert settings.watching.label_selectors.collect(pods) == ["modelcache.io/uses-cache=true"]
    assert settings.watching.label_selectors.collect(nodes) == []


def test_a_pod_watched_and_swept_counts_once() -> None:
    pod = r.Service(kind="Pod", namespace="web", name="p", cache="llama")
    snapshot: dict[str, list[object]] = {"pods_idx": [pod, pod], "ns_caches_idx": []}
    assert handlers.services(snapshot) == [pod]


def test_plan_becomes_typed_actions_finalizers_first() -> None:
    from modelcache.controller import actions as a

    plan = r.Plan()
    plan.cache_status.append((("", "llama"), {"copies": {}}))
    plan.finalizers.append(r.FinalizerPatch(("", "llama"), "7", ("f",)))
    plan.daemonset_deletes.append("old-agent")
    plan.job_deletes.append(("jobs", "llama-n1"))
    plan.lmn_status["n1"] = {"llama": "ModelDownloadPending"}
    steps = plan.actions("kserve")
    assert len(steps) == len(plan)
    assert steps[0].phase == 0 and isinstance(steps[0].action, r.FinalizerPatch)
    assert all(s.phase == 1 for s in steps[1:])
    by_key = {s.key: s.action for s in steps}
    assert by_key[("cache-status", "", "llama")] == a.MergePatch(
        a.Target("LocalModelCache", "llama", "", "status"), {"status": {"copies": {}}}
    )
    assert by_key[("daemonset-delete", "old-agent")] == a.Delete(a.Target("DaemonSet", "old-agent", "kserve"))
    assert by_key[("job-delete", "jobs", "llama-n1")] == a.Delete(a.Target("Job", "llama-n1", "jobs"), True)
    assert by_key[("lmn-status", "n1")] == a.MergePatch(
        a.Target("LocalModelNode", "n1", "", "status"),
        {"status": {"modelStatus": {"llama": "ModelDownloadPending"}}},
    )
