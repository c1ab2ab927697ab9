"""`modelcache dev up|down|status`: a local control plane for development and e2e tests.

Commands only; the work is in `modelcache.dev`. Progress goes to stderr so that stdout of `up` is just
`export KUBECONFIG=...`, usable as `eval "$(modelcache dev up)"`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from modelcache import dev
from modelcache.dev import realnode
from modelcache.errors import EXIT_INTERNAL, EXIT_NOT_FOUND, EXIT_USAGE, ModelcacheError

app = typer.Typer(
    name="dev",
    help="Local Kubernetes control plane (etcd + kube-apiserver) for development and e2e tests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: Components `up` would start next to the apiserver once they exist (package name, description).

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="MODELCACHE_HOME",
        help="modelcache home; the control plane lives in <home>/dev [default: ~/.cache/modelcache]",
        show_default=False,
    ),
]

P = ParamSpec("P")
R = TypeVar("R")


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Expected errors become one stderr line and their exit code; anything else exit 1, no traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ModelcacheError as exc:
            _err(f"error: {exc.message}")
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            _err(f"error: internal: {type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


@app.command()
@_one_line_errors
def up(
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="simulated nodes dev-node-1..N")] = 1,
    home: HomeOption = None,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for each server")
    ] = dev.controlplane.DEFAULT_TIMEOUT,
    real_node: Annotated[
        bool,
        typer.Option(
            "--real-node",
            help="also run a real worker (kubelet, containerd, kube-proxy, DNS) with the Helm chart "
            "installed on it; root, one per machine",
        ),
    ] = False,
    image: Annotated[
        Path | None,
        typer.Option(
            help="image archive for --real-node (default: dist/modelcache-image.tar, from make image)"
        ),
    ] = None,
    chart: Annotated[
        Path | None, typer.Option(help="chart for --real-node (default: charts/modelcache)")
    ] = None,
    helm_set: Annotated[
        list[str] | None, typer.Option("--set", help="extra helm value for --real-node (repeatable)")
    ] = None,
) -> None:
    """Start etcd and kube-apiserver, apply CRDs, create nodes; print `export KUBECONFIG=...`."""
    if not 0 <= nodes <= dev.controlplane.MAX_NODES:
        _err(f"error: --nodes must be between 0 and {dev.controlplane.MAX_NODES}, got {nodes}")
        raise typer.Exit(EXIT_USAGE)
    if timeout <= 0:
        _err("error: --timeout must be positive")
        raise typer.Exit(EXIT_USAGE)
    options = None
    if real_node:
        options = realnode.options(image, chart, helm_values=helm_set or ())
    elif image or chart or helm_set:
        _err("error: --image, --chart and --set need --real-node")
        raise typer.Exit(EXIT_USAGE)
    info = dev.up(home, nodes, timeout=timeout, progress=_err, with_components=True, real_node=options)
    _err(f"logs: {info.logs}")
    typer.echo(f"export KUBECONFIG={shlex.quote(str(info.kubeconfig))}")


@app.command()
@_one_line_errors
def down(home: HomeOption = None) -> None:
    """Stop everything `up` started (whole process groups) and remove its runtime files (logs stay)."""
    stopped = dev.down(home)
    _err(f"stopped {', '.join(stopped)}" if stopped else "nothing running")


@app.command()
@_one_line_errors
def status(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show whether the control plane runs. Exit 0 running, 3 stopped, 1 degraded."""
    current = dev.status(home)
    if as_json:
        payload = {
            "home": str(current.home),
            "phase": current.phase,
            "detail": current.detail,
            "processes": current.processes,
            "info": current.info.to_json() if current.info else None,
            # each simulated node's agent cache root (where `models/<key>/` lives), for tests and users
            "node_roots": {
                node: str(current.home / "dev" / "nodes" / node)
                for node in (current.info.nodes if current.info else ())
            },
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(f"{current.phase}: {current.detail}")
        if current.info is not None:
            info = current.info
            typer.echo(f"server:     {info.server}")
            typer.echo(f"kubeconfig: {info.kubeconfig}")
            for rec in (info.apiserver, info.etcd):
                state = "alive" if current.processes.get(rec.name) else "dead"
                typer.echo(f"{rec.name + ':':15} pid {rec.pid} ({state}), log {rec.log}")
            typer.echo(f"nodes:      {', '.join(info.nodes) or '-'}")
            typer.echo(f"crds:       {len(info.crds)}")
    if current.phase == "stopped":
        raise typer.Exit(EXIT_NOT_FOUND)
    if current.phase != "running":
        raise typer.Exit(EXIT_INTERNAL)


if __name__ == "__main__":
    app()
