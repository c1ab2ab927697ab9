"""Issue 11 item 7: KServe-style download Jobs for URIs our engine does not read (pure decisions)."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelcache import domain
from modelcache.agent import plan as agent_plan
from modelcache.api.types import LocalModelNodeSpec
from modelcache.controller import jobs as j
from modelcache.controller import reconcile as r
from modelcache.kube.config import LocalModelConfig
from modelcache.uri import storage_key

HDFS = "hdfs://namenode:8020/models/llama"
CUSTOM = "myproto://bucket/model"
CONFIG = LocalModelConfig(jobNamespace="jobs")
CSC: dict[str, Any] = {
    "metadata": {"name": "myproto"},
    "spec": {
        "workloadType": "localModelDownloadJob",
        "supportedUriFormats": [{"prefix": "myproto://"}],
        "container": {"name": "dl", "image": "example/dl:1", "env": [{"name": "A", "value": "b"}]},
    },
}


def entry(uri: str = HDFS, reported: str = "", namespace: str = "", node: str = "n1") -> j.JobEntry:
    return j.JobEntry(node, "uid-1", namespace, "llama", uri, "gpus", reported)


def test_who_downloads_is_one_rule() -> None:
    assert domain.needs_download_job(HDFS) and domain.needs_download_job("WebHDFS://nn/m")
    for uri in ("hf://org/m", "s3://b/k", "https://h/m.bin", "/abs/path", "oci://r/i:t", ""):
        assert not domain.needs_download_job(uri), uri
    assert domain.job_download_problem(HDFS, []) is None
    assert domain.job_download_problem(CUSTOM, [CSC]) is None
    assert "ClusterStorageContainer" in (domain.job_download_problem(CUSTOM, []) or "")
    disabled = {**CSC, "disabled": True}
    assert domain.job_download_problem(CUSTOM, [disabled]) is not None


def test_job_is_shaped_as_kserves_agent_launches_it() -> None:
    job = j.download_job(entry(), [], CONFIG)
    meta, spec = job["metadata"], job["spec"]
    assert (meta["name"], meta["namespace"]) == ("llama-n1", "jobs")
    assert meta["labels"]["model"] == "llama" and meta["labels"]["node"] == "n1"
    assert meta["ownerReferences"][0]["kind"] == "LocalModelNode"
    assert spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    assert pod["nodeName"] == "n1" and pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"fsGroup": 1000}
    assert pod["volumes"] == [
        {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": "llama-gpus"}}
    ]
    (container,) = pod["containers"]
    assert container["image"] == "kserve/storage-initializer:latest"
    assert container["name"] == "kserve-localmodel-download"
    assert container["args"] == [HDFS, "/mnt/models"]
    assert container["volumeMounts"][0]["subPath"] == f"models/{storage_key(HDFS)}"


def test_storage_container_image_and_config_values() -> None:
    config = LocalModelConfig(jobNamespace="jobs", fsGroup=None, jobTTLSecondsAfterFinished=60)
    job = j.download_job(entry(CUSTOM), [CSC], config)
    pod = job["spec"]["template"]["spec"]
    assert "securityContext" not in pod and job["spec"]["ttlSecondsAfterFinished"] == 60
    container = pod["containers"][0]
    assert (container["name"], container["image"], container["env"]) == (
        "dl",
        "example/dl:1",
        [{"name": "A", "value": "b"}],
    )
    assert CSC["spec"]["container"].get("args") is None  # the storage container was not modified


def test_namespace_cache_job_and_pvc_names() -> None:
    e = entry(namespace="team")
    job = j.download_job(e, [], CONFIG)
    assert job["metadata"]["annotations"][j.STATUS_KEY_ANNOTATION] == "team/llama"
    assert job["metadata"]["name"].startswith("team-llama-n1-") and len(job["metadata"]["name"]) <= 63
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == (
        "llama-gpus-team-download"
    )
    long = j.JobEntry("n" * 60, "", "", "m" * 200, HDFS, "g", "")
    assert (
        len(j.job_name(long)) <= 63 and "ownerReferences" not in j.download_job(long, [], CONFIG)["metadata"]
    )


def observed_job(state: dict[str, int], key: str = "llama", node: str = "n1") -> j.DownloadJob:
    return j.DownloadJob("jobs", f"{key}-{node}", node, key, "2026-01-01T00:00:00Z", **state)


def test_plan_creates_then_follows_the_job() -> None:
    first = j.plan_jobs([entry()], [], [], CONFIG)
    assert [b["metadata"]["name"] for b in first.creates] == ["llama-n1"]
    assert first.statuses == {"n1": {"llama": "ModelDownloadPending"}}
    assert [n[3] for n in first.notes] == ["DownloadJobCreated"]
    for state, expected in (
        ({}, "ModelDownloadPending"),
        ({"active": 1}, "ModelDownloading"),
        ({"succeeded": 1}, "ModelDownloaded"),
        ({"failed": 1}, "ModelDownloadError"),
    ):
        step = j.plan_jobs([entry()], [observed_job(state)], [], CONFIG)
        assert not step.creates and not step.deletes
        assert step.statuses == {"n1": {"llama": expected}}
        same = j.plan_jobs([entry(reported=expected)], [observed_job(state)], [], CONFIG)
        assert not same.statuses and not same.creates  # converged
    # finished and removed by its TTL: nothing to do; entry gone: its Job is deleted
    assert not j.plan_jobs([entry(reported="ModelDownloaded")], [], [], CONFIG).creates
    assert j.plan_jobs([], [observed_job({})], [], CONFIG).deletes == [("jobs", "llama-n1")]
    # a scheme nothing can read still gets KServe's default image, and a warning
    bogus = j.plan_jobs([entry("nope://x/y")], [], [], CONFIG)
    assert [n[3] for n in bogus.notes] == ["DownloadJobCreated", "NoDownloadImage"]


def test_reconcile_plan_runs_jobs_for_lmn_entries_and_agent_leaves_them() -> None:
    cache = r.cache_from(
        {
            "kind": "LocalModelCache",
            "metadata": {"name": "llama", "uid": "c1", "finalizers": ["localmodel.kserve.io/finalizer"]},
            "spec": {"sourceModelUri": HDFS, "modelSize": "1Gi", "nodeGroups": ["gpus"]},
        }
    )
    group = r.group_from(
        {
            "metadata": {"name": "gpus", "uid": "g1"},
            "spec": {
                "storageLimit": "10Gi",
                "persistentVolumeSpec": {
                    "local": {"path": "/models"},
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
                            ]
                        }
                    },
                },
            },
        }
    )
    mn = r.ModelNode("n1", (cache.entry("gpus"),), {}, uid="u1")
    obs = r.Observed(
        namespace="kserve",
        config=CONFIG,
        nodes={"n1": r.Node("n1", {"pool": "gpu"}, True)},
        groups={"gpus": group},
        caches=[cache],
        model_nodes={"n1": mn},
        jobs=[],
    )
    out = r.plan(obs, "2026-01-01T00:00:00Z")
    assert [b["metadata"]["name"] for b in out.job_creates] == ["llama-n1"]
    assert out.lmn_status == {"n1": {"llama": "ModelDownloadPending"}}
    assert any(e.reason == "DownloadJobCreated" for e in out.events)
    unlisted = r.plan(dataclasses.replace(obs, jobs=None), "2026-01-01T00:00:00Z")
    assert not unlisted.job_creates and not unlisted.lmn_status  # Jobs not listed: left alone

    spec = LocalModelNodeSpec.model_validate(
        {
            "localModels": [
                {"modelName": "llama", "sourceModelUri": HDFS},
                {"modelName": "b", "sourceModelUri": "hf://o/m"},
            ]
        }
    )
    assert [e.info.modelName for e in agent_plan.entries(spec)] == ["b"]
    assert agent_plan.status_keys(spec) == {"llama", "b"}  # the agent never nulls the Job's status
