"""The controller's decisions, without a server: observed state in, plan out."""

from __future__ import annotations

from typing import Any

import pytest

from modelcache.controller import reconcile as r
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import CACHE_FINALIZER, NAMESPACE_CACHE_FINALIZER, ready_label
from modelcache.uri import storage_key

NOW = "2026-01-01T00:00:00Z"
URI = "hf://meta-llama/meta-llama-3-8b-instruct"


def node(name: str, ready: bool = True, **labels: str) -> r.Node:
    return r.Node(name=name, labels={"kubernetes.io/hostname": name, **labels}, ready=ready)


def group_obj(
    name: str = "workers", limit: str = "1.7T", terms: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    terms = terms or [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {
            "storageLimit": limit,
            "persistentVolumeClaimSpec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1700G"}},
            },
            "persistentVolumeSpec": {
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "1700G"},
                "local": {"path": "/models"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": terms}},
            },
        },
    }


def group(
    name: str = "workers", limit: str = "1.7T", terms: list[dict[str, Any]] | None = None
) -> r.NodeGroup:
    return r.group_from(group_obj(name, limit, terms))


def cache(
    name: str = "llama",
    groups: tuple[str, ...] = ("workers",),
    size: str = "10Gi",
    namespace: str = "",
    created: str = "2026-01-01T00:00:00Z",
    finalized: bool = True,
    deleting: bool = False,
    status: dict[str, Any] | None = None,
    uri: str = URI,
) -> r.Cache:
    finalizer = NAMESPACE_CACHE_FINALIZER if namespace else CACHE_FINALIZER
    return r.cache_from(
        {
            "kind": "LocalModelNamespaceCache" if namespace else "LocalModelCache",
            "metadata": {
                "name": name,
                "namespace": namespace or None,
                "uid": f"uid-{name}",
                "resourceVersion": "7",
                "creationTimestamp": created,
                "generation": 1,
                "finalizers": [finalizer] if finalized else [],
                "deletionTimestamp": "2026-01-02T00:00:00Z" if deleting else None,
            },
            "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": list(groups)},
            "status": status or {},
        }
    )


def lmn(name: str, entries: list[r.Entry], status: dict[str, str] | None = None) -> r.ModelNode:
    return r.ModelNode(name=name, entries=tuple(entries), model_status=status or {})


def observed(**kw: Any) -> r.Observed:
    base: dict[str, Any] = {
        "namespace": "kserve",
        "config": LocalModelConfig(),
        "nodes": {},
        "groups": {},
        "caches": [],
        "model_nodes": {},
        "services": [],
        "volumes": [],
        "daemonsets": {},
    }
    base.update(kw)
    if isinstance(base["nodes"], list):
        base["nodes"] = {n.name: n for n in base["nodes"]}
    if isinstance(base["groups"], list):
        base["groups"] = {g.name: g for g in base["groups"]}
    if isinstance(base["model_nodes"], list):
        base["model_nodes"] = {m.name: m for m in base["model_nodes"]}
    return r.Observed(**base)


# --- node affinity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "values", "label", "expected"),
    [
        ("In", ["a", "b"], "a", True),
        ("In", ["a"], "c", False),
        ("In", ["a"], None, False),
        ("NotIn", ["a"], "b", True),
        ("NotIn", ["a"], None, True),
        ("NotIn", ["a"], "a", False),
        ("Exists", [], "x", True),
        ("Exists", [], None, False),
        ("DoesNotExist", [], None, True),
        ("DoesNotExist", [], "x", False),
        ("Gt", ["3"], "4", True),
        ("Gt", ["3"], "3", False),
        ("Gt", ["3"], "abc", False),
        ("Gt", ["3"], None, False),
        ("Lt", ["3"], "2", True),
        ("Lt", ["3", "4"], "2", False),
        ("Bogus", ["a"], "a", False),
    ],
)
def test_requirement_operators(op: str, values: list[str], label: str | None, expected: bool) -> None:
    assert r.requirement_matches(r.Requirement("k", op, tuple(values)), label) is expected


def test_terms_are_ored_and_expressions_anded() -> None:
    g = group(
        terms=[
            {
                "matchExpressions": [
                    {"key": "gpu", "operator": "In", "values": ["a100"]},
                    {"key": "zone", "operator": "Exists"},
                ]
            },
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
        ]
    )
    assert r.node_in_group(g, node("n1", gpu="a100", zone="z"))
    assert not r.node_in_group(g, node("n2", gpu="a100"))
    assert r.node_in_group(g, node("special"))
    assert not r.node_in_group(g, node("other"))


def test_empty_term_and_missing_affinity_select_nothing() -> None:
    assert not r.node_in_group(group(terms=[{}]), node("n1"))
    no_affinity = r.group_from(
        {"metadata": {"name": "g"}, "spec": {"storageLimit": "1Gi", "persistentVolumeSpec": {}}}
    )
    assert not r.node_in_group(no_affinity, node("n1", gpu="a100"))


def test_match_fields_only_metadata_name() -> None:
    g = group(terms=[{"matchFields": [{"key": "spec.unschedulable", "operator": "In", "values": ["false"]}]}])
    assert not r.node_in_group(g, node("n1"))


# --- LocalModelNode entries ---------------------------------------------------------------------


def test_seed_walkthrough_plan() -> None:
    """Group + cache -> LMN for member nodes only, KServe fields, PV/PVC names, DaemonSet, finalizer."""
    obs = observed(
        nodes=[node("n1", gpu="a100"), node("n2", gpu="a100"), node("cpu1")],
        groups=[group()],
        caches=[cache(finalized=False)],
    )
    plan = r.plan(obs, NOW)
    assert [fp.finalizers for fp in plan.finalizers] == [(CACHE_FINALIZER,)]
    assert sorted(b["metadata"]["name"] for b in plan.lmn_creates) == ["n1", "n2"]
    entry = plan.lmn_creates[0]["spec"]["localModels"]
    assert entry == [{"modelName": "llama", "sourceModelUri": URI, "nodeGroup": "workers"}]
    names = {
        (b["kind"], b["metadata"].get("namespace", ""), b["metadata"]["name"]) for _, b in plan.volume_creates
    }
    assert names == {
        ("PersistentVolume", "", "llama-workers-download"),
        ("PersistentVolumeClaim", "kserve-localmodel-jobs", "llama-workers"),
    }
    pvc = next(b for _, b in plan.volume_creates if b["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["volumeName"] == "llama-workers-download"
    (ds,) = plan.daemonset_applies
    assert ds["metadata"]["name"] == "workers-agent" and ds["metadata"]["namespace"] == "kserve"
    pod = ds["spec"]["template"]["spec"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/models"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/models"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["MODELCACHE_HOME"]["value"] == "/models" and env["NODE_GROUP"]["value"] == "workers"
    assert pod["containers"][0]["args"] == ["agent", "--namespace", "kserve"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms[0]["matchExpressions"][0]["values"] == ["a100"]
    ((ref, status),) = plan.cache_status
    assert ref == ("", "llama")
    assert status["nodeStatus"] == {"n1": "NodeDownloadPending", "n2": "NodeDownloadPending"}
    assert status["copies"] == {"total": 2, "available": 0, "failed": 0}
    ((gname, gstatus),) = plan.group_status
    assert gname == "workers" and gstatus["used"] == "10Gi" and gstatus["nodes"] == ["n1", "n2"]


def test_converged_plan_is_empty() -> None:
    """Apply a plan's results as observations: the next plan writes nothing (idempotent)."""
    nodes = [node("n1", gpu="a100")]
    c = cache()
    first = r.plan(observed(nodes=nodes, groups=[group()], caches=[c]), NOW)
    entries = [r.entry_from(e) for e in first.lmn_creates[0]["spec"]["localModels"]]
    status = dict(first.cache_status[0][1])
    g = r.group_from({**group_obj(), "status": first.group_status[0][1]})
    c2 = cache(status=status)
    ds_hash = first.daemonset_applies[0]["metadata"]["annotations"][r.SPEC_HASH_ANNOTATION]
    volumes = [r.volume_from(b) for _, b in first.volume_creates]
    again = r.plan(
        observed(
            nodes=nodes,
            groups=[g],
            caches=[c2],
            model_nodes=[lmn("n1", entries)],
            volumes=[v for v in volumes if v],
            daemonsets={"workers-agent": ds_hash},
        ),
        "2026-01-01T00:05:00Z",
    )
    assert len(again) == 0, again


def test_statuses_mapped_as_kserve() -> None:
    c = cache()
    e = c.entry("workers")
    nodes = [node(f"n{i}", gpu="a100") for i in range(5)] + [node("down", ready=False, gpu="a100")]
    mns = [
        lmn("n0", [e], {"llama": "ModelDownloaded"}),
        lmn("n1", [e], {"llama": "ModelDownloading"}),
        lmn("n2", [e], {"llama": "ModelDownloadError"}),
        lmn("n3", [e], {"llama": "ModelDownloadPending"}),
        lmn("n4", [e], {}),
        lmn("down", [e], {"llama": "ModelDownloaded"}),
    ]
    plan = r.plan(observed(nodes=nodes, groups=[group()], caches=[c], model_nodes=mns), NOW)
    status = plan.cache_status[0][1]
    assert status["nodeStatus"] == {
        "n0": "NodeDownloaded",
        "n1": "NodeDownloading",
        "n2": "NodeDownloadError",
        "n3": "NodeDownloadPending",
        "n4": "NodeDownloadPending",
        "down": "NodeNotReady",
    }
    assert status["copies"] == {"total": 6, "available": 1, "failed": 1}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    (changed,) = [ev for ev in plan.events if ev.reason == "NodeStatusChanged"]
    assert changed.type == "Warning"
    assert "NodeNotReady on 1 node(s): down" in changed.message


def test_ready_when_all_copies_available_and_labels_set() -> None:
    c = cache()
    e = c.entry("workers")
    nodes = [node("n1", gpu="a100"), node("n2", gpu="a100")]
    mns = [lmn(n.name, [e], {"llama": "ModelDownloaded"}) for n in nodes]
    plan = r.plan(observed(nodes=nodes, groups=[group()], caches=[c], model_nodes=mns), NOW)
    status = plan.cache_status[0][1]
    assert status["copies"] == {"total": 2, "available": 2, "failed": 0}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    label = ready_label(storage_key(URI))
    assert plan.node_labels == {"n1": {label: "ready"}, "n2": {label: "ready"}}


def test_ready_label_removed_when_model_not_downloaded_or_cache_gone() -> None:
    label = ready_label(storage_key(URI))
    stale = ready_label("0123456789abcdef")
    c = cache()
    nodes = [node("n1", gpu="a100", **{label: "ready", stale: "ready"})]
    mns = [lmn("n1", [c.entry("workers")], {"llama": "ModelDownloading"})]
    plan = r.plan(observed(nodes=nodes, groups=[group()], caches=[c], model_nodes=mns), NOW)
    assert plan.node_labels == {"n1": {label: None, stale: None}}


def test_node_leaves_lmn_deleted_and_status_pruned() -> None:
    c = cache(status={"nodeStatus": {"n1": "NodeDownloaded", "gone": "NodeDownloaded"}})
    e = c.entry("workers")
    mns = [lmn("n1", [e], {"llama": "ModelDownloaded"}), lmn("gone", [e], {"llama": "ModelDownloaded"})]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c], model_nodes=mns), NOW
    )
    assert plan.lmn_deletes == ["gone"]
    status = plan.cache_status[0][1]
    assert status["nodeStatus"] == {"gone": None}  # merge patch deletes the key
    assert status["copies"] == {"total": 1, "available": 1, "failed": 0}


def test_node_no_longer_member_gets_empty_entries_not_deleted() -> None:
    c = cache()
    mns = [lmn("n1", [c.entry("workers")])]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="h100")], groups=[group()], caches=[c], model_nodes=mns), NOW
    )
    assert plan.lmn_updates == {"n1": []}
    assert plan.lmn_deletes == []


def test_group_removed_from_cache_removes_entries() -> None:
    c = cache(groups=("other",))
    g_other = group(
        "other", terms=[{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]}]
    )
    mns = [lmn("n1", [cache().entry("workers")])]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group(), g_other], caches=[c], model_nodes=mns), NOW
    )
    assert plan.lmn_updates == {"n1": []}


def test_existing_order_kept_new_entries_appended() -> None:
    a, b, z = cache("a"), cache("b"), cache("z")
    mns = [lmn("n1", [z.entry("workers"), a.entry("workers")])]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[a, b, z], model_nodes=mns), NOW
    )
    assert [e["modelName"] for e in plan.lmn_updates["n1"]] == ["z", "a", "b"]


def test_namespace_cache_entry_status_key_and_volumes() -> None:
    c = cache("llama", namespace="team")
    isvc = r.Service("InferenceService", "team", "svc", "llama", cache_namespace="team")
    e = c.entry("workers")
    mns = [lmn("n1", [e], {"team/llama": "ModelDownloaded"})]
    obs = observed(
        nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c], model_nodes=mns, services=[isvc]
    )
    plan = r.plan(obs, NOW)
    assert e.to_wire()["namespace"] == "team"
    assert plan.cache_status[0][1]["nodeStatus"] == {"n1": "NodeDownloaded"}
    names = {
        (b["kind"], b["metadata"].get("namespace", ""), b["metadata"]["name"]) for _, b in plan.volume_creates
    }
    assert names == {
        ("PersistentVolume", "", "llama-workers-team-download"),
        ("PersistentVolumeClaim", "kserve-localmodel-jobs", "llama-workers-team-download"),
        ("PersistentVolume", "", "llama-workers-team"),
        ("PersistentVolumeClaim", "team", "llama-workers"),
    }
    assert plan.cache_status[0][1]["inferenceServices"] == [{"name": "svc", "namespace": "team"}]


# --- services and serving volumes ---------------------------------------------------------------


def test_isvc_listed_and_serving_volumes_per_namespace() -> None:
    c = cache()
    services = [
        r.Service("InferenceService", "ns1", "a", "llama"),
        r.Service("InferenceService", "ns1", "b", "llama"),
        r.Service("LLMInferenceService", "ns2", "l", "llama"),
        r.Service("InferenceService", "ns3", "other", "not-this-cache"),
    ]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c], services=services), NOW
    )
    status = plan.cache_status[0][1]
    assert status["inferenceServices"] == [
        {"name": "a", "namespace": "ns1"},
        {"name": "b", "namespace": "ns1"},
    ]
    assert status["llmInferenceServices"] == [{"name": "l", "namespace": "ns2"}]
    serving = {
        (b["kind"], b["metadata"].get("namespace", ""), b["metadata"]["name"])
        for _, b in plan.volume_creates
        if b["metadata"]["labels"][r.VOLUME_ROLE_LABEL] == "serving"
    }
    assert serving == {
        ("PersistentVolume", "", "llama-workers-ns1"),
        ("PersistentVolumeClaim", "ns1", "llama-workers"),
        ("PersistentVolume", "", "llama-workers-ns2"),
        ("PersistentVolumeClaim", "ns2", "llama-workers"),
    }


def test_annotated_plain_pod_gets_serving_volumes_but_is_not_listed() -> None:
    pod = r.pod_service_from(
        {
            "kind": "Pod",
            "metadata": {
                "name": "vllm-0",
                "namespace": "team-a",
                "annotations": {"modelcache.io/model": "llama"},
            },
        }
    )
    assert pod is not None and pod.kind == "Pod"
    done = {
        "kind": "Pod",
        "metadata": {"name": "job", "namespace": "x", "annotations": {"modelcache.io/model": "llama"}},
        "status": {"phase": "Succeeded"},
    }
    assert r.pod_service_from(done) is None
    assert r.pod_service_from({"kind": "Pod", "metadata": {"name": "p", "namespace": "x"}}) is None
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[cache()], services=[pod]), NOW
    )
    status = plan.cache_status[0][1]
    assert not status.get("inferenceServices")
    serving = {
        (b["kind"], b["metadata"].get("namespace", ""), b["metadata"]["name"])
        for _, b in plan.volume_creates
        if b["metadata"]["labels"][r.VOLUME_ROLE_LABEL] == "serving"
    }
    assert serving == {
        ("PersistentVolume", "", "llama-workers-team-a"),
        ("PersistentVolumeClaim", "team-a", "llama-workers"),
    }


def test_serving_volumes_removed_when_isvc_goes_unless_disabled() -> None:
    c = cache()
    ours = [
        r.Volume("PersistentVolume", "", "llama-workers-download", "download", "llama"),
        r.Volume("PersistentVolumeClaim", "kserve-localmodel-jobs", "llama-workers", "download", "llama"),
        r.Volume("PersistentVolume", "", "llama-workers-ns1", "serving", "llama"),
        r.Volume("PersistentVolumeClaim", "ns1", "llama-workers", "serving", "llama"),
    ]
    base = {"nodes": [node("n1", gpu="a100")], "groups": [group()], "caches": [c], "volumes": ours}
    plan = r.plan(observed(**base), NOW)
    assert {v.key for v in plan.volume_deletes} == {
        ("PersistentVolume", "", "llama-workers-ns1"),
        ("PersistentVolumeClaim", "ns1", "llama-workers"),
    }
    disabled = LocalModelConfig(disableVolumeManagement=True)
    assert r.plan(observed(config=disabled, **base), NOW).volume_deletes == []


def test_isvc_nodegroup_annotation_picks_group() -> None:
    g2 = group("fast", terms=[{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["nvme"]}]}])
    c = cache(groups=("workers", "fast"))
    services = [
        r.Service("InferenceService", "ns1", "a", "llama", node_group="fast"),
        r.Service("InferenceService", "ns2", "b", "llama", node_group="unknown"),
    ]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group(), g2], caches=[c], services=services), NOW
    )
    serving = {b["metadata"]["name"] for _, b in plan.volume_creates if b["kind"] == "PersistentVolume"}
    assert "llama-fast-ns1" in serving
    assert not any(name.endswith("-ns2") for name in serving)


# --- capacity -----------------------------------------------------------------------------------


def test_capacity_first_come_first_served() -> None:
    g = group(limit="15Gi")
    first = cache("first", size="10Gi", created="2026-01-01T00:00:00Z")
    second = cache("second", size="10Gi", created="2026-01-01T00:00:01Z", uri=URI + "-other")
    plan = r.plan(observed(nodes=[node("n1", gpu="a100")], groups=[g], caches=[second, first]), NOW)
    entries = plan.lmn_creates[0]["spec"]["localModels"]
    assert [e["modelName"] for e in entries] == ["first"]
    status = dict(plan.cache_status)
    scheduled = next(c for c in status[("", "second")]["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == r.REASON_STORAGE_LIMIT
    assert "workers" in scheduled["message"]
    assert ("", "second") not in {ref for ref, _ in plan.cache_status if "nodeStatus" in _}
    assert any(ev.reason == r.REASON_STORAGE_LIMIT and ev.type == "Warning" for ev in plan.events)
    assert dict(plan.group_status)["workers"]["used"] == "10Gi"
    assert dict(plan.group_status)["workers"]["available"] == "5Gi"
    # second's volumes are not created either
    assert all("second" not in b["metadata"]["name"] for _, b in plan.volume_creates)


def test_deleting_cache_frees_room() -> None:
    g = group(limit="15Gi")
    first = cache("first", size="10Gi", created="2026-01-01T00:00:00Z", deleting=True)
    second = cache("second", size="10Gi", created="2026-01-01T00:00:01Z")
    plan = r.plan(observed(nodes=[node("n1", gpu="a100")], groups=[g], caches=[first, second]), NOW)
    assert [e["modelName"] for e in plan.lmn_creates[0]["spec"]["localModels"]] == ["second"]


def test_missing_group_is_a_condition_not_an_error() -> None:
    c = cache(groups=("workers", "gone"))
    plan = r.plan(observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c]), NOW)
    assert plan.lmn_creates
    scheduled = next(x for x in plan.cache_status[0][1]["conditions"] if x["type"] == "Scheduled")
    assert scheduled["reason"] == r.REASON_GROUP_MISSING


# --- finalizers ---------------------------------------------------------------------------------


def test_deletion_with_missing_group_removes_entries_then_finalizer() -> None:
    c = cache(groups=("gone",), deleting=True)
    mns = [lmn("n1", [c.entry("gone")])]
    plan = r.plan(observed(nodes=[node("n1")], groups=[], caches=[c], model_nodes=mns), NOW)
    assert plan.lmn_updates == {"n1": []}
    assert plan.finalizers == []  # an LMN still holds it
    plan = r.plan(observed(nodes=[node("n1")], groups=[], caches=[c], model_nodes=[lmn("n1", [])]), NOW)
    assert [fp.finalizers for fp in plan.finalizers] == [()]


def test_deletion_with_node_gone() -> None:
    c = cache(deleting=True)
    plan = r.plan(
        observed(nodes=[], groups=[group()], caches=[c], model_nodes=[lmn("gone", [c.entry("workers")])]), NOW
    )
    assert plan.lmn_deletes == ["gone"]
    assert plan.cache_status == []


def test_finalizer_patch_keeps_others() -> None:
    c = r.cache_from(
        {
            "kind": "LocalModelCache",
            "metadata": {"name": "x", "finalizers": ["other/f"], "resourceVersion": "3"},
            "spec": {"sourceModelUri": URI, "modelSize": "1Gi", "nodeGroups": ["workers"]},
        }
    )
    (fp,) = r.plan(observed(caches=[c], groups=[group()]), NOW).finalizers
    assert fp.finalizers == ("other/f", CACHE_FINALIZER) and fp.resource_version == "3"


# --- conditions, config, helpers ----------------------------------------------------------------


def test_condition_keeps_transition_time() -> None:
    old = [{"type": "Ready", "status": "False", "lastTransitionTime": "then"}]
    assert r.condition(old, "Ready", False, "x", "m", NOW, None)["lastTransitionTime"] == "then"
    assert r.condition(old, "Ready", True, "x", "m", NOW, None)["lastTransitionTime"] == NOW


def test_agent_resources_from_config() -> None:
    config = LocalModelConfig.model_validate(
        {
            "localModelAgentImage": "img:1",
            "localModelAgentCpuLimit": "2",
            "localModelAgentMemoryRequest": "1Gi",
        }
    )
    ds = r.agent_daemonset(group(), "kserve", config, "default:img")
    assert ds is not None
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "img:1"
    assert container["resources"]["limits"]["cpu"] == "2"
    assert container["resources"]["requests"]["memory"] == "1Gi"
    assert container["resources"]["requests"]["cpu"] == "100m"


def test_daemonset_for_deleted_group_removed() -> None:
    plan = r.plan(observed(daemonsets={"old-agent": "h"}), NOW)
    assert plan.daemonset_deletes == ["old-agent"]


def test_unlisted_volumes_and_daemonsets_left_alone() -> None:
    plan = r.plan(observed(groups=[group()], caches=[cache()], volumes=None, daemonsets=None), NOW)
    assert plan.volume_creates == [] and plan.daemonset_applies == [] and plan.daemonset_deletes == []


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (10 * 2**30, "10Gi"), (1700 * 10**9, "1700G"), (1536, "1536"), (3 * 1024 + 1, "3073")],
)
def test_format_quantity(n: int, text: str) -> None:
    assert r.format_quantity(n) == text


def test_node_status_unknown_is_pending() -> None:
    assert r.node_status(None) == "NodeDownloadPending"
    assert r.node_status("Weird") == "NodeDownloadPending"


def test_agent_progress_becomes_node_progress() -> None:
    c = cache()
    mn = r.ModelNode(
        name="n1",
        entries=(c.entry("workers"),),
        model_status={"llama": "ModelDownloading"},
        progress={"llama": {"bytesDone": 5, "bytesTotal": 10, "startedAt": NOW, "lastError": "retrying"}},
    )
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c], model_nodes=[mn]), NOW
    )
    progress = plan.cache_status[0][1]["nodeProgress"]
    assert progress == {"n1": {"bytesDone": 5, "bytesTotal": 10, "startedAt": NOW, "message": "retrying"}}


def test_service_without_label_is_not_a_user() -> None:
    assert r.service_from({"kind": "InferenceService", "metadata": {"name": "a", "namespace": "n"}}) is None
    svc = r.service_from(
        {
            "kind": "InferenceService",
            "metadata": {
                "name": "a",
                "namespace": "n",
                "labels": {"internal.serving.kserve.io/localmodel": "llama"},
                "annotations": {"serving.kserve.io/nodegroup": "fast"},
            },
        }
    )
    assert svc == r.Service("InferenceService", "n", "a", "llama", node_group="fast")


def test_namespace_cache_ignores_other_namespaces_services() -> None:
    c = cache("llama", namespace="team")
    services = [
        r.Service("InferenceService", "other", "x", "llama", cache_namespace="team"),
        r.Service("InferenceService", "team", "cluster-user", "llama"),
    ]
    plan = r.plan(
        observed(nodes=[node("n1", gpu="a100")], groups=[group()], caches=[c], services=services), NOW
    )
    assert "inferenceServices" not in plan.cache_status[0][1]


def test_plan_at_benchmark_scale() -> None:
    """1,000 nodes x 100 caches in one pass (bench/controller.py times it against a real server)."""
    nodes = [node(f"n{i:04d}", gpu="a100") for i in range(1000)]
    caches = [cache(f"c{i:03d}", size="1Gi", uri=f"s3://b/{i}") for i in range(100)]
    g = group(limit="1Ti")
    plan = r.plan(observed(nodes=nodes, groups=[g], caches=caches), NOW)
    assert len(plan.lmn_creates) == 1000
    assert all(len(b["spec"]["localModels"]) == 100 for b in plan.lmn_creates)
    assert len(plan.cache_status) == 100
