"""The Helm chart: `helm lint --strict`, and `helm template` over a matrix of values with every rendered
object validated against the Kubernetes schemas (kubernetes-validate; custom kinds against their CRD
or, for cert-manager and the Prometheus operator, their identity only). The chart agrees with
deploy/*.yaml on RBAC and webhook rules, and its agent values reach the DaemonSet the controller builds.

helm comes from scripts/install-helm.sh (the Makefile runs it; cached in ~/.cache/modelcache/bin).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from modelcache import data
from modelcache.cli.controller import parse_agent_settings
from modelcache.controller.reconcile import NodeGroup, agent_daemonset
from modelcache.kube.config import LocalModelConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelcache"
HELM = Path(os.environ.get("MODELCACHE_HELM", Path.home() / ".cache" / "modelcache" / "bin" / "helm"))
#: Oldest and newest schemas kubernetes-validate ships (the chart itself allows >= 1.20).
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
IDENTITY_ONLY = {"cert-manager.io/v1", "monitoring.coreos.com/v1"}

MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "everything-on": [
        "--set", "webhook.tls.mode=certManager",
        "--set", "metrics.service.enabled=true",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=prom",
        "--set", "sharedCache.enabled=true",
        "--set", "sharedCache.pvc.storageClassName=nfs",
        "--set", "sharedCache.namespace=models",
        "--set", "kserveConfig.create=true",
        "--set", "imagePullSecrets[0].name=regcred",
        "--set", "controller.priorityClassName=system-cluster-critical",
        "--set", "controller.tolerations[0].operator=Exists",
    ],
    "minimal": [
        "--set", "webhook.enabled=false",
        "--set", "controller.replicas=1",
        "--set", "controller.leaderElection.enabled=false",
        "--set", "createJobNamespace=false",
        "--set", "jobNamespace=model-jobs",
        "--set", "namespace=ops",
        "--set", "image.tag=dev",
    ],
    "cert-manager-issuer": [
        "--set", "webhook.tls.mode=certManager",
        "--set", "webhook.tls.certManager.issuerRef.kind=ClusterIssuer",
        "--set", "webhook.tls.certManager.issuerRef.name=corp-ca",
        "--set", "webhook.whenNotReady=require",
    ],
    "agent-settings": [
        "--set", "agent.image.repository=registry.local/modelcache",
        "--set", "agent.image.tag=0.1.0-gpu",
        "--set", "agent.priorityClassName=system-node-critical",
        "--set", "agent.nodeSelector.pool=gpu",
        "--set", "agent.podSecurityContext.runAsUser=65532",
        "--set", "agent.extraArgs={--reserve,10Gi}",
        "--set", "agent.env[0].name=HF_ENDPOINT",
        "--set", "agent.env[0].value=http://hf-mirror",
        "--set", "agent.podAnnotations.team=ml",
    ],
}  # fmt: skip


def helm(*args: str) -> str:
    if not (HELM.is_file() and os.access(HELM, os.X_OK)):
        pytest.fail(f"helm not found at {HELM}: run scripts/install-helm.sh", pytrace=False)
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return result.stdout


def render(*values: str, namespace: str = "kserve") -> list[dict[str, Any]]:
    text = helm("template", "mc", str(CHART), "--namespace", namespace, "--include-crds", *values)
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for directory in (data.crds_dir(), data.kserve_crds_dir()):
        for path in directory.glob("*.yaml"):
            for crd in yaml.safe_load_all(path.read_text()):
                if not crd:
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


CRD_SCHEMAS = _crd_schemas()


def validate(doc: dict[str, Any]) -> None:
    api, kind = doc["apiVersion"], doc["kind"]
    assert doc.get("metadata", {}).get("name"), f"{kind} without a name"
    if (api, kind) in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[(api, kind)])
        return
    if api in IDENTITY_ONLY:
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind} {doc['metadata']['name']} (k8s {version}): {exc.message}") from None


def test_lint_strict() -> None:
    helm("lint", "--strict", str(CHART))
    for values in MATRIX.values():
        helm("lint", "--strict", str(CHART), *values)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_rendered_objects_are_valid(case: str) -> None:
    docs = render(*MATRIX[case])
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole"} <= kinds
    for doc in docs:
        validate(doc)
    # The agent DaemonSet is not rendered but built by the controller from these values: check it too.
    controller = by_kind(docs, "Deployment")["modelcache-controller"]
    env = {e["name"]: e.get("value") for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = parse_agent_settings(env["MODELCACHE_AGENT_SETTINGS"])
    group = NodeGroup(
        name="gpu",
        uid="u",
        storage_limit=None,
        terms=(),
        pv_spec={"local": {"path": "/models"}, "nodeAffinity": {"required": {"nodeSelectorTerms": []}}},
        pvc_spec={},
        local_path="/models",
        status={},
    )
    kserve_defaults = LocalModelConfig.model_validate(
        {"localModelAgentImage": "kserve/agent", "fsGroup": 1000}
    )
    ds = agent_daemonset(group, "kserve", kserve_defaults, "unused", settings)
    assert ds is not None
    validate(ds)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] != "kserve/agent", "our image wins over KServe's localModelAgentImage"
    assert "cpu" not in container["resources"].get("limits", {}), "no CPU limit by default"


def test_agent_values_reach_the_daemonset() -> None:
    docs = render(*MATRIX["agent-settings"])
    controller = by_kind(docs, "Deployment")["modelcache-controller"]
    c = controller["spec"]["template"]["spec"]["containers"][0]
    settings = json.loads(next(e["value"] for e in c["env"] if e["name"] == "MODELCACHE_AGENT_SETTINGS"))
    assert settings["image"] == "registry.local/modelcache:0.1.0-gpu"
    assert "--agent-image=registry.local/modelcache:0.1.0-gpu" in c["args"]
    assert settings["priorityClassName"] == "system-node-critical"
    assert settings["nodeSelector"] == {"pool": "gpu"}
    assert settings["tolerations"][0]["key"] == "nvidia.com/gpu", "GPU taint tolerated by default"
    assert settings["extraArgs"] == ["--metrics-port", "9090", "--reserve", "10Gi"]
    assert settings["env"] == [{"name": "HF_ENDPOINT", "value": "http://hf-mirror"}]
    assert settings["podAnnotations"] == {"team": "ml"}


def _rules(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    return {
        (d["kind"], d["metadata"]["name"]): d["rules"] for d in docs if d["kind"] in ("ClusterRole", "Role")
    }


def test_rbac_and_webhooks_match_deploy_manifests() -> None:
    docs = render()
    deploy: list[dict[str, Any]] = []
    for path in [*(REPO / "deploy" / "rbac").rglob("*.yaml"), REPO / "deploy" / "webhook.yaml"]:
        deploy += [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert _rules(docs) == _rules(deploy)
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        ours, theirs = by_kind(docs, kind)["modelcache-webhook"], by_kind(deploy, kind)["modelcache-webhook"]
        assert ours["webhooks"] == theirs["webhooks"], kind


def test_job_namespace_and_namespace_from_values() -> None:
    docs = render(*MATRIX["minimal"], namespace="ignored")
    roles = {(d["kind"], d["metadata"]["name"]): d["metadata"].get("namespace") for d in docs}
    assert roles[("Role", "modelcache-agent-credentials")] == "model-jobs"
    assert roles[("Role", "modelcache-controller")] == "ops"
    assert "Namespace" not in {d["kind"] for d in docs}
    controller = by_kind(docs, "Deployment")["modelcache-controller"]
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-leader-elect" in args and controller["spec"]["replicas"] == 1
    assert "ValidatingWebhookConfiguration" not in {d["kind"] for d in docs}


def test_shared_cache_storage_container_runs_initialize() -> None:
    docs = render(*MATRIX["everything-on"])
    csc = by_kind(docs, "ClusterStorageContainer")["modelcache"]
    assert csc["spec"]["container"]["command"][:2] == ["modelcache", "initialize"]
    assert [f["prefix"] for f in csc["spec"]["supportedUriFormats"]] == [
        "hf://",
        "s3://",
        "gs://",
        "https://",
    ]
    gc = by_kind(docs, "CronJob")["modelcache-shared-gc"]
    assert (
        gc["metadata"]["namespace"]
        == by_kind(docs, "PersistentVolumeClaim")["modelcache-shared"]["metadata"]["namespace"]
        == "models"
    )
    config = by_kind(docs, "ConfigMap")["inferenceservice-config"]
    assert json.loads(config["data"]["localModel"])["enabled"] is True


def test_crds_in_chart_are_ours() -> None:
    shipped = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert shipped == {p.name: p.read_text() for p in data.crds_dir().glob("*.yaml")}
