"""Generate our CRDs from the pydantic models: `python -m modelcache.api.crd deploy/crds`.

The output is checked in and a test regenerates it, so the models and the YAML cannot drift.
"""

from __future__ import annotations

import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from modelcache.api import types as t

QUANTITY_PATTERN = (  # Kubernetes' resource.Quantity syntax, as KServe's CRDs spell it
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity() -> dict[str, Any]:
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }


def schema_for(annotation: Any) -> dict[str, Any]:
    """OpenAPI v3 structural schema of a type annotation (the subset our models use)."""
    meta: list[Any] = []
    while get_origin(annotation) is typing.Annotated:
        annotation, *extra = get_args(annotation)
        meta.extend(extra)
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if any(isinstance(m, t.Quantity) for m in meta) or set(args) == {int, str}:
            schema = _quantity()
        elif len(args) == 1:
            schema = schema_for(args[0])
        else:  # pragma: no cover - not used by our models
            raise TypeError(f"unsupported union {annotation}")
    elif origin is list:
        schema = {"type": "array", "items": schema_for(get_args(annotation)[0])}
    elif origin is dict:
        schema = {"type": "object", "additionalProperties": schema_for(get_args(annotation)[1])}
    elif origin is Literal:
        schema = {"type": "string", "enum": list(get_args(annotation))}
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        schema = {"type": "string", "enum": [m.value for m in annotation]}
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        schema = object_schema(annotation)
    elif annotation is str:
        schema = {"type": "string"}
    elif annotation is int:
        schema = {"type": "integer"}
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is float:
        schema = {"type": "number"}
    else:  # pragma: no cover
        raise TypeError(f"unsupported type {annotation!r}")
    for m in meta:
        if isinstance(m, t.Immutable):
            schema["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": m.message}]
        elif isinstance(m, t.MinItems):
            schema["minItems"] = m.n
        elif isinstance(m, t.PreserveUnknown):
            schema["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(m, t.DateTime):
            schema["format"] = "date-time"
    return schema


def object_schema(model: type[BaseModel]) -> dict[str, Any]:
    hints = typing.get_type_hints(model, include_extras=True)
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        props[name] = schema_for(hints[name])
        if field.is_required():
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": dict(sorted(props.items()))}
    if required:
        schema["required"] = sorted(required)
    return schema


def _columns(kind: str) -> list[dict[str, Any]]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    if kind in ("LocalModelCache", "LocalModelNamespaceCache"):
        return [
            {"name": "Model", "type": "string", "jsonPath": ".spec.sourceModelUri"},
            {"name": "Size", "type": "string", "jsonPath": ".spec.modelSize"},
            {"name": "Available", "type": "integer", "jsonPath": ".status.copies.available"},
            {"name": "Total", "type": "integer", "jsonPath": ".status.copies.total"},
            {"name": "Failed", "type": "integer", "jsonPath": ".status.copies.failed", "priority": 1},
            age,
        ]
    if kind == "LocalModelNodeGroup":
        return [
            {"name": "Limit", "type": "string", "jsonPath": ".spec.storageLimit"},
            {"name": "Used", "type": "string", "jsonPath": ".status.used"},
            {"name": "Available", "type": "string", "jsonPath": ".status.available"},
            age,
        ]
    return [age]


RESOURCES: list[tuple[type[t._Resource], str, str]] = [
    (t.LocalModelCache, "localmodelcaches", "Cluster"),
    (t.LocalModelNamespaceCache, "localmodelnamespacecaches", "Namespaced"),
    (t.LocalModelNodeGroup, "localmodelnodegroups", "Cluster"),
    (t.LocalModelNode, "localmodelnodes", "Cluster"),
]


def crd(model: type[t._Resource], plural: str, scope: str) -> dict[str, Any]:
    kind = str(model.model_fields["kind"].default)
    hints = typing.get_type_hints(model, include_extras=True)
    root = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": schema_for(hints["spec"]),
            "status": schema_for(hints["status"]),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{t.GROUP}", "labels": {"app.kubernetes.io/part-of": "modelcache"}},
        "spec": {
            "group": t.GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "scope": scope,
            "versions": [
                {
                    "name": t.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _columns(kind),
                }
            ],
        },
    }


def render() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    out = {}
    for model, plural, scope in RESOURCES:
        text = yaml.safe_dump(crd(model, plural, scope), sort_keys=False, width=200)
        out[f"{t.GROUP}_{plural}.yaml"] = (
            "# Generated by `python -m modelcache.api.crd deploy/crds`; do not edit.\n" + text
        )
    return out


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "deploy/crds")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (target / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
