"""The Mutating/ValidatingWebhookConfigurations, as data: one definition for `--register`, the e2e
tests and (checked by a unit test) deploy/webhook.yaml.

Failure policies, and why:
- cache and node-group validation: **Fail**. If the webhook is down, an unchecked cache could change
  its sourceModelUri (no CEL on old clusters), overcommit a node group's disk or be deleted under a
  running InferenceService. Refusing for a few seconds is the safer failure.
- InferenceService and pod mutation: **Ignore**. The pod webhook sees every pod in the cluster; an
  outage must never stop pods (including kube-system's and our own) from being created. A pod that
  is not mutated still works: KServe pods run their storage-initializer, i.e. load from the origin.
"""

from __future__ import annotations

from typing import Any

from modelcache.kube.constants import GROUP

Obj = dict[str, Any]

CONFIGURATION_NAME = "modelcache-webhook"
#: Label of the webhook's own pods; the pod webhook never intercepts them.
APP_LABEL = "app.kubernetes.io/name"
APP_NAME = "modelcache-webhook"
#: Namespaces labelled `modelcache.io/webhook: disabled` are skipped by the pod webhook.
NAMESPACE_OPT_OUT_LABEL = "modelcache.io/webhook"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by apiservers >= 1.21

PATH_CACHES = "/validate/caches"
PATH_NODE_GROUPS = "/validate/nodegroups"
PATH_WORKLOADS = "/mutate/inferenceservices"
PATH_PODS = "/mutate/pods"
PATHS = (PATH_CACHES, PATH_NODE_GROUPS, PATH_WORKLOADS, PATH_PODS)
SERVICE_PORT = 443
TIMEOUT_SECONDS = 10


def _client_config(path: str, url: str | None, service: tuple[str, str] | None, ca_bundle: str) -> Obj:
    config: Obj = {}
    if url:
        config["url"] = url.rstrip("/") + path
    elif service:
        namespace, name = service
        config["service"] = {"namespace": namespace, "name": name, "path": path, "port": SERVICE_PORT}
    else:
        raise ValueError("either url or service is needed")
    if ca_bundle:
        config["caBundle"] = ca_bundle
    return config


def _rule(groups: list[str], versions: list[str], resources: list[str], ops: list[str], scope: str) -> Obj:
    return {
        "apiGroups": groups,
        "apiVersions": versions,
        "resources": resources,
        "operations": ops,
        "scope": scope,
    }


def configurations(
    *,
    url: str | None = None,
    service: tuple[str, str] | None = None,
    ca_bundle: str = "",
    name: str = CONFIGURATION_NAME,
    own_namespace: str = "kserve",
) -> tuple[Obj, Obj]:
    """(ValidatingWebhookConfiguration, MutatingWebhookConfiguration); `ca_bundle` is base64 PEM."""

    def cc(path: str) -> Obj:
        return _client_config(path, url, service, ca_bundle)

    common: Obj = {"admissionReviewVersions": ["v1"], "timeoutSeconds": TIMEOUT_SECONDS}
    validating: Obj = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "localmodelcaches.validate.modelcache.io",
                "clientConfig": cc(PATH_CACHES),
                "rules": [
                    _rule(
                        [GROUP],
                        ["v1alpha1"],
                        ["localmodelcaches", "localmodelnamespacecaches"],
                        ["CREATE", "UPDATE", "DELETE"],
                        "*",
                    )
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                **common,
            },
            {
                "name": "localmodelnodegroups.validate.modelcache.io",
                "clientConfig": cc(PATH_NODE_GROUPS),
                "rules": [
                    _rule([GROUP], ["v1alpha1"], ["localmodelnodegroups"], ["CREATE", "UPDATE"], "Cluster")
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                **common,
            },
        ],
    }
    mutating: Obj = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inferenceservices.mutate.modelcache.io",
                "clientConfig": cc(PATH_WORKLOADS),
                "rules": [
                    _rule([GROUP], ["v1beta1"], ["inferenceservices"], ["CREATE", "UPDATE"], "Namespaced"),
                    _rule(
                        [GROUP],
                        ["v1alpha1", "v1alpha2"],
                        ["llminferenceservices"],
                        ["CREATE", "UPDATE"],
                        "Namespaced",
                    ),
                ],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "reinvocationPolicy": "Never",
                **common,
            },
            {
                "name": "pods.mutate.modelcache.io",
                "clientConfig": cc(PATH_PODS),
                "rules": [_rule([""], ["v1"], ["pods"], ["CREATE"], "Namespaced")],
                "failurePolicy": "Ignore",
                # We record Events about pods whose model is not ready, never on dry-run requests.
                "sideEffects": "NoneOnDryRun",
                # Idempotent; run again if a later webhook (e.g. KServe's) changed the pod.
                "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": NAMESPACE_OPT_OUT_LABEL, "operator": "NotIn", "values": ["disabled"]},
                        {
                            "key": NAMESPACE_NAME_LABEL,
                            "operator": "NotIn",
                            "values": sorted({own_namespace, "kube-system"}),
                        },
                    ]
                },
                "objectSelector": {
                    "matchExpressions": [{"key": APP_LABEL, "operator": "NotIn", "values": [APP_NAME]}]
                },
                **common,
            },
        ],
    }
    return validating, mutating
