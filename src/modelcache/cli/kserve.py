"""`modelcache kserve check`: is this cluster ready to swap KServe's local model cache for ours?

Commands only: the decisions are `modelcache.kube.migration.findings`. Exit 0 when nothing is left
to do, 7 (conflict) when something is, with the steps printed in the order to take them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from modelcache.errors import EXIT_CONFLICT, ModelcacheError, UsageError

app = typer.Typer(
    name="kserve",
    help="Migrating from KServe's local model cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _plain(obj: Any) -> dict[str, Any]:
    data: dict[str, Any] = obj.to_dict()
    return data


def _gather(kubeconfig: Path | None, namespace: str, roots: list[Path]) -> Any:
    from lightkube import ApiError, Client, ConfigError, KubeConfig
    from lightkube.generic_resource import create_global_resource, create_namespaced_resource
    from lightkube.resources.admissionregistration_v1 import (
        MutatingWebhookConfiguration,
        ValidatingWebhookConfiguration,
    )
    from lightkube.resources.apps_v1 import DaemonSet, Deployment
    from lightkube.resources.core_v1 import ConfigMap, PersistentVolume, PersistentVolumeClaim

    from modelcache.api.types import GROUP, VERSION
    from modelcache.kube.config import parse_local_model_config
    from modelcache.kube.constants import CONFIGMAP_NAME
    from modelcache.kube.migration import ClusterView
    from modelcache.store import Store
    from modelcache.store.adopt import foreign_keys

    lmc = create_global_resource(GROUP, VERSION, "LocalModelCache", "localmodelcaches")
    lmnc = create_namespaced_resource(GROUP, VERSION, "LocalModelNamespaceCache", "localmodelnamespacecaches")
    lmng = create_global_resource(GROUP, VERSION, "LocalModelNodeGroup", "localmodelnodegroups")
    try:
        client = Client(KubeConfig.from_file(kubeconfig) if kubeconfig else None)
    except ConfigError as exc:
        raise UsageError(f"no usable kubeconfig: {exc}") from None

    def listed(res: Any, kind: str, **kw: Any) -> list[dict[str, Any]]:
        try:
            return [{"kind": kind, **_plain(o)} for o in client.list(res, **kw)]
        except ApiError as exc:
            if exc.status.code == 404:  # CRD or API not installed
                return []
            raise ModelcacheError(f"cannot list {kind}: {exc.status.message}") from None

    try:
        cm = client.get(ConfigMap, CONFIGMAP_NAME, namespace=namespace)
        config = parse_local_model_config(dict(cm.data or {}))
    except ApiError as exc:
        if exc.status.code != 404:
            raise ModelcacheError(f"cannot read {namespace}/{CONFIGMAP_NAME}: {exc.status.message}") from None
        config = parse_local_model_config(None)
    from lightkube.resources.rbac_authorization_v1 import RoleBinding

    try:
        bindings: list[dict[str, Any]] | None = [
            _plain(o) for o in client.list(RoleBinding, namespace=config.jobNamespace)
        ]
    except ApiError:  # no right to read RBAC there: not judged
        bindings = None
    return ClusterView(
        namespace=namespace,
        config=config,
        deployments=listed(Deployment, "Deployment", namespace="*"),
        daemonsets=listed(DaemonSet, "DaemonSet", namespace="*"),
        webhook_configurations=[
            *listed(ValidatingWebhookConfiguration, "ValidatingWebhookConfiguration"),
            *listed(MutatingWebhookConfiguration, "MutatingWebhookConfiguration"),
        ],
        volumes=[
            *listed(PersistentVolume, "PersistentVolume"),
            *listed(PersistentVolumeClaim, "PersistentVolumeClaim", namespace="*"),
        ],
        caches=[*listed(lmc, "LocalModelCache"), *listed(lmnc, "LocalModelNamespaceCache", namespace="*")],
        groups=listed(lmng, "LocalModelNodeGroup"),
        foreign_folders={str(root): foreign_keys(Store(root)) for root in roots},
        job_role_bindings=bindings,
    )


@app.command()
def check(
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig", envvar="KUBECONFIG", help="Kubeconfig file (default: in-cluster, ~/.kube)."
        ),
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Where inferenceservice-config and the agents live.")
    ] = "kserve",
    root: Annotated[
        list[Path] | None,
        typer.Option("--root", help="A node's cache root to look for un-adopted model folders (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check a cluster before and after the swap; print what to do, in order. Exit 0 clean, 7 not."""
    from modelcache.kube.migration import findings

    try:
        found = findings(_gather(kubeconfig, namespace, list(root or [])))
    except ModelcacheError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps({"clean": not found, "findings": [f.as_dict() for f in found]}, indent=2))
    elif not found:
        typer.echo("clean: nothing of KServe's local model cache stands in the way")
    else:
        typer.echo(f"{len(found)} thing(s) to do, in this order:")
        for i, f in enumerate(found, 1):
            typer.echo(f"{i}. {f.what}\n   -> {f.todo}")
    if found:
        raise typer.Exit(EXIT_CONFLICT)
