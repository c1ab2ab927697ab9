"""Admission decisions (pure): cache/node-group validation, InferenceService and pod mutation,
JSON patches, TLS planning, and the shipped webhook configurations."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import (
    DISABLE_LOCALMODEL_ANNOTATION,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    LOCALMODEL_PVC_ANNOTATION,
    LOCALMODEL_SOURCEURI_ANNOTATION,
    MODEL_ANNOTATION,
    MODEL_POD_LABEL,
    MOUNT_PATH_ANNOTATION,
    NODEGROUP_ANNOTATION,
    ready_label,
)
from modelcache.uri import storage_key
from modelcache.webhook import admission, registration, tls
from modelcache.webhook.admission import (
    STORAGE_INITIALIZER_SOURCEURI_ANNOTATION,
    Cluster,
    Decision,
    NotReadyPolicy,
    Options,
    review,
)

REPO = Path(__file__).resolve().parents[2]
URI = "hf://meta-llama/meta-llama-3-8b-instruct"
KEY = storage_key(URI)
Obj = dict[str, Any]


# -- helpers --------------------------------------------------------------------------------------
def apply_patch(doc: Any, ops: list[Obj]) -> Any:
    """A small RFC 6902 applier (add/remove/replace/test) to check our patches do what we mean."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(idx, op["value"])
            elif op["op"] == "remove":
                del parent[idx]
            elif op["op"] == "replace":
                parent[idx] = op["value"]
            else:
                assert parent[idx] == op["value"]
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in parent
            parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[last]
        else:
            assert parent[last] == op["value"]
    return doc


def group(name: str = "workers", limit: str = "100Gi", host: str | None = None) -> Obj:
    term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": [name]}]}
    if host:
        term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": name},
        "spec": {
            "storageLimit": limit,
            "persistentVolumeSpec": {
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": limit},
                "hostPath": {"path": "/models", "type": ""},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [term]}},
            },
            "persistentVolumeClaimSpec": {"resources": {"requests": {"storage": limit}}},
        },
    }


def cache(
    name: str,
    uri: str = URI,
    size: str = "10Gi",
    groups: list[str] | None = None,
    namespace: str | None = None,
) -> Obj:
    meta: Obj = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNamespaceCache" if namespace else "LocalModelCache",
        "metadata": meta,
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups or ["workers"]},
    }


def node(name: str, labels: dict[str, str] | None = None) -> Obj:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}}


def req(kind: str, op: str, obj: Obj | None = None, old: Obj | None = None, namespace: str = "") -> Obj:
    group_name = "" if kind == "Pod" else "serving.kserve.io"
    return {
        "uid": "u-1",
        "kind": {"group": group_name, "version": "v1", "kind": kind},
        "operation": op,
        "namespace": namespace,
        "name": (obj or old or {}).get("metadata", {}).get("name", ""),
        "object": obj,
        "oldObject": old,
    }


def cluster(**kw: Any) -> Cluster:
    kw.setdefault("node_groups", {"workers": group()})
    return Cluster(**kw)


# -- json patch / response ------------------------------------------------------------------------
def test_json_patch_escapes_keys_and_round_trips() -> None:
    old = {"metadata": {"labels": {"a/b": "1", "gone": "x"}}, "spec": {"list": [1, 2]}}
    new = {"metadata": {"labels": {"a/b": "2", "x~y": "3"}}, "spec": {"list": [1, 2, 3]}, "extra": {}}
    ops = admission.json_patch(old, new)
    assert {"op": "replace", "path": "/metadata/labels/a~1b", "value": "2"} in ops
    assert {"op": "add", "path": "/metadata/labels/x~0y", "value": "3"} in ops
    assert apply_patch(old, ops) == new
    assert admission.json_patch(new, new) == []


def test_admission_response_shapes() -> None:
    denied = admission.admission_response("u", admission.deny("no", code=409))
    assert denied["response"] == {"uid": "u", "allowed": False, "status": {"code": 409, "message": "no"}}
    patch = [{"op": "add", "path": "/x", "value": 1}]
    allowed = admission.admission_response("u", Decision(patch=patch, warnings=("w",)))
    assert allowed["apiVersion"] == "admission.k8s.io/v1"
    assert allowed["response"]["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(allowed["response"]["patch"])) == patch
    assert allowed["response"]["warnings"] == ["w"]


def test_unknown_kinds_pass() -> None:
    assert review(req("ConfigMap", "CREATE", {"metadata": {"name": "x"}}), Cluster()) == Decision()


# -- cache validation -----------------------------------------------------------------------------
def test_valid_cache_is_allowed() -> None:
    assert review(req("LocalModelCache", "CREATE", cache("llama")), cluster()).allowed


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("meta-llama/llama", "needs a scheme"),
        ("https://host", "no path"),
        ("", "sourceModelUri is required"),
    ],
)
def test_bad_uri_is_rejected(uri: str, needle: str) -> None:
    decision = review(req("LocalModelCache", "CREATE", cache("llama", uri=uri)), cluster())
    assert not decision.allowed
    assert needle in decision.message
    assert decision.message.startswith("LocalModelCache llama: ")


@pytest.mark.parametrize(
    "uri", ["hdfs://nn:8020/models/llama", "webhdfs://nn/m", "ftp://u:secret@host/model"]
)
def test_schemes_we_do_not_read_are_admitted_for_a_download_job(uri: str) -> None:
    """Issue 11 item 7: KServe runs a download Job for them; so do we (with a warning, no secret)."""
    decision = review(req("LocalModelCache", "CREATE", cache("llama", uri=uri)), cluster())
    assert decision.allowed
    assert "downloaded by a Job" in decision.warnings[0] and "secret" not in decision.warnings[0]


def test_uri_credentials_never_in_message() -> None:
    decision = review(req("LocalModelCache", "CREATE", cache("x", uri="https://user:secret@host")), cluster())
    assert not decision.allowed and "secret" not in decision.message


def test_missing_node_group_and_bad_size() -> None:
    decision = review(
        req("LocalModelCache", "CREATE", cache("llama", size="ten", groups=["workers", "gpus"])), cluster()
    )
    assert not decision.allowed
    assert "not found" not in decision.message
    assert "modelSize 'ten' is not a quantity" in decision.message
    # a cache applied before its node group (GitOps order) is admitted with a warning
    early = review(req("LocalModelCache", "CREATE", cache("llama", groups=["workers", "gpus"])), cluster())
    assert early.allowed and "node group(s) gpus not found yet" in early.warnings[0]


def test_capacity_counts_other_caches_of_both_kinds() -> None:
    state = cluster(
        node_groups={"workers": group(limit="100Gi")},
        caches=[cache("a", uri="hf://org/a", size="50Gi")],
        namespace_caches=[cache("b", uri="hf://org/b", size="30Gi", namespace="team")],
    )
    ok = review(req("LocalModelCache", "CREATE", cache("c", uri="hf://org/c", size="20Gi")), state)
    assert ok.allowed
    too_big = review(req("LocalModelCache", "CREATE", cache("c", uri="hf://org/c", size="21Gi")), state)
    assert not too_big.allowed
    assert (
        "modelSize 21.0 GiB does not fit node group workers: storageLimit 100.0 GiB, "
        "80.0 GiB already committed by 2 other cache(s) (a, team/b), 20.0 GiB available"
    ) in too_big.message


def test_capacity_excludes_itself_on_update_and_caches_being_deleted() -> None:
    me = cache("a", size="60Gi")
    going = cache("old", uri="hf://org/old", size="90Gi")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    state = cluster(node_groups={"workers": group(limit="100Gi")}, caches=[me, going])
    bigger = copy.deepcopy(me)
    bigger["spec"]["modelSize"] = "80Gi"
    assert review(req("LocalModelCache", "UPDATE", bigger, old=me), state).allowed


def test_duplicate_uri_rejected_as_kserve() -> None:
    state = cluster(caches=[cache("first")])
    decision = review(req("LocalModelCache", "CREATE", cache("second")), state)
    assert not decision.allowed
    assert f"LocalModelCache first has the same StorageURI {URI}" in decision.message


def test_namespace_cache_duplicates_are_per_namespace() -> None:
    state = cluster(caches=[cache("cluster-wide")], namespace_caches=[cache("mine", namespace="a")])
    same_ns = review(
        req("LocalModelNamespaceCache", "CREATE", cache("again", namespace="a"), namespace="a"), state
    )
    assert not same_ns.allowed
    assert "LocalModelNamespaceCache a/mine has the same StorageURI" in same_ns.message
    other_ns = review(
        req("LocalModelNamespaceCache", "CREATE", cache("mine", namespace="b"), namespace="b"), state
    )
    assert other_ns.allowed  # and a namespace cache may shadow a cluster cache


def test_source_uri_is_immutable() -> None:
    old = cache("llama")
    new = cache("llama", uri="hf://org/other")
    decision = review(req("LocalModelCache", "UPDATE", new, old=old), cluster())
    assert not decision.allowed
    assert "spec.sourceModelUri is immutable" in decision.message


def test_metadata_only_update_and_finalizer_removal_pass_even_without_groups() -> None:
    old = cache("llama", groups=["gone"])
    new = copy.deepcopy(old)
    new["metadata"]["finalizers"] = ["x"]
    assert review(req("LocalModelCache", "UPDATE", new, old=old), cluster()).allowed
    deleting = copy.deepcopy(old)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    deleting["spec"]["sourceModelUri"] = "hf://x/y"
    assert review(req("LocalModelCache", "UPDATE", deleting, old=old), cluster()).allowed
    assert admission.reads(req("LocalModelCache", "UPDATE", new, old=old)) == admission.Reads()


def isvc(name: str, uri: str | None = URI, namespace: str = "default", **meta: Any) -> Obj:
    predictor: Obj = {"model": {"modelFormat": {"name": "huggingface"}}}
    if uri is not None:
        predictor["model"]["storageUri"] = uri
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": {"predictor": predictor},
    }


def test_delete_refused_while_used_and_allowed_once_gone() -> None:
    user = isvc("chat", labels={LOCALMODEL_LABEL: "llama"})
    pod = {"metadata": {"name": "p", "namespace": "web", "annotations": {MODEL_ANNOTATION: "llama"}}}
    state = Cluster(inference_services=[user], pods=[pod])
    decision = review(req("LocalModelCache", "DELETE", old=cache("llama")), state)
    assert not decision.allowed and decision.code == 409
    assert (
        "LocalModelCache llama is still used by InferenceService default/chat, Pod web/p" in decision.message
    )
    assert review(req("LocalModelCache", "DELETE", old=cache("llama")), Cluster()).allowed


def test_delete_ignores_workloads_on_their_way_out_and_other_caches() -> None:
    deleting = isvc("chat", labels={LOCALMODEL_LABEL: "llama"})
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    done = {"metadata": {"name": "p", "namespace": "d", "annotations": {MODEL_ANNOTATION: "llama"}}}
    done["status"] = {"phase": "Succeeded"}
    ns_user = isvc("n", labels={LOCALMODEL_LABEL: "llama", LOCALMODEL_NAMESPACE_LABEL: "default"})
    shadowed = {"metadata": {"name": "q", "namespace": "default", "annotations": {MODEL_ANNOTATION: "llama"}}}
    state = Cluster(
        inference_services=[deleting, ns_user],
        pods=[done, shadowed],
        namespace_caches=[cache("llama", namespace="default")],
    )
    # cluster cache: the namespace cache of the same name serves `n` and `q`
    assert review(req("LocalModelCache", "DELETE", old=cache("llama")), state).allowed
    ns_delete = review(
        req(
            "LocalModelNamespaceCache", "DELETE", old=cache("llama", namespace="default"), namespace="default"
        ),
        state,
    )
    assert not ns_delete.allowed
    assert "InferenceService default/n, Pod default/q" in ns_delete.message


# -- node groups ----------------------------------------------------------------------------------
def test_node_group_rules() -> None:
    assert review(req("LocalModelNodeGroup", "CREATE", group()), Cluster()).allowed
    bad = group(limit="lots")
    del bad["spec"]["persistentVolumeSpec"]["hostPath"]
    bad["spec"]["persistentVolumeSpec"]["nodeAffinity"] = {}
    decision = review(req("LocalModelNodeGroup", "CREATE", bad), Cluster())
    assert not decision.allowed
    for needle in (
        "spec.storageLimit 'lots' is not a quantity",
        "needs a local or hostPath source",
        "nodeSelectorTerms must select",
        "capacity.storage 'lots' is not a quantity",
        "requests.storage 'lots' is not a quantity",
    ):
        assert needle in decision.message
    local = group()
    pv = local["spec"]["persistentVolumeSpec"]
    pv["local"] = pv.pop("hostPath")
    assert review(req("LocalModelNodeGroup", "CREATE", local), Cluster()).allowed


def test_node_group_shrink_below_commitments_warns() -> None:
    state = Cluster(caches=[cache("a", size="80Gi")])
    old, new = group(limit="100Gi"), group(limit="50Gi")
    decision = review(req("LocalModelNodeGroup", "UPDATE", new, old=old), state)
    assert decision.allowed
    assert decision.warnings and "already commit 80.0 GiB" in decision.warnings[0]


# -- InferenceService / LLMInferenceService -------------------------------------------------------
ENABLED = LocalModelConfig(enabled=True)


def mutated(obj: Obj, state: Cluster, kind: str = "InferenceService") -> Obj:
    decision = review(req(kind, "CREATE", obj, namespace=obj["metadata"]["namespace"]), state)
    assert decision.allowed
    result: Obj = apply_patch(obj, decision.patch)
    return result


@pytest.mark.parametrize("uri", [URI, URI + "/", URI + "/sub/dir"])
def test_isvc_gets_kserve_labels(uri: str) -> None:
    state = cluster(caches=[cache("llama", groups=["workers", "gpus"])], local_model_config=ENABLED)
    out = mutated(isvc("chat", uri=uri), state)
    assert out["metadata"]["labels"] == {LOCALMODEL_LABEL: "llama"}
    assert out["metadata"]["annotations"] == {
        LOCALMODEL_SOURCEURI_ANNOTATION: URI,
        LOCALMODEL_PVC_ANNOTATION: "llama-workers",
    }


def test_isvc_prefix_that_is_not_a_path_does_not_match() -> None:
    state = cluster(caches=[cache("llama")], local_model_config=ENABLED)
    out = mutated(isvc("chat", uri=URI + "-v2"), state)
    assert LOCALMODEL_LABEL not in (out["metadata"].get("labels") or {})


def test_namespace_cache_wins_and_nodegroup_annotation_picks_pvc() -> None:
    state = cluster(
        caches=[cache("global")],
        namespace_caches=[cache("local", groups=["a", "b"], namespace="default")],
        local_model_config=ENABLED,
    )
    out = mutated(isvc("chat", annotations={NODEGROUP_ANNOTATION: "b"}), state)
    assert out["metadata"]["labels"] == {LOCALMODEL_LABEL: "local", LOCALMODEL_NAMESPACE_LABEL: "default"}
    assert out["metadata"]["annotations"][LOCALMODEL_PVC_ANNOTATION] == "local-b"
    # a group no cache is on: not cached at all (as KServe)
    out = mutated(isvc("chat", annotations={NODEGROUP_ANNOTATION: "z"}), state)
    assert LOCALMODEL_LABEL not in (out["metadata"].get("labels") or {})


def test_stale_labels_removed_when_disabled_unmatched_or_feature_off() -> None:
    stale = {
        "labels": {LOCALMODEL_LABEL: "old", LOCALMODEL_NAMESPACE_LABEL: "x", "app": "chat"},
        "annotations": {LOCALMODEL_SOURCEURI_ANNOTATION: "s", LOCALMODEL_PVC_ANNOTATION: "p"},
    }
    state = cluster(caches=[cache("llama")], local_model_config=ENABLED)
    for obj, st in (
        (isvc("a", uri="hf://other/model", **copy.deepcopy(stale)), state),
        (isvc("b", uri=None, **copy.deepcopy(stale)), state),
        (isvc("c", **copy.deepcopy(stale)), cluster(caches=[cache("llama")])),  # localModel.enabled false
    ):
        out = mutated(obj, st)
        assert out["metadata"]["labels"] == {"app": "chat"}
        assert out["metadata"]["annotations"] == {}
    disabled = isvc("d", **copy.deepcopy(stale))
    disabled["metadata"]["annotations"][DISABLE_LOCALMODEL_ANNOTATION] = "true"
    out = mutated(disabled, state)
    assert out["metadata"]["annotations"] == {DISABLE_LOCALMODEL_ANNOTATION: "true"}


def test_isvc_storage_uri_sources() -> None:
    legacy = {"spec": {"predictor": {"sklearn": {"storageUri": "gs://b/m"}, "model": {"storageUri": "x"}}}}
    assert admission.workload_storage_uri(legacy, "InferenceService") == "gs://b/m"
    custom = {
        "spec": {
            "predictor": {
                "containers": [
                    {"name": "sidecar"},
                    {"name": "kserve-container", "env": [{"name": "STORAGE_URI", "value": "s3://b/m"}]},
                ]
            }
        }
    }
    assert admission.workload_storage_uri(custom, "InferenceService") == "s3://b/m"
    assert admission.workload_storage_uri({"spec": {"model": {"uri": URI}}}, "LLMInferenceService") == URI


def test_llm_inference_service_labelled() -> None:
    llm = {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceService",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": {"model": {"uri": URI + "/sub"}},
    }
    state = cluster(caches=[cache("llama")], local_model_config=ENABLED)
    out = mutated(llm, state, kind="LLMInferenceService")
    assert out["metadata"]["labels"] == {LOCALMODEL_LABEL: "llama"}


# -- pods -----------------------------------------------------------------------------------------
def kserve_pod(storage_uri: str = URI + "/sub", **extra: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "chat-predictor-",
            "namespace": "default",
            "labels": {LOCALMODEL_LABEL: "llama", "app": "chat"},
            "annotations": {
                LOCALMODEL_SOURCEURI_ANNOTATION: URI,
                LOCALMODEL_PVC_ANNOTATION: "llama-workers",
                STORAGE_INITIALIZER_SOURCEURI_ANNOTATION: storage_uri,
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "chat-rs",
                    "uid": "u1",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "initContainers": [
                {
                    "name": "storage-initializer",
                    "args": [storage_uri, "/mnt/models"],
                    "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}],
                }
            ],
            "containers": [
                {
                    "name": "kserve-container",
                    "env": [{"name": "STORAGE_URI", "value": storage_uri}],
                    "volumeMounts": [
                        {"name": "kserve-provision-location", "mountPath": "/mnt/models", "readOnly": True}
                    ],
                },
                {"name": "queue-proxy"},
            ],
            "volumes": [{"name": "kserve-provision-location", "emptyDir": {}}],
            **extra,
        },
    }


def pod_review(
    pod: Obj, state: Cluster, policy: NotReadyPolicy = NotReadyPolicy.WARN, dry: bool = False
) -> Decision:
    request = req("Pod", "CREATE", pod, namespace="default")
    request["dryRun"] = dry
    return review(request, state, Options(when_not_ready=policy))


READY = {ready_label(KEY): "ready"}


def test_kserve_pod_mounts_cache_like_kserve_plus_affinity() -> None:
    state = cluster(nodes=[node("n1", {"pool": "workers", **READY})])
    decision = pod_review(kserve_pod(), state)
    assert decision.allowed and not decision.warnings and not decision.events
    out = apply_patch(kserve_pod(), decision.patch)
    spec = out["spec"]
    assert "initContainers" not in spec
    assert spec["volumes"] == [
        {
            "name": "kserve-pvc-source",
            "persistentVolumeClaim": {"claimName": "llama-workers", "readOnly": True},
        }
    ]
    main = spec["containers"][0]
    assert main["volumeMounts"] == [
        {
            "name": "kserve-pvc-source",
            "mountPath": "/mnt/models",
            "subPath": f"models/{KEY}/sub",
            "readOnly": True,
        }
    ]
    assert main["env"] == [{"name": "STORAGE_URI", "value": "/mnt/models"}]
    assert "volumeMounts" not in spec["containers"][1]  # queue-proxy untouched
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [{"matchExpressions": [{"key": ready_label(KEY), "operator": "In", "values": ["ready"]}]}]
    # idempotent: a reinvocation changes nothing
    again = pod_review(out, state)
    assert again.patch == []


def test_affinity_is_anded_into_existing_terms() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                ]
            }
        }
    }
    state = cluster(nodes=[node("n1", {"pool": "workers", **READY})])
    out = apply_patch(kserve_pod(affinity=affinity), pod_review(kserve_pod(affinity=affinity), state).patch)
    terms = out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    ready = {"key": ready_label(KEY), "operator": "In", "values": ["ready"]}
    assert all(ready in t["matchExpressions"] for t in terms["nodeSelectorTerms"])
    assert terms["nodeSelectorTerms"][1]["matchFields"]


def test_not_ready_warns_and_admits_unchanged_with_event() -> None:
    state = cluster(nodes=[node("elsewhere", {"pool": "other", **READY})])  # ready, but not in the group
    decision = pod_review(kserve_pod(), state)
    assert decision.allowed and decision.patch == []
    assert "is not downloaded on any node of node group workers yet" in decision.warnings[0]
    (event,) = decision.events
    assert event.reason == "LocalModelNotReady"
    assert event.involved["kind"] == "ReplicaSet" and event.involved["name"] == "chat-rs"
    assert pod_review(kserve_pod(), state, dry=True).events == ()


def test_not_ready_require_policy_mutates_anyway() -> None:
    decision = pod_review(kserve_pod(), cluster(), policy=NotReadyPolicy.REQUIRE)
    assert decision.patch and "stays Pending" in decision.warnings[0]


def test_kserve_pod_that_loads_no_model_is_untouched() -> None:
    pod = {"metadata": {"labels": {LOCALMODEL_LABEL: "llama"}}, "spec": {"containers": [{"name": "t"}]}}
    assert pod_review(pod, cluster()) == Decision()


def plain_pod(annotations: dict[str, str]) -> Obj:
    return {
        "metadata": {"name": "vllm", "namespace": "default", "annotations": annotations},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}, {"name": "proxy"}]},
    }


#: What a pod asking for a cache by annotation gets when it cannot get the mount: the controller's label.
LABEL_ONLY = [{"op": "add", "path": "/metadata/labels", "value": {"modelcache.io/uses-cache": "true"}}]


def test_plain_pod_annotation_uses_cache_and_mount_path() -> None:
    state = cluster(
        caches=[cache("llama", groups=["workers", "gpus"])],
        node_groups={"gpus": group("gpus"), "workers": group("workers")},
        nodes=[node("n1", {"pool": "workers", **READY})],
    )
    pod = plain_pod({MODEL_ANNOTATION: "llama", MOUNT_PATH_ANNOTATION: "/models/llama"})
    decision = pod_review(pod, state)
    out = apply_patch(pod, decision.patch)
    assert out["spec"]["volumes"] == [
        {
            "name": "modelcache-model",
            "persistentVolumeClaim": {"claimName": "llama-workers", "readOnly": True},
        }
    ]
    for container in out["spec"]["containers"]:
        assert container["volumeMounts"] == [
            {
                "name": "modelcache-model",
                "mountPath": "/models/llama",
                "subPath": f"models/{KEY}",
                "readOnly": True,
            }
        ]
    assert out["spec"]["affinity"]
    # labelled for the controller's server-side pod filter (item 11)
    assert out["metadata"]["labels"][MODEL_POD_LABEL] == "true"


def test_plain_pod_namespace_cache_wins_and_unknown_cache_warns() -> None:
    other = "hf://org/other"
    state = cluster(
        caches=[cache("llama")],
        namespace_caches=[cache("llama", uri=other, namespace="default")],
        nodes=[node("n1", {"pool": "workers", ready_label(storage_key(other)): "ready"})],
    )
    out = apply_patch(
        plain_pod({MODEL_ANNOTATION: "llama"}),
        pod_review(plain_pod({MODEL_ANNOTATION: "llama"}), state).patch,
    )
    assert out["spec"]["containers"][0]["volumeMounts"][0]["subPath"] == f"models/{storage_key(other)}"
    missing = pod_review(plain_pod({MODEL_ANNOTATION: "nope"}), state)
    assert missing.patch == LABEL_ONLY and "no LocalModelNamespaceCache default/nope" in missing.warnings[0]
    assert missing.events[0].involved == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "vllm",
        "namespace": "default",
    }


def test_unrelated_pod_untouched() -> None:
    assert pod_review(plain_pod({}), cluster()) == Decision()


def test_reads_are_targeted() -> None:
    assert admission.reads(req("Pod", "CREATE", plain_pod({}))) == admission.Reads()
    assert admission.reads(req("Pod", "CREATE", kserve_pod())).ready_nodes
    assert admission.reads(req("LocalModelCache", "DELETE", old=cache("x"))).users_of == "x"
    workload = admission.reads(req("InferenceService", "CREATE", isvc("a"), namespace="default"))
    assert workload.namespace_caches_in == "default" and workload.config
    assert admission.reads(req("LocalModelCache", "CREATE", cache("x"))).namespace_caches_in == "*"
    state = Cluster(caches=[cache("llama")])
    assert admission.pod_model_uri(plain_pod({MODEL_ANNOTATION: "llama"}), "default", state) == URI
    assert admission.pod_model_uri(kserve_pod(), "default", Cluster()) == URI


def test_node_selector_semantics() -> None:
    n = node("n1", {"zone": "a", "size": "5"})
    assert admission.node_matches(
        n, [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
    )
    assert not admission.node_matches(
        n, [{"matchExpressions": [{"key": "size", "operator": "Gt", "values": ["7"]}]}]
    )
    assert admission.node_matches(
        n, [{}, {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]
    )
    assert not admission.node_matches(n, [{}])


# -- TLS ------------------------------------------------------------------------------------------
NOW = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
HOSTS = ["modelcache-webhook.kserve.svc", "modelcache-webhook.kserve.svc.cluster.local"]


def test_tls_new_then_keep_then_renew() -> None:
    assert tls.plan(None, HOSTS, NOW) is tls.Action.NEW
    m = tls.apply(tls.Action.NEW, None, HOSTS, NOW)
    assert tls.Material.from_secret_data(m.to_secret_data()) == m
    assert tls.plan(m, HOSTS, NOW) is tls.Action.KEEP
    assert tls.plan(m, [*HOSTS, "other"], NOW) is tls.Action.RENEW_CERT
    later = NOW + tls.CERT_LIFETIME - tls.CERT_RENEW_BEFORE + dt.timedelta(days=1)
    assert tls.plan(m, HOSTS, later) is tls.Action.RENEW_CERT
    renewed = tls.apply(tls.Action.RENEW_CERT, m, HOSTS, later)
    assert renewed.ca_bundle == m.ca_bundle  # no caBundle change on a certificate renewal
    assert tls.plan(renewed, HOSTS, later) is tls.Action.KEEP
    cert = x509.load_pem_x509_certificate(renewed.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(n.value) for n in names) == sorted(HOSTS)


def test_tls_ca_rotation_keeps_old_ca_trusted_until_expiry() -> None:
    m = tls.apply(tls.Action.NEW, None, HOSTS, NOW)
    near_end = NOW + tls.CA_LIFETIME - tls.CA_RENEW_BEFORE + dt.timedelta(days=1)
    assert tls.plan(m, HOSTS, near_end) is tls.Action.ROTATE_CA
    rotated = tls.apply(tls.Action.ROTATE_CA, m, HOSTS, near_end)
    cas = x509.load_pem_x509_certificates(rotated.ca_bundle)
    assert len(cas) == 2 and cas[1].public_bytes(tls.serialization.Encoding.PEM) == m.ca_bundle
    # the serving certificate switches to the new CA at its next renewal
    renewed = tls.apply(tls.Action.RENEW_CERT, rotated, HOSTS, near_end)
    x509.load_pem_x509_certificate(renewed.cert).verify_directly_issued_by(cas[0])
    after_old = NOW + tls.CA_LIFETIME + dt.timedelta(days=1)
    pruned = tls.apply(tls.Action.RENEW_CERT, renewed, HOSTS, after_old)
    assert len(x509.load_pem_x509_certificates(pruned.ca_bundle)) == 1


def test_tls_garbage_means_new() -> None:
    junk = tls.Material(b"x", b"y", b"z", b"w")
    assert tls.plan(junk, HOSTS, NOW) is tls.Action.NEW
    assert tls.Material.from_secret_data({"tls.crt": "eA=="}) is None
    assert tls.hosts_for(None, "kserve", "127.0.0.1") == ["127.0.0.1", "localhost"]


# -- shipped configurations -----------------------------------------------------------------------
def test_deploy_manifest_matches_registration() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "webhook.yaml").read_text()) if d]
    shipped = {d["kind"]: d for d in docs}
    validating, mutating = registration.configurations(service=("kserve", "modelcache-webhook"))
    for ours in (validating, mutating):
        assert shipped[ours["kind"]]["webhooks"] == ours["webhooks"], ours["kind"]
        assert shipped[ours["kind"]]["metadata"]["name"] == registration.CONFIGURATION_NAME
    policies = {w["name"]: w["failurePolicy"] for d in (validating, mutating) for w in d["webhooks"]}
    assert policies == {
        "localmodelcaches.validate.modelcache.io": "Fail",
        "localmodelnodegroups.validate.modelcache.io": "Fail",
        "inferenceservices.mutate.modelcache.io": "Ignore",
        "pods.mutate.modelcache.io": "Ignore",
    }
    pod_hook = mutating["webhooks"][1]
    assert pod_hook["objectSelector"]["matchExpressions"][0]["values"] == [registration.APP_NAME]
    deployment = shipped["Deployment"]
    assert (
        deployment["spec"]["template"]["metadata"]["labels"][registration.APP_LABEL] == registration.APP_NAME
    )


def test_deploy_rbac_names_match() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac" / "webhook.yaml").read_text()) if d]
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("modelcache-webhook-tls" in (r.get("resourceNames") or []) for r in role["rules"])
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    names = [
        r.get("resourceNames")
        for r in cluster_role["rules"]
        if "admissionregistration.k8s.io" in r["apiGroups"]
    ]
    assert names == [[registration.CONFIGURATION_NAME]]


# -- the HTTP layer (no apiserver: a stub reader) -------------------------------------------------
class StubReader:
    def __init__(self, state: Cluster | None = None, fail: bool = False) -> None:
        self.state, self.fail = state or Cluster(), fail
        self.recorded: list[admission.EventNote] = []

    async def read(self, request: Obj, needs: admission.Reads) -> Cluster:
        if self.fail:
            raise RuntimeError("apiserver unreachable")
        return self.state

    async def record(self, note: admission.EventNote) -> None:
        self.recorded.append(note)


def post(reader: StubReader, path: str, request: Obj) -> Obj:
    from aiohttp.test_utils import TestClient, TestServer

    from modelcache.webhook.server import Webhook

    async def go() -> Obj:
        hook = Webhook(reader, Options())  # type: ignore[arg-type]
        async with TestClient(TestServer(hook.app())) as client:
            resp = await client.post(path, json={"apiVersion": "admission.k8s.io/v1", "request": request})
            assert resp.status == 200
            body: Obj = await resp.json()
            await asyncio.sleep(0)  # let the event task run
            return body

    return asyncio.run(go())


def test_server_answers_admission_reviews() -> None:
    body = post(
        StubReader(cluster()), registration.PATH_CACHES, req("LocalModelCache", "CREATE", cache("x", uri="x"))
    )
    assert body["kind"] == "AdmissionReview"
    assert body["response"]["uid"] == "u-1" and body["response"]["allowed"] is False
    assert "needs a scheme" in body["response"]["status"]["message"]


def test_server_errors_block_validation_but_never_mutation() -> None:
    broken = StubReader(fail=True)
    denied = post(broken, registration.PATH_CACHES, req("LocalModelCache", "CREATE", cache("x")))["response"]
    assert denied["allowed"] is False and denied["status"]["code"] == 500
    assert "could not check this request: RuntimeError: apiserver unreachable" in denied["status"]["message"]
    admitted = post(broken, registration.PATH_PODS, req("Pod", "CREATE", kserve_pod(), namespace="default"))
    assert admitted["response"]["allowed"] is True and "patch" not in admitted["response"]
    assert "did not mutate" in admitted["response"]["warnings"][0]


def test_server_records_events() -> None:
    reader = StubReader(cluster())
    body = post(reader, registration.PATH_PODS, req("Pod", "CREATE", kserve_pod(), namespace="default"))
    assert body["response"]["allowed"] is True and body["response"]["warnings"]
    assert [n.reason for n in reader.recorded] == ["LocalModelNotReady"]


def test_cert_manager_mode_reads_and_reloads_mounted_files(tmp_path: Path) -> None:
    from modelcache.webhook.server import Certificates, ServerConfig

    def write(m: tls.Material) -> None:
        (tmp_path / "tls.crt").write_bytes(m.cert)
        (tmp_path / "tls.key").write_bytes(m.key)

    write(tls.apply(tls.Action.NEW, None, HOSTS, tls.now_utc()))
    certs = Certificates(ServerConfig(cert_dir=tmp_path), client=None)
    asyncio.run(certs.refresh())
    first = certs._mtime
    asyncio.run(certs.publish())  # no Secret, no caBundle management: nothing to do, no client used
    write(tls.apply(tls.Action.NEW, None, HOSTS, tls.now_utc()))
    os.utime(tmp_path / "tls.crt", (first + 10, first + 10))
    asyncio.run(certs.refresh())
    assert certs._mtime == first + 10
    certs.close()


def test_caches_being_deleted_match_nothing() -> None:
    going = cache("llama")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    state = cluster(
        caches=[going], local_model_config=ENABLED, nodes=[node("n1", {"pool": "workers", **READY})]
    )
    assert LOCALMODEL_LABEL not in (mutated(isvc("chat"), state)["metadata"].get("labels") or {})
    assert (
        "no LocalModelNamespaceCache" in pod_review(plain_pod({MODEL_ANNOTATION: "llama"}), state).warnings[0]
    )


def test_caches_of_the_same_uri_share_one_copy_on_disk() -> None:
    state = cluster(node_groups={"workers": group(limit="100Gi")}, caches=[cache("global", size="80Gi")])
    same = cache("mine", size="80Gi", namespace="team")  # namespace caches may repeat a cluster URI
    assert review(req("LocalModelNamespaceCache", "CREATE", same, namespace="team"), state).allowed
    bigger = cache("mine", size="90Gi", namespace="team")
    assert review(req("LocalModelNamespaceCache", "CREATE", bigger, namespace="team"), state).allowed
    larger = cache("mine", size="101Gi", namespace="team")
    assert not review(req("LocalModelNamespaceCache", "CREATE", larger, namespace="team"), state).allowed


def test_rerun_after_other_webhooks_appended_is_a_no_op() -> None:
    state = cluster(nodes=[node("n1", {"pool": "workers", **READY})])
    out = apply_patch(kserve_pod(), pod_review(kserve_pod(), state).patch)
    out["spec"]["volumes"].append({"name": "istio-envoy", "emptyDir": {}})
    out["spec"]["containers"][0]["volumeMounts"].append({"name": "istio-envoy", "mountPath": "/etc/istio"})
    assert pod_review(out, state).patch == []


def test_plain_pod_node_group_annotation() -> None:
    state = cluster(
        caches=[cache("llama", groups=["workers", "gpus"])],
        node_groups={"gpus": group("gpus"), "workers": group("workers")},
        nodes=[node("g1", {"pool": "gpus", **READY})],
    )
    pod = plain_pod({MODEL_ANNOTATION: "llama", NODEGROUP_ANNOTATION: "gpus"})
    out = apply_patch(pod, pod_review(pod, state).patch)
    assert out["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llama-gpus"
    # without the annotation: the first group (where the controller creates the PVC), not ready there
    assert pod_review(plain_pod({MODEL_ANNOTATION: "llama"}), state).patch == LABEL_ONLY
    wrong = pod_review(plain_pod({MODEL_ANNOTATION: "llama", NODEGROUP_ANNOTATION: "cpu"}), state)
    assert "is not on node group cpu" in wrong.warnings[0]


# -- hostile input (issue 9) ----------------------------------------------------------------------
SECRET_URIS = [
    "https://user:pa#ss@host/m.bin",
    "https://user:pa/ss@host/m.bin",
    "https://user:pa?ss@host/m.bin",
    "https://user:pa@ss@host/m.bin",
    "s3://AKIA:pass-ss@bucket/x",
    "https://host/m.bin?X-Amz-Signature=pass-ss&x=1",
    "https://host/m.bin?password=pass-ss",
    "gs://bucket/x?client_secret=pass-ss",
]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_no_secret_of_a_uri_reaches_a_message(uri: str) -> None:
    """Deny messages and warnings carry URIs only through `redact` (and no parser detail that
    quotes a piece of a password)."""
    bad = cache("c", uri=uri, groups=["missing"])
    other = cache("other", uri=uri)
    state = cluster(caches=[other])
    messages = [
        review(req("LocalModelCache", "CREATE", bad), state).message,
        review(req("LocalModelCache", "UPDATE", cache("other", uri="hf://o/m"), other), state).message,
        review(req("LocalModelCache", "CREATE", cache("dup", uri=uri)), state).message,
    ]
    pod = kserve_pod(storage_uri=uri + "x")  # not under the cache's URI: the warning names both
    pod["metadata"]["annotations"][LOCALMODEL_SOURCEURI_ANNOTATION] = uri
    messages += review(req("Pod", "CREATE", pod, namespace="default"), state).warnings
    assert all(messages), messages
    for message in messages:
        assert "ss@" not in message and "pass-ss" not in message and "'pa'" not in message, message


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"request": 5}', "request must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b"\xff", "not UTF-8"),
        (b'{"request": {"uid": "u", "kind": {"kind": 1}, "operation": "CREATE"}}', "request.kind"),
        (b'{"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": 7}}', "operation"),
        (
            b'{"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": "x"}}',
            "object",
        ),
        (
            b'{"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "dryRun": "no"}}',
            "dryRun",
        ),
        (b'{"kind": "ConversionReview", "request": {}}', "kind"),
    ],
)
def test_parse_review_refuses_malformed_bodies_in_one_line(body: bytes, reason: str) -> None:
    with pytest.raises(admission.MalformedReview) as info:
        admission.parse_review(body)
    assert reason in info.value.reason and "\n" not in info.value.reason


def test_parse_review_accepts_what_the_apiserver_sends() -> None:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": req("Pod", "CREATE", kserve_pod()),
    }
    assert admission.parse_review(json.dumps(body).encode())["uid"] == "u-1"


def test_wrong_types_inside_objects_read_as_absent() -> None:
    state = cluster(caches=[cache("llama")], nodes=[node("n1", {"pool": "workers", **READY})])
    for obj in (
        {"metadata": 5},
        {"metadata": {"labels": [1], "annotations": {MODEL_ANNOTATION: ["llama"]}}},
        {"metadata": {"annotations": {MODEL_ANNOTATION: "llama"}}, "spec": {"containers": [5, {"name": 3}]}},
    ):
        request = {
            "uid": "u",
            "kind": {"kind": "Pod"},
            "operation": "CREATE",
            "namespace": "d",
            "object": obj,
        }
        assert review(request, state).allowed
    group_spec = {"metadata": {"name": "g"}, "spec": {"persistentVolumeSpec": [], "storageLimit": {}}}
    denied = review(req("LocalModelNodeGroup", "CREATE", group_spec), state)
    assert not denied.allowed and "storageLimit" in denied.message
    weird = {"metadata": {"name": "c"}, "spec": {"sourceModelUri": 5, "modelSize": True, "nodeGroups": [1]}}
    assert not review(req("LocalModelCache", "CREATE", weird), state).allowed
