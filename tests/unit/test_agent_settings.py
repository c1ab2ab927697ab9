"""The install's agent settings (controller --agent-settings, the chart's `agent:` values) reach every
`<group>-agent` DaemonSet and win over KServe's localModelAgent* keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelcache.cli.controller import parse_agent_settings
from modelcache.controller.reconcile import NodeGroup, agent_daemonset
from modelcache.errors import UsageError
from modelcache.kube.config import LocalModelConfig


def _group() -> NodeGroup:
    pv = {
        "local": {"path": "/models"},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": []}]}},
    }
    return NodeGroup(
        name="gpu",
        uid="u1",
        storage_limit=None,
        terms=(),
        pv_spec=pv,
        pvc_spec={},
        local_path="/models",
        status={},
    )


def _pod(settings: dict[str, Any] | None, config: LocalModelConfig | None = None) -> dict[str, Any]:
    ds = agent_daemonset(_group(), "kserve", config or LocalModelConfig(), "img:1", settings)
    assert ds is not None
    pod: dict[str, Any] = ds["spec"]["template"]
    return pod


def test_settings_reach_the_pod_and_beat_kserve_keys() -> None:
    kserve = LocalModelConfig.model_validate(
        {
            "localModelAgentImage": "kserve/kserve-localmodelnode-agent:latest",
            "localModelAgentCpuLimit": "100m",
        }
    )
    settings = {
        "image": "registry.local/modelcache:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"pool": "gpu"},
        "priorityClassName": "system-node-critical",
        "podSecurityContext": {"runAsUser": 65532},
        "extraArgs": ["--reserve", "10Gi"],
        "env": [{"name": "HF_ENDPOINT", "value": "http://mirror"}],
        "podLabels": {"team": "ml", "app.kubernetes.io/name": "ignored"},
        "podAnnotations": {"prometheus.io/scrape": "true"},
    }
    pod = _pod(parse_agent_settings(json.dumps(settings)), kserve)
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert container["image"] == "registry.local/modelcache:0.1.0"
    assert "cpu" not in container["resources"]["limits"], "no CPU limit: downloads hash every byte"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["priorityClassName"] == "system-node-critical"
    assert spec["securityContext"] == {"fsGroup": 1000, "runAsUser": 65532}
    assert container["args"][-2:] == ["--reserve", "10Gi"]
    assert container["env"][-1]["name"] == "HF_ENDPOINT"
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "modelcache-agent", "selector labels stay"
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}


def test_no_settings_changes_nothing() -> None:
    assert _pod(None) == _pod({}) == _pod(parse_agent_settings(""))


@pytest.mark.parametrize("text", ["[1]", "{bad", '{"tolerationz": []}'])
def test_bad_settings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_agent_settings(text)


def test_cache_dir_is_handed_to_the_agent_user() -> None:
    """The kubelet makes a missing hostPath root-owned: a CAP_CHOWN-only init container fixes that."""
    (init,) = _pod(None)["spec"]["initContainers"]
    assert init["command"] == ["chown", "65532:1000", "/models"]  # KServe fsGroup
    assert init["image"] == "img:1"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    with_group = _pod({"podSecurityContext": {"fsGroup": 1000}, "securityContext": {"runAsUser": 7}})
    assert with_group["spec"]["initContainers"][0]["command"] == ["chown", "7:1000", "/models"]
    assert "initContainers" not in _pod({"prepareCacheDir": False})["spec"]
