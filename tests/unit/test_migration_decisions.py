"""Swapping KServe's local model cache for ours: the controller's pure decisions about what KServe
left behind (PV/PVCs of the same names, its agent image in inferenceservice-config)."""

from __future__ import annotations

from typing import Any

from modelcache.controller import reconcile as r
from modelcache.kube.config import LocalModelConfig
from tests.unit.test_reconcile import NOW, cache, group, node, observed

CACHE_REF = r.ObjectRef("serving.kserve.io/v1alpha1", "LocalModelCache", "llama", "", "uid-llama")


def desired() -> list[dict[str, Any]]:
    return r.desired_volumes(cache(), [group()], [], LocalModelConfig())


def kserve_made(body: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    """The same object as KServe creates it: our name and spec, no labels of ours."""
    meta = {"name": body["metadata"]["name"], "namespace": body["metadata"].get("namespace")}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"kind": body["kind"], "metadata": meta, "spec": body["spec"]}


def test_kserve_volumes_owned_by_the_cache_are_adopted() -> None:
    owner = {"kind": "LocalModelCache", "name": "llama", "uid": "uid-llama", "controller": True}
    for body in desired():
        assert r.volume_adoption(kserve_made(body, owner), body, CACHE_REF) == "adopt"
        assert r.volume_adoption(body, body, CACHE_REF) == "ours"
        patch = r.adoption_patch(body)
        assert patch["metadata"]["labels"][r.VOLUME_ROLE_LABEL] == "download"
        assert r.volume_from({**kserve_made(body, owner), **{"metadata": {**body["metadata"]}}}) is not None


def test_unowned_volumes_adopted_only_when_they_point_where_ours_would() -> None:
    for body in desired():
        assert r.volume_adoption(kserve_made(body, None), body, CACHE_REF) == "adopt"
        other = kserve_made(body, None)
        other["spec"] = {"volumeName": "elsewhere", "local": {"path": "/data"}}
        assert r.volume_adoption(other, body, CACHE_REF) == "foreign"
        stranger = {"kind": "Deployment", "name": "x", "uid": "u"}
        assert r.volume_adoption(kserve_made(body, stranger), body, CACHE_REF) == "foreign"


def test_kserve_agent_image_is_ignored_loudly() -> None:
    for image in (
        "kserve/kserve-localmodelnode-agent:v0.15.0",
        "registry.example.com:5000/mirror/kserve-localmodelnode-agent@sha256:abc",
    ):
        assert r.foreign_agent_image(image)
        config = LocalModelConfig.model_validate({"localModelAgentImage": image})
        ds = r.agent_daemonset(group(), "kserve", config, "ours:1")
        assert ds is not None
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "ours:1"
        plan = r.plan(observed(config=config, groups=[group()], nodes=[node("n1", gpu="a100")]), NOW)
        warned = [e for e in plan.events if e.reason == "ForeignAgentImage"]
        assert warned and image in warned[0].message and warned[0].type == "Warning"
    assert not r.foreign_agent_image("ghcr.io/modelcache/modelcache:0.3")
    # our own agent image under KServe's key is still honoured, and --agent-settings image wins silently
    ours = LocalModelConfig.model_validate({"localModelAgentImage": "mirror/modelcache:1"})
    assert r.agent_image(ours, "x") == ("mirror/modelcache:1", None)
    kserve = LocalModelConfig.model_validate({"localModelAgentImage": "kserve/kserve-localmodelnode-agent"})
    plan = r.plan(observed(config=kserve, groups=[group()], agent_settings={"image": "ours:2"}), NOW)
    assert not [e for e in plan.events if e.reason == "ForeignAgentImage"]
    assert plan.daemonset_applies[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "ours:2"


def test_cache_before_its_node_group_is_placed_when_the_group_appears() -> None:
    """GitOps order (item 6): the webhook admits it; the controller says Scheduled=False, then places it."""
    early = cache()
    plan = r.plan(observed(caches=[early], nodes=[node("n1", gpu="a100")]), NOW)
    status = dict(plan.cache_status)[("", "llama")]
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == r.REASON_GROUP_MISSING
    assert not plan.lmn_creates
    later = r.plan(observed(caches=[early], groups=[group()], nodes=[node("n1", gpu="a100")]), NOW)
    assert [e["modelName"] for e in later.lmn_creates[0]["spec"]["localModels"]] == ["llama"]


def _kserve_mutated_pod(readonly: str | None = None) -> dict[str, Any]:
    """A predictor pod after KServe's own mutator: PVC `llama-workers` at /mnt/models, no initializer."""
    from tests.unit.test_admission import kserve_pod

    pod = kserve_pod()
    spec = pod["spec"]
    spec.pop("initContainers")
    spec["volumes"] = [{"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": "llama-workers"}}]
    spec["containers"][0]["volumeMounts"] = [
        {"name": "kserve-pvc-source", "mountPath": "/mnt/models", "subPath": "models/x/sub", "readOnly": True}
    ]
    if readonly is not None:
        pod["metadata"]["annotations"]["storage.kserve.io/readonly"] = readonly
    return pod


def test_kserve_mutator_ran_first_no_false_warning_and_still_affinity() -> None:
    """Item 9: the PVC is mounted already; not ready yet means the pod waits (affinity), not
    'admitted without the local model mount'; ready means our affinity is added all the same."""
    from modelcache.webhook import admission
    from tests.unit.test_admission import READY, apply_patch, cluster, pod_review
    from tests.unit.test_admission import node as anode

    pod = _kserve_mutated_pod()
    not_ready = pod_review(pod, cluster())
    assert not any("without the local model mount" in w for w in not_ready.warnings)
    assert any("stays Pending until a node has it" in w for w in not_ready.warnings)
    out = apply_patch(_kserve_mutated_pod(), not_ready.patch)
    terms = out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(e["operator"] == "In" for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"])
    ready = pod_review(_kserve_mutated_pod(), cluster(nodes=[anode("n1", {"pool": "workers", **READY})]))
    assert ready.allowed and not ready.warnings and ready.patch
    assert admission.kserve_mounted(_kserve_mutated_pod(), admission.pod_target(pod, "default", cluster()))  # type: ignore[arg-type]
    writable = pod_review(
        _kserve_mutated_pod("false"), cluster(nodes=[anode("n1", {"pool": "workers", **READY})])
    )
    assert any("storage.kserve.io/readonly=false is ignored" in w for w in writable.warnings)
    out = apply_patch(_kserve_mutated_pod("false"), writable.patch)
    assert all(m.get("readOnly") for m in out["spec"]["containers"][0]["volumeMounts"])


def test_check_lists_what_to_do_in_order() -> None:
    from modelcache.kube.migration import ClusterView, findings

    config = LocalModelConfig.model_validate(
        {"jobNamespace": "jobs", "localModelAgentImage": "kserve/kserve-localmodelnode-agent:v0.15"}
    )
    view = ClusterView(
        namespace="kserve",
        config=config,
        deployments=[{"metadata": {"name": "kserve-localmodel-controller-manager", "namespace": "kserve"}}],
        webhook_configurations=[
            {
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": "localmodelcache.serving.kserve.io"},
                "webhooks": [{"name": "localmodelcache.serving.kserve.io", "failurePolicy": "Fail"}],
            }
        ],
        daemonsets=[
            {
                "metadata": {"name": "workers-agent", "namespace": "kserve"},
                "spec": {
                    "template": {"spec": {"containers": [{"image": "kserve/kserve-localmodelnode-agent"}]}}
                },
            }
        ],
        volumes=[
            {
                "kind": "PersistentVolumeClaim",
                "metadata": {
                    "name": "llama-workers",
                    "namespace": "jobs",
                    "ownerReferences": [{"kind": "LocalModelCache", "name": "llama"}],
                },
            }
        ],
        caches=[{**cache_obj("big", "20Gi"), "status": {"copies": {"available": 2}}}],
        groups=[group_raw("10Gi")],
        foreign_folders={"/models": ["0123456789abcdef"]},
        job_role_bindings=[],
    )
    found = findings(view)
    assert [f.step for f in found] == sorted(f.step for f in found)
    text = "\n".join(f.what for f in found)
    for expected in (
        "KServe's localmodel controller runs",
        "localmodelcache.serving.kserve.io webhook is registered",
        "KServe's node agent runs (DaemonSet kserve/workers-agent)",
        "localModelAgentImage names KServe's agent",
        "no RoleBinding in jobNamespace jobs",
        "LocalModelCache big has 2 copies but does not fit",
        "PersistentVolumeClaim jobs/llama-workers was created by KServe",
        "1 model folder(s) under /models/models have no manifest yet",
    ):
        assert expected in text, expected
    clean = ClusterView(namespace="kserve", config=LocalModelConfig(), job_role_bindings=None)
    assert findings(clean) == []


def cache_obj(name: str, size: str) -> dict[str, Any]:
    return {
        "kind": "LocalModelCache",
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"sourceModelUri": "hf://o/" + name, "modelSize": size, "nodeGroups": ["workers"]},
    }


def group_raw(limit: str = "10Gi") -> dict[str, Any]:
    from tests.unit.test_reconcile import group_obj

    return group_obj(limit=limit)
