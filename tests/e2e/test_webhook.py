"""The admission webhook through a real apiserver (1.20): the server runs as a process on 127.0.0.1
under deploy/rbac/webhook.yaml (bound to a minted user), registered by `clientConfig.url`; it
creates its own certificate and fills in the caBundle of the configurations the test creates."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from lightkube import ApiError, Client, codecs
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.admissionregistration_v1 import (
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration,
)
from lightkube.resources.core_v1 import ConfigMap, Event, Namespace, Node, Pod, Secret
from lightkube.types import PatchType

from modelcache.dev import ControlPlaneInfo
from modelcache.dev.processes import free_port
from modelcache.kube.constants import (
    LOCALMODEL_LABEL,
    LOCALMODEL_PVC_ANNOTATION,
    LOCALMODEL_SOURCEURI_ANNOTATION,
    MODEL_ANNOTATION,
    MOUNT_PATH_ANNOTATION,
    ready_label,
)
from modelcache.uri import storage_key
from modelcache.webhook import registration
from modelcache.webhook.admission import STORAGE_INITIALIZER_SOURCEURI_ANNOTATION

pytestmark = pytest.mark.e2e

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
NS = "webhook-e2e"
USER = "modelcache-webhook-e2e"
GROUP_NAME = "e2e-workers"
URI = "hf://e2e-org/llama"
OTHER_URI = "hf://e2e-org/not-downloaded"
KEY = storage_key(URI)
NODE = "dev-node-1"

Cache = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
NsCache = create_namespaced_resource(
    "serving.kserve.io", "v1alpha1", "LocalModelNamespaceCache", "localmodelnamespacecaches"
)
NodeGroup = create_global_resource(
    "serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups"
)
ISVC = create_namespaced_resource("serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices")
LLMISVC = create_namespaced_resource(
    "serving.kserve.io", "v1alpha2", "LLMInferenceService", "llminferenceservices"
)


def eventually(check: Callable[[], T], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, ApiError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def rejected(kube: Client, obj: Any) -> str:
    """Create `obj`, expecting the apiserver to refuse it; the refusal's message."""
    with pytest.raises(ApiError) as exc:
        kube.create(obj)
    return exc.value.status.message or ""


def node_group(
    name: str = GROUP_NAME, limit: str = "100Gi", host_path: bool = True, affinity: bool = True
) -> Any:
    pv: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "capacity": {"storage": limit},
        "nodeAffinity": {
            "required": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}
                        ]
                    }
                ]
            }
        },
    }
    if host_path:
        pv["hostPath"] = {"path": "/models", "type": "DirectoryOrCreate"}
    if not affinity:
        del pv["nodeAffinity"]
    return NodeGroup.from_dict(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": name},
            "spec": {
                "storageLimit": limit,
                "persistentVolumeSpec": pv,
                "persistentVolumeClaimSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": limit}},
                },
            },
        }
    )


def cache(name: str, uri: str = URI, size: str = "60Gi", groups: list[str] | None = None) -> Any:
    return Cache.from_dict(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": name},
            "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups or [GROUP_NAME]},
        }
    )


# -- fixtures -------------------------------------------------------------------------------------
def _webhook_argv(port: int) -> list[str]:
    """`modelcache webhook` via the main entry point once the app registers it, else the module."""
    probe = subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", "webhook", "--help"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    base = (
        ["-m", "modelcache.cli.main", "webhook"]
        if probe.returncode == 0
        else ["-m", "modelcache.cli.webhook"]
    )
    return [
        sys.executable,
        *base,
        "--url",
        f"https://127.0.0.1:{port}",
        "--namespace",
        "kserve",
        "--resync-seconds",
        "2",
    ]


def _bind_rbac(kube: Client) -> list[Any]:
    """deploy/rbac/webhook.yaml, with the bindings' subject being our minted user."""
    created = []
    for doc in yaml.safe_load_all((REPO / "deploy" / "rbac" / "webhook.yaml").read_text()):
        if not doc:
            continue
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            doc["subjects"] = [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}]
        obj = codecs.from_dict(doc)
        with contextlib.suppress(ApiError):
            kube.delete(type(obj), doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
        kube.create(obj)
        created.append(obj)
    return created


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, argv: list[str], port: int, kubeconfig: Path, log: Path) -> Server:
        """The webhook as its own process (own session, so stop() ends it and only it)."""
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                start_new_session=True,
            )
        return cls(proc, port, log)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def webhook(
    kube: Client, control_plane: ControlPlaneInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("webhook")
    kubeconfig = control_plane.mint_user(USER, [], path=tmp / "webhook.kubeconfig")
    rbac = _bind_rbac(kube)
    with contextlib.suppress(ApiError):
        kube.create(Namespace(metadata=ObjectMeta(name=NS)))
    config = kube.get(ConfigMap, "inferenceservice-config", namespace="kserve")
    original = dict(config.data or {})
    local_model = json.loads(original["localModel"])
    kube.patch(
        ConfigMap,
        "inferenceservice-config",
        {"data": {"localModel": json.dumps({**local_model, "enabled": True})}},
        namespace="kserve",
    )
    port = free_port()
    validating, mutating = registration.configurations(url=f"https://127.0.0.1:{port}")
    for doc in (validating, mutating):
        kube.create(codecs.from_dict(doc))
    server = Server.start(_webhook_argv(port), port, kubeconfig, tmp / "webhook.log")
    proc = server.proc
    try:

        def ready() -> None:
            assert proc.poll() is None, server.logs()
            for kind in (ValidatingWebhookConfiguration, MutatingWebhookConfiguration):
                hooks = kube.get(kind, registration.CONFIGURATION_NAME).webhooks or []
                assert all(h.clientConfig.caBundle for h in hooks), "caBundle not set yet"
            # our own message, not "failed calling webhook": TLS and the server work end to end
            assert "needs a scheme" in rejected(kube, cache("e2e-probe", uri="no-scheme"))

        eventually(ready, timeout=60)
        yield server
    finally:
        server.stop()
        for kind in (ValidatingWebhookConfiguration, MutatingWebhookConfiguration):
            with contextlib.suppress(ApiError):
                kube.delete(kind, registration.CONFIGURATION_NAME)
        for res, name in ((Cache, "e2e-llama"), (Cache, "e2e-cold"), (NodeGroup, GROUP_NAME)):
            with contextlib.suppress(ApiError):
                kube.delete(res, name)
        for res in (Pod, ISVC, LLMISVC):  # the namespace itself never finishes deleting here
            with contextlib.suppress(ApiError):
                kube.deletecollection(res, namespace=NS)
        with contextlib.suppress(ApiError):
            kube.patch(Node, NODE, {"metadata": {"labels": {ready_label(KEY): None}}})
        with contextlib.suppress(ApiError):
            kube.delete(Secret, "modelcache-webhook-tls", namespace="kserve")
        kube.patch(ConfigMap, "inferenceservice-config", {"data": original}, namespace="kserve")
        for obj in reversed(rbac):
            with contextlib.suppress(ApiError):
                kube.delete(type(obj), obj.metadata.name, namespace=obj.metadata.namespace)


# -- tests (in order: later ones use objects of earlier ones) -------------------------------------
def test_certificate_secret_backs_the_ca_bundle(kube: Client, webhook: Server) -> None:
    secret = kube.get(Secret, "modelcache-webhook-tls", namespace="kserve")
    assert secret.type == "kubernetes.io/tls"
    assert secret.data is not None
    hooks = kube.get(ValidatingWebhookConfiguration, registration.CONFIGURATION_NAME).webhooks or []
    assert {h.clientConfig.caBundle for h in hooks} == {secret.data["ca.crt"]}
    assert b"BEGIN CERTIFICATE" in base64.b64decode(secret.data["ca.crt"])


def test_node_group_validation(kube: Client, webhook: Server) -> None:
    # (quantities are checked by the CRD schema already; these rules only by the webhook)
    message = rejected(kube, node_group("e2e-bad", host_path=False, affinity=False))
    assert "LocalModelNodeGroup e2e-bad" in message
    assert "needs a local or hostPath source" in message
    assert "nodeSelectorTerms must select the group's nodes" in message
    kube.create(node_group())


def test_cache_validation(kube: Client, webhook: Server) -> None:
    assert "needs a scheme" in rejected(kube, cache("e2e-x", uri="e2e-org/model"))
    # a scheme our engine does not read is admitted: a KServe-style download Job fetches it
    kube.create(cache("e2e-x", uri="ftp://host/model"))
    kube.delete(Cache, "e2e-x")
    early = kube.create(cache("e2e-early", uri="hf://e2e-org/early", groups=["e2e-nope"]))  # GitOps order
    assert early.metadata is not None
    kube.delete(Cache, "e2e-early")
    kube.create(cache("e2e-llama", size="60Gi"))
    message = rejected(kube, cache("e2e-big", uri="hf://e2e-org/big", size="50Gi"))
    assert (
        f"modelSize 50.0 GiB does not fit node group {GROUP_NAME}: storageLimit 100.0 GiB, "
        "60.0 GiB already committed by 1 other cache(s) (e2e-llama), 40.0 GiB available"
    ) in message
    assert f"LocalModelCache e2e-llama has the same StorageURI {URI}" in rejected(kube, cache("e2e-dup"))
    kube.create(cache("e2e-cold", uri=OTHER_URI, size="10Gi"))
    ns_cache = NsCache.from_dict(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNamespaceCache",
            "metadata": {"name": "e2e-ns", "namespace": NS},
            "spec": {"sourceModelUri": "hf://e2e-org/ns", "modelSize": "50Gi", "nodeGroups": [GROUP_NAME]},
        }
    )
    message = rejected(kube, ns_cache)
    assert f"LocalModelNamespaceCache {NS}/e2e-ns: modelSize 50.0 GiB does not fit" in message
    assert "70.0 GiB already committed by 2 other cache(s) (e2e-cold, e2e-llama)" in message


def test_source_uri_is_immutable_without_cel(kube: Client, webhook: Server) -> None:
    with pytest.raises(ApiError) as exc:
        kube.patch(
            Cache,
            "e2e-llama",
            {"spec": {"sourceModelUri": "hf://e2e-org/changed"}},
            patch_type=PatchType.MERGE,
        )
    assert "spec.sourceModelUri is immutable" in (exc.value.status.message or "")
    patched = kube.patch(
        Cache, "e2e-llama", {"metadata": {"labels": {"team": "e2e"}}}, patch_type=PatchType.MERGE
    )
    assert patched.metadata.labels == {"team": "e2e"}


def test_inference_services_get_kserve_labels(kube: Client, webhook: Server) -> None:
    isvc = ISVC.from_dict(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {
                "predictor": {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": URI + "/"}}
            },
        }
    )
    created = kube.create(isvc)
    assert created.metadata.labels == {LOCALMODEL_LABEL: "e2e-llama"}
    assert created.metadata.annotations == {
        LOCALMODEL_SOURCEURI_ANNOTATION: URI,
        LOCALMODEL_PVC_ANNOTATION: f"e2e-llama-{GROUP_NAME}",
    }
    other = copy.deepcopy(isvc.to_dict())
    other["metadata"]["name"] = "uncached"
    other["spec"]["predictor"]["model"]["storageUri"] = "hf://e2e-org/elsewhere"
    assert not (kube.create(ISVC.from_dict(other)).metadata.labels or {})
    llm = LLMISVC.from_dict(
        {
            "apiVersion": "serving.kserve.io/v1alpha2",
            "kind": "LLMInferenceService",
            "metadata": {"name": "llm", "namespace": NS},
            "spec": {"model": {"uri": URI + "/sub"}},
        }
    )
    assert kube.create(llm).metadata.labels == {LOCALMODEL_LABEL: "e2e-llama"}


def kserve_pod(name: str, source: str = URI, cache_name: str = "e2e-llama") -> Pod:
    storage_uri = source + "/sub"
    return Pod.from_dict(
        {
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": {LOCALMODEL_LABEL: cache_name},
                "annotations": {
                    LOCALMODEL_SOURCEURI_ANNOTATION: source,
                    LOCALMODEL_PVC_ANNOTATION: f"{cache_name}-{GROUP_NAME}",
                    STORAGE_INITIALIZER_SOURCEURI_ANNOTATION: storage_uri,
                },
            },
            "spec": {
                "initContainers": [
                    {
                        "name": "storage-initializer",
                        "image": "kserve/storage-initializer",
                        "args": [storage_uri, "/mnt/models"],
                        "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}],
                    }
                ],
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "kserve/huggingfaceserver",
                        "volumeMounts": [
                            {
                                "name": "kserve-provision-location",
                                "mountPath": "/mnt/models",
                                "readOnly": True,
                            }
                        ],
                    }
                ],
                "volumes": [{"name": "kserve-provision-location", "emptyDir": {}}],
            },
        }
    )


def _affinity(pod: Pod) -> list[Any]:
    assert pod.spec and pod.spec.affinity and pod.spec.affinity.nodeAffinity
    required = pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution
    assert required is not None
    return [e.to_dict() for t in required.nodeSelectorTerms for e in t.matchExpressions or []]


def test_kserve_pod_mounts_the_cache_and_goes_where_the_model_is(kube: Client, webhook: Server) -> None:
    kube.patch(Node, NODE, {"metadata": {"labels": {ready_label(KEY): "ready"}}})
    pod = kube.create(kserve_pod("chat-predictor"))
    assert pod.spec is not None
    assert not pod.spec.initContainers
    volumes = {v.name: v for v in pod.spec.volumes or []}
    assert set(volumes) == {"kserve-pvc-source"}
    claim = volumes["kserve-pvc-source"].persistentVolumeClaim
    assert claim is not None and claim.claimName == f"e2e-llama-{GROUP_NAME}" and claim.readOnly
    (mount,) = pod.spec.containers[0].volumeMounts or []
    assert (mount.name, mount.mountPath, mount.subPath, mount.readOnly) == (
        "kserve-pvc-source",
        "/mnt/models",
        f"models/{KEY}/sub",
        True,
    )
    assert _affinity(pod) == [{"key": ready_label(KEY), "operator": "In", "values": ["ready"]}]


def test_plain_annotated_pod_likewise(kube: Client, webhook: Server) -> None:
    pod = Pod.from_dict(
        {
            "metadata": {
                "name": "vllm",
                "namespace": NS,
                "annotations": {MODEL_ANNOTATION: "e2e-llama", MOUNT_PATH_ANNOTATION: "/models"},
            },
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        }
    )
    created = kube.create(pod)
    assert created.spec is not None
    (mount,) = created.spec.containers[0].volumeMounts or []
    assert (mount.mountPath, mount.subPath, mount.readOnly) == ("/models", f"models/{KEY}", True)
    (volume,) = created.spec.volumes or []
    assert volume.persistentVolumeClaim is not None
    assert volume.persistentVolumeClaim.claimName == f"e2e-llama-{GROUP_NAME}"
    assert _affinity(created) == [{"key": ready_label(KEY), "operator": "In", "values": ["ready"]}]


def test_unmatched_pod_untouched_and_not_ready_pod_admitted_with_event(kube: Client, webhook: Server) -> None:
    plain = Pod.from_dict(
        {
            "metadata": {"name": "plain", "namespace": NS},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        }
    )
    created = kube.create(plain)
    assert created.spec is not None
    assert not created.spec.volumes and not created.spec.affinity
    assert not created.spec.containers[0].volumeMounts

    cold = kube.create(kserve_pod("cold-predictor", source=OTHER_URI, cache_name="e2e-cold"))
    assert cold.spec is not None
    assert [c.name for c in cold.spec.initContainers or []] == ["storage-initializer"]  # unchanged
    assert not cold.spec.affinity

    def event() -> None:
        events = [e for e in kube.list(Event, namespace=NS) if e.reason == "LocalModelNotReady"]
        assert events and "e2e-cold is not downloaded on any node" in (events[0].message or "")
        assert events[0].involvedObject.name == "cold-predictor"

    eventually(event)


def test_cache_delete_refused_while_used(kube: Client, webhook: Server) -> None:
    with pytest.raises(ApiError) as exc:
        kube.delete(Cache, "e2e-llama")
    message = exc.value.status.message or ""
    assert "LocalModelCache e2e-llama is still used by" in message
    assert f"InferenceService {NS}/chat" in message and f"Pod {NS}/vllm" in message
    for res, name in ((ISVC, "chat"), (LLMISVC, "llm"), (Pod, "chat-predictor"), (Pod, "vllm")):
        kube.delete(res, name, namespace=NS)  # pods without a node are deleted at once
    eventually(lambda: kube.delete(Cache, "e2e-llama"))


def test_ca_bundle_kept_current_and_certificate_recreated(kube: Client, webhook: Server) -> None:
    """Someone blanks the caBundle, then the Secret is lost: the server repairs both by itself."""
    kube.patch(
        ValidatingWebhookConfiguration,
        registration.CONFIGURATION_NAME,
        [{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}],
        patch_type=PatchType.JSON,
    )
    old = kube.get(Secret, "modelcache-webhook-tls", namespace="kserve")
    assert old.data is not None
    old_ca = old.data["ca.crt"]
    kube.delete(Secret, "modelcache-webhook-tls", namespace="kserve")

    def repaired() -> None:
        new = kube.get(Secret, "modelcache-webhook-tls", namespace="kserve")
        assert new.data is not None and new.data["ca.crt"] != old_ca
        for kind in (ValidatingWebhookConfiguration, MutatingWebhookConfiguration):
            hooks = kube.get(kind, registration.CONFIGURATION_NAME).webhooks or []
            assert {h.clientConfig.caBundle for h in hooks} == {new.data["ca.crt"]}
        # served with the new certificate: our message again, not a TLS failure
        assert "needs a scheme" in rejected(kube, cache("e2e-probe", uri="no-scheme"))

    eventually(repaired, timeout=30)


def test_register_flag_creates_configurations_for_dev_up(
    kube: Client, control_plane: ControlPlaneInfo, webhook: Server, tmp_path: Path
) -> None:
    """`modelcache webhook --url ... --register` (admin, as `dev up` runs it) registers itself."""
    name, port = "e2e-registered", free_port()
    argv = [*_webhook_argv(port), "--register", "--configuration", name, "--secret", "e2e-registered-tls"]
    server = Server.start(argv, port, control_plane.kubeconfig, tmp_path / "registered.log")
    proc = server.proc
    try:

        def registered() -> None:
            assert proc.poll() is None, server.logs()
            secret = kube.get(Secret, "e2e-registered-tls", namespace="kserve")
            assert secret.data is not None
            for kind in (ValidatingWebhookConfiguration, MutatingWebhookConfiguration):
                hooks = kube.get(kind, name).webhooks or []
                assert len(hooks) == 2
                for hook in hooks:
                    assert (hook.clientConfig.url or "").startswith(f"https://127.0.0.1:{port}/")
                    assert hook.clientConfig.caBundle == secret.data["ca.crt"]

        eventually(registered, timeout=30)
    finally:
        server.stop()
        for kind in (ValidatingWebhookConfiguration, MutatingWebhookConfiguration):
            with contextlib.suppress(ApiError):
                kube.delete(kind, name)
        with contextlib.suppress(ApiError):
            kube.delete(Secret, "e2e-registered-tls", namespace="kserve")


def test_webhook_down_pods_admitted_caches_refused(kube: Client, webhook: Server) -> None:
    webhook.stop()
    pod = Pod.from_dict(
        {
            "metadata": {
                "name": "while-down",
                "namespace": NS,
                "annotations": {MODEL_ANNOTATION: "e2e-cold"},
            },
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        }
    )
    created = kube.create(pod)  # failurePolicy Ignore
    assert created.spec is not None and not created.spec.volumes
    message = rejected(kube, cache("e2e-after", uri="hf://e2e-org/after", size="1Gi"))  # failurePolicy Fail
    assert "failed calling webhook" in message
    with pytest.raises(ApiError) as exc:
        kube.patch(
            Cache,
            "e2e-cold",
            {"spec": {"sourceModelUri": "hf://e2e-org/changed"}},
            patch_type=PatchType.MERGE,
        )
    assert "failed calling webhook" in (exc.value.status.message or "")
