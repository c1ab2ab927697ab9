"""Issue 11 items 10-12 and 7 on a playground of its own (controller, webhook, agent as processes)
whose API server has no LLMInferenceService CRD. The tests run in order and share its objects.

- 11: the controller watches only the pods our webhook labelled, still finds pods that ask for a
  cache from before the label existed, and works without that CRD.
- 10: a jobNamespace other than KServe's default: download PVCs and the agents' RBAC follow it.
- 12: controller-runtime's reconcile, workqueue and webhook metrics, scraped.
- 7: KServe-style download Jobs for schemes our engine does not read (no kubelet: the Jobs never
  run; their spec is checked, and their status, written by hand, reaches the caches).

No timed assertions: absence is checked once the controller reports a converged pass after the
object that would have changed its plan was created.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client, codecs
from lightkube.generic_resource import create_global_resource
from lightkube.models.authorization_v1 import ResourceAttributes, SubjectAccessReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.authorization_v1 import SubjectAccessReview
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import ConfigMap, Event, Namespace, Node, PersistentVolumeClaim, Pod
from lightkube.types import PatchType
from prometheus_client.parser import text_string_to_metric_families

from modelcache import data
from modelcache.dev import ControlPlaneInfo
from modelcache.dev.controlplane import Layout, down, up
from modelcache.kube.constants import MODEL_ANNOTATION, MODEL_POD_LABEL
from modelcache.uri import storage_key

from .support import leftover_processes, require_binaries

pytestmark = pytest.mark.e2e
LMC = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
LMNG = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups")
LMN = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNode", "localmodelnodes")
CSC = create_global_resource(
    "serving.kserve.io", "v1alpha1", "ClusterStorageContainer", "clusterstoragecontainers"
)
LLMISVC_CRD = "llminferenceservices.serving.kserve.io"
CACHE, GROUP = "sel-llama", "sel-group"
PVC = f"{CACHE}-{GROUP}"
REPO = Path(__file__).resolve().parents[2]
AGENT_SA = "system:serviceaccount:kserve:modelcache-agent"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except ApiError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def pod(name: str, namespace: str, labels: dict[str, str] | None = None) -> Pod:
    return Pod.from_dict(
        {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels or {},
                "annotations": {MODEL_ANNOTATION: CACHE},
            },
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        }
    )


def pvc_live(kube: Client, namespace: str, name: str = PVC) -> bool:
    """The serving PVC exists and is not on its way out (no controller-manager removes its finalizer)."""
    try:
        found = kube.get(PersistentVolumeClaim, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return False
        raise
    return found.metadata is not None and found.metadata.deletionTimestamp is None


def component_port(home: Path, name: str, flag: str) -> int:
    state = json.loads(Layout(home).state.read_text())
    argv = next(c["argv"] for c in state["components"] if c["name"] == name)
    return int(argv[argv.index(flag) + 1])


def readyz(home: Path) -> str:
    port = component_port(home, "controller", "--health-port")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
        return str(resp.read().decode())


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text endpoint (TLS not verified: the webhook's own CA)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def passes(home: Path) -> int:
    return int(readyz(home).split("passes=")[1].split()[0])


def converged_after(home: Path, since: int) -> None:
    """A pass that started after `since` passes and wrote nothing: the plan saw everything so far."""
    wait_for("a converged pass", lambda: passes(home) > since + 1 and "converged=True" in readyz(home))


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Client, ControlPlaneInfo]]:
    """KServe's CRDs without the LLMInferenceService stand-in, ours, one node; a short resync."""
    require_binaries()
    home = tmp_path_factory.mktemp("sel-home")
    kserve = home / "kserve-crds"
    kserve.mkdir()
    for crd in data.kserve_crds_dir().iterdir():
        if "llminferenceservices" not in crd.name:
            shutil.copy(crd, kserve / crd.name)
    dirs = [kserve, data.crds_dir()]
    info = up(home, 1, manifest_dirs=dirs)
    try:
        with info.client() as kube:
            yield home, kube, info
    finally:
        down(home)
        assert not leftover_processes(home)


def test_pods_by_label_legacy_pods_and_no_llmisvc_crd(
    playground: tuple[Path, Client, ControlPlaneInfo],
) -> None:
    home, kube, info = playground
    with pytest.raises(ApiError):
        kube.get(CustomResourceDefinition, LLMISVC_CRD)
    for ns, labels in (
        ("sel-old", {}),
        ("sel-web", {}),
        ("sel-optout", {"modelcache.io/webhook": "disabled"}),
    ):
        kube.create(Namespace(metadata=ObjectMeta(name=ns, labels=labels)))
    kube.create(
        LMNG(
            {
                "metadata": {"name": GROUP},
                "spec": {
                    "storageLimit": "1Gi",
                    "persistentVolumeClaimSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                    "persistentVolumeSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "capacity": {"storage": "1Gi"},
                        "local": {"path": "/models"},
                        "nodeAffinity": {
                            "required": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "kubernetes.io/hostname",
                                                "operator": "In",
                                                "values": ["sel-node"],
                                            }
                                        ]
                                    }
                                ]
                            }
                        },
                    },
                },
            }
        )
    )
    kube.create(
        LMC(
            {
                "metadata": {"name": CACHE},
                "spec": {
                    "sourceModelUri": "https://127.0.0.1:9/sel/model.bin",
                    "modelSize": "10Mi",
                    "nodeGroups": [GROUP],
                },
            }
        )
    )
    # a node without an agent process: the cache's status stays still (Pending), so passes converge
    kube.create(Node(metadata=ObjectMeta(name="sel-node", labels={"kubernetes.io/hostname": "sel-node"})))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now}
    kube.patch(Node.Status, "sel-node", {"status": {"conditions": [{**ready, "lastTransitionTime": now}]}})
    # a pod from before the label existed (no webhook yet): nobody labels it
    kube.create(pod("legacy", "sel-old"))

    up(home, 1, manifest_dirs=[home / "kserve-crds", data.crds_dir()], with_components=True)
    # (after `up`, which writes KServe's defaults) a short resync: the sweep re-lists that often
    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    local = {**json.loads((cm.data or {})["localModel"]), "reconcilationFrequencyInSecs": 2}
    kube.patch(
        ConfigMap, "inferenceservice-config", {"data": {"localModel": json.dumps(local)}}, namespace="kserve"
    )

    # the start-up sweep finds the unlabelled pod: its namespace gets the serving PVC
    wait_for("serving PVC for the unlabelled pod", lambda: pvc_live(kube, "sel-old"))
    # the webhook labels a new pod; the label-selected watch sees it
    kube.create(pod("new", "sel-web"))
    labels = kube.get(Pod, "new", namespace="sel-web").metadata.labels or {}
    assert labels.get(MODEL_POD_LABEL) == "true"
    wait_for("serving PVC for the labelled pod", lambda: pvc_live(kube, "sel-web"))

    # a pod the webhook did not see (namespace opted out) is invisible to the watch
    kube.create(pod("unseen", "sel-optout"))
    converged_after(home, passes(home))
    assert not pvc_live(kube, "sel-optout")

    # the legacy pod goes: the sweep's next listing drops it, its PVC is deleted, the sweep ends
    kube.delete(Pod, "legacy", namespace="sel-old")
    wait_for("serving PVC of the gone pod deleted", lambda: not pvc_live(kube, "sel-old"))
    log = (info.logs / "controller.log").read_text()
    wait_for("sweep over", lambda: "pods are watched by label" in (info.logs / "controller.log").read_text())
    assert "Traceback" not in log
    assert pvc_live(kube, "sel-web")
    status = kube.get(LMC, CACHE).get("status") or {}
    assert status["copies"] == {"total": 1, "available": 0, "failed": 0}
    assert status["nodeStatus"] == {"sel-node": "NodeDownloadPending"}


def agent_may_read_secrets(kube: Client, namespace: str) -> bool:
    return allowed(kube, AGENT_SA, namespace, "get", "secrets")


def allowed(kube: Client, user: str, namespace: str, verb: str, resource: str, group: str = "") -> bool:
    review = SubjectAccessReview(
        spec=SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:serviceaccounts:kserve", "system:authenticated"],
            resourceAttributes=ResourceAttributes(
                namespace=namespace, verb=verb, resource=resource, group=group
            ),
        )
    )
    done = kube.create(review)
    return bool(done.status and done.status.allowed)


def test_job_namespace_other_than_default(playground: tuple[Path, Client, ControlPlaneInfo]) -> None:
    home, kube, _info = playground
    jobs = "sel-jobs"
    kube.create(Namespace(metadata=ObjectMeta(name=jobs)))
    # deploy/rbac as the README says: agent.yaml, then job-namespace/ into the configured namespace
    for doc in yaml.safe_load_all((REPO / "deploy/rbac/agent.yaml").read_text()):
        kube.apply(codecs.from_dict(doc), field_manager="e2e", force=True)
    for doc in yaml.safe_load_all((REPO / "deploy/rbac/job-namespace/agent-credentials.yaml").read_text()):
        kube.apply(codecs.from_dict(doc), namespace=jobs, field_manager="e2e", force=True)
    default_jobs = "kserve-localmodel-jobs"
    assert pvc_live(kube, default_jobs)  # the download PVC where KServe's default put it

    cm = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    local = {**json.loads((cm.data or {})["localModel"]), "jobNamespace": jobs}
    kube.patch(
        ConfigMap, "inferenceservice-config", {"data": {"localModel": json.dumps(local)}}, namespace="kserve"
    )

    wait_for("download PVC in the new jobNamespace", lambda: pvc_live(kube, jobs))
    wait_for("download PVC gone from the old one", lambda: not pvc_live(kube, default_jobs))
    claim = kube.get(PersistentVolumeClaim, PVC, namespace=jobs)
    assert claim.spec is not None and claim.spec.volumeName == f"{PVC}-download"
    assert (claim.metadata.labels or {}).get("modelcache.io/volume-role") == "download"
    # the agents may read credentials there, and only there
    assert agent_may_read_secrets(kube, jobs)
    assert not agent_may_read_secrets(kube, default_jobs)
    assert not agent_may_read_secrets(kube, "sel-web")
    check = subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", "kserve", "check", "--kubeconfig",
         str(home / "dev" / "kubeconfig")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "jobNamespace" not in check.stdout, check.stdout


def test_controller_runtime_metrics_scraped(playground: tuple[Path, Client, ControlPlaneInfo]) -> None:
    home, kube, _info = playground
    kube.create(pod("scraped", "sel-web"))  # one more pod admission, surely after the webhook started
    c = (("controller", "localmodelcache"),)
    q = (*c, ("name", "localmodelcache"))
    controller = scrape(f"http://127.0.0.1:{component_port(home, 'controller', '--health-port')}/metrics")
    assert controller[("controller_runtime_reconcile_total", (*c, ("result", "success")))] >= 1
    assert ("controller_runtime_reconcile_total", (*c, ("result", "error"))) in controller
    assert ("controller_runtime_reconcile_errors_total", c) in controller
    assert controller[("controller_runtime_reconcile_time_seconds_count", c)] >= 1
    assert ("controller_runtime_reconcile_time_seconds_bucket", (*c, ("le", "+Inf"))) in controller
    assert controller[("controller_runtime_max_concurrent_reconciles", c)] == 1
    assert controller[("workqueue_adds_total", q)] >= 1
    assert controller[("workqueue_work_duration_seconds_count", q)] >= 1
    for name in (
        "workqueue_depth",
        "workqueue_retries_total",
        "workqueue_unfinished_work_seconds",
        "workqueue_longest_running_processor_seconds",
        "workqueue_queue_duration_seconds_count",
    ):
        assert (name, q) in controller, name

    webhook = scrape(f"https://127.0.0.1:{component_port(home, 'webhook', '--port')}/metrics")
    pods = ("webhook", "/mutate/pods")
    assert webhook[("controller_runtime_webhook_requests_total", (("code", "200"), pods))] >= 1
    assert webhook[("controller_runtime_webhook_latency_seconds_count", (pods,))] >= 1
    assert webhook[("controller_runtime_webhook_requests_in_flight", (pods,))] == 0


def make_group(kube: Client, name: str, node: str) -> None:
    affinity = {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
    kube.create(
        LMNG(
            {
                "metadata": {"name": name},
                "spec": {
                    "storageLimit": "1Gi",
                    "persistentVolumeClaimSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                    "persistentVolumeSpec": {
                        "accessModes": ["ReadWriteOnce"],
                        "capacity": {"storage": "1Gi"},
                        "local": {"path": "/models"},
                        "nodeAffinity": {
                            "required": {"nodeSelectorTerms": [{"matchExpressions": [affinity]}]}
                        },
                    },
                },
            }
        )
    )


def model_status(kube: Client, node: str) -> dict[str, str]:
    status: dict[str, str] = (kube.get(LMN, node).get("status") or {}).get("modelStatus") or {}
    return status


def test_download_jobs_for_schemes_we_do_not_read(playground: tuple[Path, Client, ControlPlaneInfo]) -> None:
    home, kube, _info = playground
    jobs = "sel-jobs"  # the jobNamespace the previous test configured
    hdfs, custom = "hdfs://namenode:8020/models/llama", "myproto://bucket/model"
    # the controller's RBAC follows jobNamespace like the agents' (deploy/rbac/job-namespace/)
    controller_sa = "system:serviceaccount:kserve:modelcache-controller"
    for doc in yaml.safe_load_all((REPO / "deploy/rbac/controller.yaml").read_text()):
        kube.apply(codecs.from_dict(doc), field_manager="e2e", force=True)
    for doc in yaml.safe_load_all((REPO / "deploy/rbac/job-namespace/controller-jobs.yaml").read_text()):
        kube.apply(codecs.from_dict(doc), namespace=jobs, field_manager="e2e", force=True)
    assert allowed(kube, controller_sa, jobs, "create", "jobs", "batch")
    assert not allowed(kube, controller_sa, "default", "create", "jobs", "batch")

    kube.create(
        CSC(
            {
                "metadata": {"name": "sel-myproto"},
                "spec": {
                    "workloadType": "localModelDownloadJob",
                    "supportedUriFormats": [{"prefix": "myproto://"}],
                    "container": {
                        "name": "myproto-dl",
                        "image": "example.org/myproto-downloader:1.0",
                        "env": [{"name": "MYPROTO_ENDPOINT", "value": "http://127.0.0.1:9"}],
                    },
                },
            }
        )
    )
    # dev-node-1 runs an agent process: it must leave the Job's entry (and status) alone
    make_group(kube, "sel-dev", "dev-node-1")
    for name, uri, groups in (("sel-hdfs", hdfs, [GROUP, "sel-dev"]), ("sel-custom", custom, [GROUP])):
        kube.create(
            LMC(
                {
                    "metadata": {"name": name},
                    "spec": {"sourceModelUri": uri, "modelSize": "10Mi", "nodeGroups": groups},
                }
            )
        )

    def job(name: str) -> Job:
        return kube.get(Job, name, namespace=jobs)

    hdfs_job = wait_for("hdfs Job", lambda: job("sel-hdfs-sel-node"))
    wait_for("hdfs Job on the agent's node", lambda: job("sel-hdfs-dev-node-1"))
    custom_job = wait_for("storage-container Job", lambda: job("sel-custom-sel-node"))

    spec = hdfs_job.to_dict()["spec"]
    meta = hdfs_job.to_dict()["metadata"]
    assert meta["labels"]["model"] == "sel-hdfs" and meta["labels"]["node"] == "sel-node"
    assert (
        meta["ownerReferences"][0]["kind"] == "LocalModelNode"
        and meta["ownerReferences"][0]["name"] == "sel-node"
    )
    # 1.20 drops this field (TTLAfterFinished is alpha, gate off; beta from 1.21): we send 3600,
    # as the unit test shows; a newer apiserver keeps it
    assert spec.get("ttlSecondsAfterFinished", 3600) == 3600
    pod = spec["template"]["spec"]
    assert pod["nodeName"] == "sel-node" and pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"fsGroup": 1000}
    assert pod["volumes"] == [
        {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": PVC.replace(CACHE, "sel-hdfs")}}
    ]
    (container,) = pod["containers"]
    assert container["image"] == "kserve/storage-initializer:latest"
    assert container["args"] == [hdfs, "/mnt/models"]
    assert container["volumeMounts"] == [
        {"name": "kserve-pvc-source", "mountPath": "/mnt/models", "subPath": f"models/{storage_key(hdfs)}"}
    ]
    (custom_container,) = custom_job.to_dict()["spec"]["template"]["spec"]["containers"]
    assert custom_container["image"] == "example.org/myproto-downloader:1.0"
    assert custom_container["name"] == "myproto-dl"
    assert custom_container["env"] == [{"name": "MYPROTO_ENDPOINT", "value": "http://127.0.0.1:9"}]
    # the download PVC the Jobs mount exists where they run
    wait_for("download PVC", lambda: pvc_live(kube, jobs, "sel-hdfs-sel-group"))

    # status: the Job's state is the entry's modelStatus, and the cache's nodeStatus
    wait_for(
        "Pending from the Job",
        lambda: model_status(kube, "sel-node").get("sel-hdfs") == "ModelDownloadPending",
    )
    events = {e.reason for e in kube.list(Event, namespace="default") if e.involvedObject.name == "sel-hdfs"}
    assert "DownloadJobCreated" in events
    kube.patch(
        Job.Status, "sel-hdfs-sel-node", {"status": {"active": 1}}, namespace=jobs, patch_type=PatchType.MERGE
    )
    wait_for(
        "Downloading",
        lambda: (
            (kube.get(LMC, "sel-hdfs").get("status") or {}).get("nodeStatus", {}).get("sel-node")
            == "NodeDownloading"
        ),
    )
    for name in ("sel-hdfs-sel-node", "sel-hdfs-dev-node-1"):
        kube.patch(
            Job.Status,
            name,
            {"status": {"active": 0, "succeeded": 1}},
            namespace=jobs,
            patch_type=PatchType.MERGE,
        )
    wait_for(
        "2/2 copies",
        lambda: (kube.get(LMC, "sel-hdfs").get("status") or {}).get("copies", {}).get("available") == 2,
    )
    converged_after(home, passes(home))
    assert model_status(kube, "dev-node-1").get("sel-hdfs") == "ModelDownloaded"  # the agent left it
    assert (kube.get(LMC, "sel-hdfs").get("status") or {})["nodeStatus"] == {
        "sel-node": "NodeDownloaded",
        "dev-node-1": "NodeDownloaded",
    }

    # the cache goes: its Job goes too
    kube.delete(LMC, "sel-custom")
    wait_for(
        "Job deleted with its entry",
        lambda: (
            not any((j.metadata.name or "") == "sel-custom-sel-node" for j in kube.list(Job, namespace=jobs))
        ),
    )
    agent_log = (Path(home) / "dev" / "logs" / "agent-dev-node-1.log").read_text()
    assert "hdfs" not in agent_log and "Traceback" not in agent_log
