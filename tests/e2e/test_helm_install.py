"""`helm install` of charts/modelcache on the playground apiserver (a control plane of its own: the
chart's validating webhook fails closed and has no pods here, so it must not reach other tests).

Checks that the objects exist with the values given, that an upgrade adds the shared-PVC objects
(CronJob in the version the 1.20 apiserver serves), that the chart refuses to take over KServe's
inferenceservice-config, and that uninstall removes everything but the CRDs and kept objects.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import ApiError, Client
from lightkube.generic_resource import create_global_resource
from lightkube.resources.admissionregistration_v1 import (
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration,
)
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace, PersistentVolumeClaim, Service
from lightkube.resources.rbac_authorization_v1 import ClusterRole, Role

from modelcache.dev import ControlPlaneInfo, running

from .support import require_binaries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelcache"
HELM = Path(os.environ.get("MODELCACHE_HELM", Path.home() / ".cache" / "modelcache" / "bin" / "helm"))
ClusterStorageContainer = create_global_resource(
    "serving.kserve.io", "v1alpha1", "ClusterStorageContainer", "clusterstoragecontainers"
)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneInfo]:
    require_binaries()
    if not HELM.is_file():
        pytest.fail(f"helm not found at {HELM}: run scripts/install-helm.sh", pytrace=False)
    with running(tmp_path_factory.mktemp("helm-home"), nodes=1) as info:
        yield info


def helm(plane: ControlPlaneInfo, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(plane.home / "helm-cache"),
        "HELM_CONFIG_HOME": str(plane.home / "helm-config"),
    }
    result = subprocess.run(
        [str(HELM), "--kubeconfig", str(plane.kubeconfig), "--namespace", "kserve", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _exists(client: Client, kind: type, name: str, namespace: str | None = None) -> bool:
    try:
        client.get(kind, name, namespace=namespace)  # type: ignore[call-overload]
    except ApiError as exc:
        if exc.status.code == 404:
            return False
        raise
    return True


def test_install_upgrade_uninstall(plane: ControlPlaneInfo) -> None:
    client = plane.client()
    refused = helm(plane, "install", "mc", str(CHART), "--set", "kserveConfig.create=true", ok=False)
    assert refused.returncode != 0 and "kserve.localmodel.enabled=true" in refused.stderr

    helm(
        plane, "install", "mc", str(CHART),
        "--set", "image.repository=localhost/modelcache", "--set", "image.tag=test",
        "--set", "jobNamespace=model-jobs", "--set", "agent.priorityClassName=system-node-critical",
    )  # fmt: skip
    controller = client.get(Deployment, "modelcache-controller", namespace="kserve")
    container = controller.spec.template.spec.containers[0]
    assert container.image == "localhost/modelcache:test"
    settings = json.loads(next(e.value for e in container.env if e.name == "MODELCACHE_AGENT_SETTINGS"))
    assert settings["priorityClassName"] == "system-node-critical"
    assert _exists(client, Deployment, "modelcache-webhook", "kserve")
    assert _exists(client, Service, "modelcache-webhook", "kserve")
    assert _exists(client, ValidatingWebhookConfiguration, "modelcache-webhook")
    assert _exists(client, MutatingWebhookConfiguration, "modelcache-webhook")
    assert _exists(client, ClusterRole, "modelcache-agent")
    assert _exists(client, Namespace, "model-jobs")
    assert _exists(client, Role, "modelcache-agent-credentials", "model-jobs")

    helm(
        plane,
        "upgrade",
        "mc",
        str(CHART),
        "--reuse-values",
        "--set",
        "sharedCache.enabled=true",
        "--set",
        "webhook.enabled=false",
    )
    assert _exists(client, PersistentVolumeClaim, "modelcache-shared", "kserve")
    assert _exists(client, ClusterStorageContainer, "modelcache")
    manifest = helm(plane, "get", "manifest", "mc").stdout
    assert "apiVersion: batch/v1beta1\nkind: CronJob" in manifest, "1.20 serves CronJob as batch/v1beta1"
    assert not _exists(client, ValidatingWebhookConfiguration, "modelcache-webhook")

    helm(plane, "uninstall", "mc")
    assert not _exists(client, Deployment, "modelcache-controller", "kserve")
    assert not _exists(client, ClusterRole, "modelcache-agent")
    assert not _exists(client, ClusterStorageContainer, "modelcache")
    assert _exists(client, PersistentVolumeClaim, "modelcache-shared", "kserve"), "kept: it holds the models"
