"""Our own components as local processes on the dev control plane: the controller, the webhook
and one node agent per simulated node (each with its own cache root and NODE_NAME).

They run with the admin kubeconfig: this is a playground (the e2e tests run each component under
its least-privilege RBAC instead). Each inherits our environment, so origin settings such as
HF_ENDPOINT or AWS_ENDPOINT_URL reach the agents. Components whose package is not in this build
are skipped with a line saying so.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightkube import ApiError, Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.admissionregistration_v1 import MutatingWebhookConfiguration
from lightkube.resources.core_v1 import Namespace

from modelcache.errors import ModelcacheError

from .processes import ProcessRecord, free_port, is_alive, log_tail, spawn, stop

JOB_NAMESPACE = "kserve-localmodel-jobs"  # KServe's default jobNamespace; a KServe install has it
WEBHOOK_CONFIGURATION = "modelcache-webhook"


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    return check


def _webhook_registered(client: Client) -> Callable[[], bool]:
    def check() -> bool:
        try:
            cfg = client.get(MutatingWebhookConfiguration, WEBHOOK_CONFIGURATION)
        except ApiError:
            return False
        return bool(cfg.webhooks) and all(w.clientConfig.caBundle for w in cfg.webhooks or [])

    return check


def plan(
    kubeconfig: Path,
    nodes: Sequence[str],
    node_root: Callable[[str], Path],
    client: Client,
    operator: bool = True,
) -> list[Component]:
    """What to start, in order. Pure apart from choosing free ports.

    Without `operator`, only the agents: the controller and webhook run elsewhere (as pods).
    """
    import os

    cli = [sys.executable, "-m", "modelcache.cli.main"]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    out: list[Component] = []
    if operator and importlib.util.find_spec("modelcache.controller") is not None:
        port = free_port()
        argv = [
            *cli,
            "controller",
            "--namespace",
            "kserve",
            "--kubeconfig",
            str(kubeconfig),
            "--health-port",
            str(port),
            "--health-host",
            "127.0.0.1",
        ]
        out.append(Component("controller", argv, env, _http_ok(f"http://127.0.0.1:{port}/healthz")))
    if operator and importlib.util.find_spec("modelcache.webhook") is not None:
        port = free_port()
        argv = [
            *cli,
            "webhook",
            "--url",
            f"https://127.0.0.1:{port}",
            "--port",
            str(port),
            "--register",
            "--namespace",
            "kserve",
        ]
        out.append(Component("webhook", argv, env, _webhook_registered(client)))
    if importlib.util.find_spec("modelcache.agent") is not None:
        for node in nodes:
            port = free_port()
            root = node_root(node)
            argv = [
                *cli,
                "agent",
                "--node-name",
                node,
                "--kubeconfig",
                str(kubeconfig),
                "--root",
                str(root),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(port),
                "--reserve",
                "0",
                "--namespace",
                "kserve",
            ]
            out.append(
                Component(
                    f"agent-{node}",
                    argv,
                    {**env, "NODE_NAME": node},
                    _http_ok(f"http://127.0.0.1:{port}/readyz"),
                )
            )
    return out


def start(
    client: Client,
    kubeconfig: Path,
    nodes: Sequence[str],
    node_root: Callable[[str], Path],
    logs: Path,
    running: Mapping[str, ProcessRecord],
    progress: Callable[[str], None],
    timeout: float = 60.0,
    operator: bool = True,
) -> list[ProcessRecord]:
    """Start every component not already running; return the records of all of them."""
    try:
        client.create(Namespace(metadata=ObjectMeta(name=JOB_NAMESPACE)))
    except ApiError as exc:
        if exc.status.code != 409:
            raise ModelcacheError(f"cannot create namespace {JOB_NAMESPACE}: {exc.status.message}") from exc
    for name in ("controller", "webhook", "agent"):
        if importlib.util.find_spec(f"modelcache.{name}") is None:
            progress(f"{name}: skipped (not in this build)")
    records: list[ProcessRecord] = []
    started: list[tuple[Component, ProcessRecord]] = []
    for comp in plan(kubeconfig, nodes, node_root, client, operator):
        old = running.get(comp.name)
        if old is not None and is_alive(old):
            records.append(old)
            continue
        _proc, rec = spawn(comp.name, comp.argv, logs / f"{comp.name}.log", comp.env)
        records.append(rec)
        started.append((comp, rec))
    deadline = time.monotonic() + timeout
    try:
        for comp, rec in started:
            while not comp.ready():
                if not is_alive(rec):
                    last = (log_tail(rec.log, 1) or "").strip()
                    raise ModelcacheError(f"{comp.name} exited during start-up: {last} (log {rec.log})")
                if time.monotonic() > deadline:
                    raise ModelcacheError(f"{comp.name} not ready after {timeout:.0f} s; see {rec.log}")
                time.sleep(0.2)
            progress(f"{comp.name} ready (pid {rec.pid}, log {rec.log})")
    except BaseException:
        for _comp, rec in started:
            stop(rec)
        raise
    return records


def records_from_state(data: Mapping[str, Any]) -> list[ProcessRecord]:
    return [ProcessRecord.from_json(r) for r in data.get("components", []) if isinstance(r, dict)]
