"""Our CRDs against KServe's (the wire contract): regenerated output is checked in, and every
field KServe's schema accepts, ours accepts too without pruning it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcache.api import LocalModelCache, LocalModelNodeGroup
from modelcache.api.crd import render

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO.parent / "shared" / "reference" / "kserve-crds"
PLURALS = ["localmodelcaches", "localmodelnamespacecaches", "localmodelnodegroups", "localmodelnodes"]


def _schema(doc: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs[0]


def test_checked_in_crds_are_current() -> None:
    for name, text in render().items():
        assert (REPO / "deploy" / "crds" / name).read_text() == text, f"regenerate {name}"


def _accepts(ours: dict[str, Any], theirs: dict[str, Any], path: str, problems: list[str]) -> None:
    """Does `ours` accept (and keep) everything `theirs` accepts?"""
    if ours.get("x-kubernetes-preserve-unknown-fields"):
        return  # everything below is kept as sent
    if theirs.get("x-kubernetes-int-or-string"):
        if not ours.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: must be int-or-string")
        return
    if theirs.get("type") != ours.get("type"):
        problems.append(f"{path}: type {ours.get('type')} != {theirs.get('type')}")
        return
    if "enum" in theirs and not set(theirs["enum"]) <= set(ours.get("enum", theirs["enum"])):
        problems.append(f"{path}: enum lacks {set(theirs['enum']) - set(ours['enum'])}")
    extra_required = set(ours.get("required", [])) - set(theirs.get("required", []))
    if extra_required:
        problems.append(f"{path}: requires more than KServe: {sorted(extra_required)}")
    if ours.get("minItems", 0) > theirs.get("minItems", 0):
        problems.append(f"{path}: minItems stricter than KServe")
    for key, sub in theirs.get("properties", {}).items():
        if key not in ours.get("properties", {}):
            problems.append(f"{path}.{key}: missing (would be pruned)")
        else:
            _accepts(ours["properties"][key], sub, f"{path}.{key}", problems)
    if "items" in theirs:
        _accepts(ours.get("items", {}), theirs["items"], f"{path}[]", problems)
    if isinstance(theirs.get("additionalProperties"), dict):
        _accepts(
            ours.get("additionalProperties", {}), theirs["additionalProperties"], f"{path}{{}}", problems
        )


@pytest.mark.parametrize("plural", PLURALS)
def test_superset_of_kserve_schema(plural: str) -> None:
    theirs = _load(KSERVE / f"serving.kserve.io_{plural}.yaml")
    ours = _load(REPO / "deploy" / "crds" / f"serving.kserve.io_{plural}.yaml")
    assert ours["spec"]["names"] == theirs["spec"]["names"]
    assert ours["spec"]["scope"] == theirs["spec"]["scope"]
    assert [v["name"] for v in ours["spec"]["versions"]] == [v["name"] for v in theirs["spec"]["versions"]]
    problems: list[str] = []
    _accepts(_schema(ours), _schema(theirs), plural, problems)
    assert problems == []


def test_cel_immutability_rule_kept() -> None:
    ours = _load(REPO / "deploy" / "crds" / "serving.kserve.io_localmodelcaches.yaml")
    rule = _schema(ours)["properties"]["spec"]["properties"]["sourceModelUri"]["x-kubernetes-validations"]
    assert rule == [{"rule": "self == oldSelf", "message": "StorageUri is immutable"}]


def test_models_parse_kserve_shapes() -> None:
    cache = LocalModelCache.model_validate(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": "meta-llama3-8b-instruct"},
            "spec": {
                "sourceModelUri": "hf://meta-llama/meta-llama-3-8b-instruct",
                "modelSize": "10Gi",
                "nodeGroups": ["workers"],
            },
        }
    )
    assert cache.spec.nodeGroups == ["workers"]
    group = LocalModelNodeGroup.model_validate(
        {
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": "workers"},
            "spec": {
                "storageLimit": "1.7T",
                "persistentVolumeClaimSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1700G"}},
                    "storageClassName": "local-storage",
                    "volumeMode": "Filesystem",
                    "volumeName": "models",
                },
                "persistentVolumeSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "volumeMode": "Filesystem",
                    "capacity": {"storage": "1700G"},
                    "local": {"path": "/models"},
                    "storageClassName": "local-storage",
                    "csi": {"driver": "x", "volumeHandle": "y"},
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "nvidia.com/gpu-product",
                                            "operator": "In",
                                            "values": ["NVIDIA-A100-SXM4-80GB"],
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
    pv = group.spec.persistentVolumeSpec
    assert pv.local is not None and pv.local.path == "/models"
    assert pv.model_dump(exclude_none=True)["csi"] == {"driver": "x", "volumeHandle": "y"}  # kept as sent
