"""`modelcache agent`: the node agent (the `<group>-agent` DaemonSet pod, or a local process per
simulated node under `modelcache dev up`). Command line only; the work is in `modelcache.agent`.

Runnable on its own too: `python -m modelcache.cli.agent --help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def main(
    node_name: Annotated[
        str, typer.Option("--node-name", envvar="NODE_NAME", help="This node's name (its LocalModelNode).")
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            envvar="MODELCACHE_HOME",
            help="Cache root: the node group's local path / hostPath [default: ~/.cache/modelcache].",
        ),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option("--kubeconfig", envvar="KUBECONFIG", help="Kubeconfig; in-cluster config when absent."),
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Namespace of inferenceservice-config.")
    ] = "kserve",
    node_group: Annotated[
        str | None,
        typer.Option("--node-group", envvar="NODE_GROUP", help="Serve only this node group's entries."),
    ] = None,
    storage_limit: Annotated[
        str | None, typer.Option(help="Cache budget, e.g. 500Gi [default: the node group's storageLimit].")
    ] = None,
    reserve: Annotated[str, typer.Option(help="Free space to leave on the filesystem.")] = "1Gi",
    high_watermark: Annotated[float, typer.Option(min=0.1, max=1.0, help="Evict above this fill.")] = 0.95,
    low_watermark: Annotated[float, typer.Option(min=0.0, max=1.0, help="...down to this fill.")] = 0.85,
    max_concurrent: Annotated[int, typer.Option(min=1, max=64, help="Models downloaded at once.")] = 2,
    progress_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between progress updates in status.")
    ] = 5.0,
    resync: Annotated[
        float | None,
        typer.Option(min=0.1, help="Seconds between resyncs [default: reconcilationFrequencyInSecs]."),
    ] = None,
    retry_base: Annotated[
        float, typer.Option(min=0.01, help="First retry delay after a failed download.")
    ] = 10.0,
    retry_cap: Annotated[float, typer.Option(min=0.01, help="Longest retry delay.")] = 600.0,
    verify_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between full sha256 re-verifies of each model.")
    ] = 7 * 86400.0,
    verify_gap: Annotated[
        float, typer.Option(min=0.0, help="At most one full re-verify per this many seconds.")
    ] = 60.0,
    delete_unreferenced: Annotated[
        bool,
        typer.Option(help="Delete models as soon as no entry wants them (default: when space is needed)."),
    ] = False,
    metrics_host: Annotated[str, typer.Option(help="Address for /metrics, /healthz, /readyz.")] = "0.0.0.0",
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="Port for /metrics etc.")] = 9090,
    peer_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            envvar="MODELCACHE_PEER_PORT",
            help="Serve and fetch models node to node (0: off).",
        ),
    ] = 0,
    peer_host: Annotated[
        str, typer.Option(envvar="MODELCACHE_PEER_HOST", help="Address the peer server listens on.")
    ] = "0.0.0.0",
    peer_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="MODELCACHE_PEER_TOKEN_FILE",
            help="File with the cluster's shared peer token (a Secret); no token, no peering.",
        ),
    ] = None,
    peer_upload_rate: Annotated[
        str,
        typer.Option(envvar="MODELCACHE_PEER_UPLOAD_RATE", help="Cap on bytes/s served to peers (0: none)."),
    ] = "256Mi",
) -> None:
    """Fill this node's model cache from its LocalModelNode; report progress; retry, verify, evict."""
    import asyncio
    import logging
    import signal
    import sys

    from modelcache.agent.agent import Agent, Settings
    from modelcache.errors import UsageError
    from modelcache.quantity import parse_quantity
    from modelcache.store import default_root

    if not node_name:
        raise UsageError("NODE_NAME is empty: set it (downward API spec.nodeName) or pass --node-name")
    if low_watermark > high_watermark:
        raise UsageError("--low-watermark must not exceed --high-watermark")
    logger = logging.getLogger("modelcache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    settings = Settings(
        node_name=node_name,
        root=(root or default_root()).expanduser().absolute(),
        namespace=namespace,
        node_group=node_group or None,
        storage_limit=parse_quantity(storage_limit) if storage_limit else None,
        reserve=parse_quantity(reserve),
        high_watermark=high_watermark,
        low_watermark=low_watermark,
        max_concurrent=max_concurrent,
        progress_interval=progress_interval,
        resync_seconds=resync,
        retry_base=retry_base,
        retry_cap=retry_cap,
        verify_interval=verify_interval,
        verify_gap=verify_gap,
        delete_unreferenced=delete_unreferenced,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        peer_port=peer_port,
        peer_host=peer_host,
        peer_token=_peer_token(peer_token_file),
        peer_upload_rate=parse_quantity(peer_upload_rate) or None,
    )

    async def run() -> None:
        from lightkube import AsyncClient
        from lightkube.config.kubeconfig import KubeConfig
        from lightkube.core.exceptions import ConfigError

        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        except (ConfigError, OSError) as exc:
            raise UsageError(f"cannot load a Kubernetes configuration: {exc}") from exc
        client = AsyncClient(config, field_manager="modelcache-agent", trust_env=False)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await Agent(client, settings).run()
        except asyncio.CancelledError:
            logger.info("agent stopping")
        finally:
            await client.close()

    asyncio.run(run())


def _peer_token(path: Path | None) -> str:
    """The shared peer token (MODELCACHE_PEER_TOKEN, else the file); never echoed in errors."""
    import os

    from modelcache.errors import UsageError

    if token := os.environ.get("MODELCACHE_PEER_TOKEN", "").strip():
        return token
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the peer token file {path}: {exc.strerror}") from exc


if __name__ == "__main__":
    import sys

    from modelcache.errors import EXIT_INTERNAL, ModelcacheError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    try:
        app()  # exits itself on success and on usage errors
    except ModelcacheError as exc:
        sys.stderr.write(f"modelcache: error: {exc.message}\n")
        sys.exit(exc.exit_code)
    except Exception as exc:
        sys.stderr.write(f"modelcache: error: internal error: {type(exc).__name__}: {exc}\n")
        sys.exit(EXIT_INTERNAL)
