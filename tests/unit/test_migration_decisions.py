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
