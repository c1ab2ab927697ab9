"""One rule in one place: the same cluster fed to the controller, the webhook and the agent.

Whatever the webhook admits, the controller places; the members of a node group are the same for
both (a group without nodeAffinity has none, as in KServe); status keys agree with the agent's.
"""

from __future__ import annotations

from typing import Any

import pytest

from modelcache import domain
from modelcache.agent import plan as agent_plan
from modelcache.api.types import LocalModelInfo
from modelcache.controller import reconcile as r
from modelcache.kube.config import LocalModelConfig
from modelcache.webhook import admission
from modelcache.webhook.admission import Cluster

Obj = dict[str, Any]
URI = "hf://org/llama"


def group(name: str, limit: str, affinity: bool = True) -> Obj:
    pv: Obj = {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": limit}, "local": {"path": "/models"}}
    if affinity:
        term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": [name]}]}
        pv["nodeAffinity"] = {"required": {"nodeSelectorTerms": [term]}}
    return {
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {"storageLimit": limit, "persistentVolumeSpec": pv, "persistentVolumeClaimSpec": {}},
    }


def cache(name: str, uri: str, size: str, groups: list[str], created: int, namespace: str = "") -> Obj:
    meta: Obj = {"name": name, "uid": f"uid-{name}", "creationTimestamp": f"2026-01-01T00:00:{created:02d}Z"}
    if namespace:
        meta["namespace"] = namespace
    return {
        "kind": "LocalModelNamespaceCache" if namespace else "LocalModelCache",
        "metadata": meta,
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups},
    }


def node(name: str, pool: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "pool": pool}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


GROUPS = [group("gpu", "25Gi"), group("cpu", "5Gi"), group("bare", "100Gi", affinity=False)]
NODES = [node("g1", "gpu"), node("g2", "gpu"), node("c1", "cpu")]
CACHES = [
    cache("llama", URI, "10Gi", ["gpu"], 1),
    cache("llama-team", URI, "12Gi", ["gpu"], 2, namespace="team-a"),  # same URI: one folder, counted once
    cache("mistral", "hf://org/mistral", "12Gi", ["gpu", "cpu"], 3),  # fits gpu (12+12), not cpu
    cache("phi", "hf://org/phi", "4Gi", ["gpu"], 4),  # gpu is full now
    cache("tiny", "hf://org/tiny", "1Gi", ["cpu", "bare"], 5),
]


def controller_placement(config: LocalModelConfig) -> dict[tuple[str, str], tuple[str, ...]]:
    plan = r.plan(
        r.Observed(
            namespace="kserve",
            config=config,
            nodes={n.name: n for n in map(r.node_from, NODES)},
            groups={g.name: g for g in map(r.group_from, GROUPS)},
            caches=[r.cache_from(c) for c in CACHES],
            model_nodes={},
        ),
        "2026-01-01T00:01:00Z",
    )
    sent = {
        (e.get("namespace", ""), e["modelName"], e["nodeGroup"])
        for body in plan.lmn_creates
        for e in body["spec"]["localModels"]
    }
    out = {}
    for c in CACHES:
        ref = (c["metadata"].get("namespace", ""), c["metadata"]["name"])
        ok = tuple(sorted(g for g in c["spec"]["nodeGroups"] if not _rejected(plan, c, g)))
        # placed on a group with members means its nodes got the entry
        assert all((*ref, g) in sent for g in ok if g != "bare"), ref
        out[ref] = ok
    return out


def _rejected(plan: r.Plan, c: Obj, g: str) -> bool:
    ref = (c["metadata"].get("namespace", ""), c["metadata"]["name"])
    for cache_ref, status in plan.cache_status:
        if cache_ref == ref:
            cond = next(x for x in status["conditions"] if x["type"] == "Scheduled")
            return cond["status"] == "False" and f"node group {g}" in cond["message"]
    return False


def webhook_admits(config: LocalModelConfig) -> dict[tuple[str, str], tuple[str, ...]]:
    """Each cache applied in creation order, one group at a time: which groups does the webhook accept?"""
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    admitted: list[Obj] = []
    for c in CACHES:
        ok = []
        for g in c["spec"]["nodeGroups"]:
            single = {**c, "spec": {**c["spec"], "nodeGroups": [g]}}
            ns = c["metadata"].get("namespace", "")
            state = Cluster(
                caches=[x for x in admitted if x["kind"] == "LocalModelCache"],
                namespace_caches=[x for x in admitted if x["kind"] == "LocalModelNamespaceCache"],
                node_groups={x["metadata"]["name"]: x for x in GROUPS},
                nodes=NODES,
                local_model_config=config,
            )
            if admission.review(admission_req(single, ns), state).allowed:
                ok.append(g)
        admitted.append(c)
        out[(c["metadata"].get("namespace", ""), c["metadata"]["name"])] = tuple(sorted(ok))
    return out


def admission_req(obj: Obj, namespace: str) -> Obj:
    return {
        "uid": "u",
        "kind": {"group": "serving.kserve.io", "version": "v1alpha1", "kind": obj["kind"]},
        "operation": "CREATE",
        "namespace": namespace,
        "name": obj["metadata"]["name"],
        "object": obj,
    }


@pytest.mark.parametrize("policy", ["enforce", "warn"])
def test_webhook_admits_exactly_what_the_controller_places(policy: str) -> None:
    config = LocalModelConfig.model_validate({domain.STORAGE_POLICY_KEY: policy})
    placed = controller_placement(config)
    assert webhook_admits(config) == placed
    if policy == "enforce":
        assert placed[("team-a", "llama-team")] == ("gpu",)  # same URI as llama: counted once
        assert placed[("", "mistral")] == ("gpu",)
        assert placed[("", "phi")] == ()
    else:
        assert all(placed[(c["metadata"].get("namespace", ""), c["metadata"]["name"])] for c in CACHES)


def test_membership_is_the_same_everywhere() -> None:
    nodes = [r.node_from(n) for n in NODES]
    for g in GROUPS:
        name = g["metadata"]["name"]
        controller = r.group_members(r.group_from(g), nodes)
        webhook = sorted(admission._name(n) for n in admission._nodes_in_group(NODES, g))
        assert controller == webhook, name
    assert r.group_members(r.group_from(GROUPS[2]), nodes) == []  # no nodeAffinity: no node (KServe)


def test_status_keys_agree() -> None:
    for c in CACHES:
        rc = r.cache_from(c)
        info = LocalModelInfo.model_validate(rc.entry("gpu").to_wire())
        assert agent_plan.Entry(info).status_key == rc.status_key == rc.entry("gpu").status_key
        assert agent_plan.Entry(info).pvc_name(None) == domain.pvc_name(rc.name, "gpu")


def test_storage_policy_parsing() -> None:
    assert domain.storage_policy(None) == domain.StoragePolicy.ENFORCE
    assert domain.storage_policy({domain.STORAGE_POLICY_KEY: "Warn"}) == domain.StoragePolicy.WARN
    assert domain.storage_policy({domain.STORAGE_POLICY_KEY: "bogus"}) == domain.StoragePolicy.ENFORCE
