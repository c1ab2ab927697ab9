"""`modelcache controller`: the controller manager (KServe's LocalModel* reconciliation).

Kept import-light: kopf, lightkube and the reconciler load only when the command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer


def main(
    namespace: Annotated[
        str,
        typer.Option(
            "--namespace",
            envvar="POD_NAMESPACE",
            help="Namespace the controller runs in: inferenceservice-config, agent DaemonSets, the Lease.",
        ),
    ] = "kserve",
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig", envvar="KUBECONFIG", help="Kubeconfig file (default: in-cluster, ~/.kube)."
        ),
    ] = None,
    agent_image: Annotated[
        str,
        typer.Option(
            "--agent-image",
            envvar="MODELCACHE_AGENT_IMAGE",
            help="Node agent image, unless localModel.localModelAgentImage sets one.",
        ),
    ] = "ghcr.io/modelcache/modelcache:latest",
    agent_settings: Annotated[
        str,
        typer.Option(
            "--agent-settings",
            envvar="MODELCACHE_AGENT_SETTINGS",
            help="JSON object applied to every agent pod: image, imagePullPolicy, imagePullSecrets, "
            "resources, tolerations, nodeSelector, priorityClassName, securityContext, podSecurityContext, "
            "serviceAccountName, extraArgs, env, podLabels, podAnnotations (the Helm chart's agent values).",
        ),
    ] = "",
    leader_elect: Annotated[
        bool, typer.Option("--leader-elect/--no-leader-elect", help="Coordinate replicas with a Lease.")
    ] = True,
    lease_duration: Annotated[
        float, typer.Option("--lease-duration", help="Lease duration, seconds.")
    ] = 15.0,
    health_port: Annotated[
        int, typer.Option("--health-port", help="Serve /healthz and /readyz on this port (0: off).")
    ] = 0,
    health_host: Annotated[
        str, typer.Option("--health-host", help="Address for the health endpoint.")
    ] = "0.0.0.0",
    debug: Annotated[bool, typer.Option("--debug", help="Debug logs.")] = False,
) -> None:
    """Reconcile LocalModelCaches onto nodes: LocalModelNodes, PV/PVCs, agent DaemonSets, status."""
    import asyncio
    import logging
    import sys

    from modelcache.controller.main import Options, run

    logger = logging.getLogger("modelcache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    if debug or os.environ.get("MODELCACHE_DEBUG") == "1":
        logger.setLevel(logging.DEBUG)
    elif logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logging.getLogger("kopf").setLevel(logging.DEBUG if debug else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    opts = Options(
        namespace=namespace,
        kubeconfig=kubeconfig,
        agent_image=agent_image,
        agent_settings=parse_agent_settings(agent_settings),
        leader_elect=leader_elect,
        lease_duration=lease_duration,
        health_port=health_port,
        health_host=health_host,
    )
    asyncio.run(run(opts))


def parse_agent_settings(text: str) -> dict[str, Any]:
    """--agent-settings: a JSON object with known keys only (a typo must not be silently ignored)."""
    import json

    from modelcache.controller.reconcile import AGENT_SETTING_KEYS
    from modelcache.errors import UsageError

    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--agent-settings is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("--agent-settings must be a JSON object")
    unknown = sorted(set(data) - AGENT_SETTING_KEYS)
    if unknown:
        raise UsageError(f"--agent-settings: unknown keys {', '.join(unknown)}")
    return data


if __name__ == "__main__":  # `python -m modelcache.cli.controller`, until the app registers it
    import sys

    from modelcache.errors import ModelcacheError

    try:
        typer.run(main)
    except ModelcacheError as exc:
        sys.stderr.write(f"modelcache: error: {exc.message}\n")
        sys.exit(exc.exit_code)
