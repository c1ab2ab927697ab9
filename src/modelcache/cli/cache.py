"""`modelcache cache ...` (and `kubectl modelcache ...`): operate the cluster's model caches.

Commands only: parsing, printing, waiting. Cluster access is `kube.client` (kubectl's kubeconfig
rules), every figure is computed by `kube.cacheview` from status the controller and the agents
already report. Tables for people, `--json` for programs.

Exit codes: 0 ok · 2 usage · 3 not found · 6 node error (preload --wait) or API unreachable ·
7 conflict (clear of a cache in use, preload of a name taken by another URI) · 124 --wait timed out.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

from modelcache.errors import ConflictError, ModelcacheError, NotFoundError, SourceError, UsageError
from modelcache.kube import cacheview as cv
from modelcache.kube import client as kc
from modelcache.quantity import format_bytes, parse_quantity
from modelcache.safepath import printable
from modelcache.uri import redact

EXIT_TIMEOUT = 124


class WaitTimeout(ModelcacheError):
    """--wait ran out of time (exit 124, as timeout(1))."""

    exit_code = EXIT_TIMEOUT


class NodeError(SourceError):
    """A node reported a download error while we waited (exit 6)."""


app = typer.Typer(
    help="Operate the cluster's model caches (LocalModelCache) with kubectl's kubeconfig rules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Kubeconfig = Annotated[
    str | None, typer.Option("--kubeconfig", help="Kubeconfig file (default: KUBECONFIG).")
]
Context = Annotated[str | None, typer.Option("--context", help="Kubeconfig context.")]
Namespace = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace (namespace caches).")]
AllNs = Annotated[bool, typer.Option("--all-namespaces", "-A", help="Namespace caches in every namespace.")]
Json = Annotated[bool, typer.Option("--json", help="JSON for programs.")]


def _kube(
    kubeconfig: str | None, context: str | None, namespace: str | None, all_ns: bool = False
) -> kc.Kube:
    return kc.connect(kc.KubeTarget(kubeconfig, context, namespace, all_ns))


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def _table(headers: list[str], rows: Iterable[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False)
    for h in headers:
        table.add_column(h, no_wrap=h not in ("URI", "NODES", "LAST ERROR", "MESSAGE"), overflow="fold")
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # Text: brackets in a name are not rich markup
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def _age(ts: float | None, now: float) -> str:
    from modelcache.duration import format_duration

    return "-" if ts is None else format_duration(now - ts)


def _list_caches(kube: kc.Kube, *, namespaced: bool = True) -> list[dict[str, Any]]:
    """Cluster caches, then namespace caches of the namespace (or every one with -A)."""
    with kc.api_errors("listing LocalModelCaches"):
        objs = [kc.plain(o) for o in kube.client.list(kc.LocalModelCache)]
    if namespaced:
        ns = "*" if kube.all_namespaces else kube.namespace
        try:
            with kc.api_errors("listing LocalModelNamespaceCaches"):
                objs += [kc.plain(o) for o in kube.client.list(kc.LocalModelNamespaceCache, namespace=ns)]
        except NotFoundError:  # an older CRD set without namespace caches
            pass
    return objs


def _get_cache(kube: kc.Kube, name: str) -> dict[str, Any]:
    """A cluster cache by name; with an explicit -n, the namespace cache there."""
    if kube.namespace_given:
        with kc.api_errors(f"LocalModelNamespaceCache {kube.namespace}/{name}"):
            return kc.plain(kube.client.get(kc.LocalModelNamespaceCache, name, namespace=kube.namespace))
    with kc.api_errors(f"LocalModelCache {name}"):
        return kc.plain(kube.client.get(kc.LocalModelCache, name))


def _model_nodes(kube: kc.Kube) -> list[dict[str, Any]]:
    with kc.api_errors("listing LocalModelNodes"):
        return [kc.plain(o) for o in kube.client.list(kc.LocalModelNode)]


def _workloads(kube: kc.Kube) -> list[Any]:
    """Every workload using some cache, by the controller's own rules."""
    from lightkube.resources.core_v1 import Pod

    from modelcache.controller.reconcile import pod_service_from, service_from

    out: list[Any] = []
    try:
        with kc.api_errors("listing InferenceServices"):
            for o in kube.client.list(kc.InferenceService, namespace="*"):
                out.append(service_from({**kc.plain(o), "kind": "InferenceService"}))
    except NotFoundError:  # KServe's InferenceService CRD is not installed
        pass
    with kc.api_errors("listing Pods"):
        for pod in kube.client.list(Pod, namespace="*"):
            d = kc.plain(pod)
            if ((d.get("status") or {}).get("phase")) in ("Succeeded", "Failed"):
                continue
            out.append(service_from({**d, "kind": "Pod"}) or pod_service_from(d))
    return [s for s in out if s is not None]


# -- list -------------------------------------------------------------------------------------------
@app.command("list")
def list_(
    output: Annotated[str | None, typer.Option("--output", "-o", help="wide: per-node state.")] = None,
    as_json: Json = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    all_namespaces: AllNs = False,
) -> None:
    """Caches: name, URI, size, node groups, copies available/total, nodes downloading, age."""
    if output not in (None, "wide"):
        raise UsageError(f"-o {printable(output or '')}: only `wide` (or --json)")
    kube = _kube(kubeconfig, context, namespace, all_namespaces)
    now = time.time()
    views = sorted((cv.cache_view(o) for o in _list_caches(kube)), key=lambda v: (v.namespace, v.name))
    if as_json:
        _emit([v.as_dict(now) for v in views])
        return
    if not views:
        sys.stdout.write("no model caches\n")
        return
    headers = ["NAME", "NAMESPACE", "URI", "SIZE", "NODE GROUPS", "COPIES", "DOWNLOADING", "AGE"]
    if output == "wide":
        headers.append("NODES")
    rows = []
    for v in views:
        down = ", ".join(
            f"{n.node} {n.percent:.0f}%" if n.percent is not None else n.node for n in v.downloading
        )
        row = [
            v.name + (" (deleting)" if v.deleting else ""),
            v.namespace or "-",
            v.uri,
            _bytes(v.size_bytes),
            ",".join(v.node_groups),
            f"{v.available}/{v.total}" + (f" ({v.failed} failed)" if v.failed else ""),
            down or "-",
            _age(v.created_at, now),
        ]
        if output == "wide":
            row.append(" ".join(f"{n.node}={n.state}" for n in v.nodes) or "-")
        rows.append(row)
    _table(headers, rows)


# -- preload ----------------------------------------------------------------------------------------
def _slug(uri: str) -> str:
    """A DNS-1123 name from the URI's last segment plus the storage key's head (unique per URI)."""
    import re

    from modelcache.uri import storage_key

    tail = redact(uri).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0].lower()
    base = re.sub(r"[^a-z0-9-]+", "-", tail).strip("-")[:40].strip("-") or "model"
    return f"{base}-{storage_key(uri)[:6]}"


def _source_size(uri: str) -> int:
    """The model's size as its source reports it (through our sources: same auth, same listing)."""
    from modelcache.sources import SourceOptions, open_source
    from modelcache.uri import parse_uri

    async def resolve() -> int:
        source = open_source(parse_uri(uri), SourceOptions())
        try:
            snap = await source.resolve()
        finally:
            await source.aclose()
        if any(f.size is None for f in snap.files):
            raise UsageError(
                f"{printable(redact(uri))}: the source does not say every file's size; use --size"
            )
        return snap.total_bytes

    return asyncio.run(resolve())


@app.command()
def preload(
    uri: Annotated[str, typer.Argument(help="Model URI (s3://, gs://, hf://, https://, ...).")],
    name: Annotated[str | None, typer.Option("--name", help="Cache name (default: from the URI).")] = None,
    node_group: Annotated[
        list[str] | None, typer.Option("--node-group", help="Node group (repeatable; default: every group).")
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="Model size, e.g. 15Gi (default: ask the source).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every node has its copy.")] = False,
    timeout: Annotated[
        str, typer.Option("--timeout", help="With --wait: give up after this (exit 124).")
    ] = "30m",
    as_json: Json = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Create a LocalModelCache (a LocalModelNamespaceCache with -n) so every node fetches the model."""
    from lightkube import codecs

    from modelcache.duration import parse_duration
    from modelcache.uri import parse_uri

    parse_uri(uri)  # a bad URI is exit 2 before anything is created
    deadline = time.monotonic() + parse_duration(timeout, "--timeout")
    kube = _kube(kubeconfig, context, namespace)
    with kc.api_errors("listing LocalModelNodeGroups"):
        groups = sorted(
            str(kc.plain(g)["metadata"]["name"]) for g in kube.client.list(kc.LocalModelNodeGroup)
        )
    wanted = sorted(set(node_group or groups))
    missing = [g for g in wanted if g not in groups]
    if not groups:
        raise NotFoundError("no LocalModelNodeGroup in the cluster; create one first")
    if missing:
        raise NotFoundError(f"node group {printable(missing[0])} not found (have: {', '.join(groups)})")
    size_bytes = parse_quantity(size) if size is not None else _source_size(uri)
    cache_name = name or _slug(uri)
    body: dict[str, Any] = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNamespaceCache" if kube.namespace_given else "LocalModelCache",
        "metadata": {"name": cache_name, **({"namespace": kube.namespace} if kube.namespace_given else {})},
        "spec": {"sourceModelUri": uri, "modelSize": str(size_bytes), "nodeGroups": wanted},
    }
    created = True
    try:
        with kc.api_errors(f"creating {body['kind']} {cache_name}"):
            kube.client.create(codecs.from_dict(body))
    except ConflictError:
        existing = _get_cache(kube, cache_name)
        if (existing.get("spec") or {}).get("sourceModelUri") != uri:
            raise ConflictError(
                f"cache {cache_name} exists for another URI ({cv.cache_view(existing).uri}); use --name"
            ) from None
        created = False
    verb = "created" if created else "exists:"
    if not as_json:
        sys.stderr.write(f"{verb} cache {cache_name} ({format_bytes(size_bytes)}) on {', '.join(wanted)}\n")
    view = cv.cache_view(_get_cache(kube, cache_name))
    if wait:
        view = _wait_ready(kube, cache_name, deadline)
    if as_json:
        _emit({**view.as_dict(time.time()), "created": created})
    else:
        sys.stdout.write(f"{cache_name}\n")


def _wait_ready(kube: kc.Kube, name: str, deadline: float) -> cv.CacheView:
    """Poll the cache's status; one progress bar summed over nodes; exit 6 on a node error, 124 late."""
    bar = _Bar(name)
    try:
        while True:
            view = cv.cache_view(_get_cache(kube, name))
            p = cv.progress(
                view, _node_errors(kube, view) if any(n.state == "Error" for n in view.nodes) else None
            )
            bar.update(p.done, p.total, f"{view.available}/{view.total} copies")
            if p.errors:
                node, reason = p.errors[0]
                more = f" (and {len(p.errors) - 1} more node(s))" if len(p.errors) > 1 else ""
                raise NodeError(f"node {node}: {reason}{more}")
            if p.ready:
                return view
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"timed out waiting for {name}: {view.available}/{view.total} copies, "
                    f"{format_bytes(p.done)} of {format_bytes(p.total)}"
                )
            time.sleep(1.0)
    finally:
        bar.close()


def _node_errors(kube: kc.Kube, view: cv.CacheView) -> dict[str, str]:
    """lastError of each node's LocalModelNode for this cache (the agent's own words, redacted)."""
    out: dict[str, str] = {}
    for lmn in _model_nodes(kube):
        detail = ((lmn.get("status") or {}).get("models") or {}).get(view.status_key) or {}
        if detail.get("lastError"):
            out[str(lmn["metadata"]["name"])] = cv.scrub(str(detail["lastError"]))
    return out


class _Bar:
    """A rich bar on a TTY; otherwise a plain line every few seconds (logs stay readable)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.progress: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(stderr=True),
            )
            self.task = self.progress.add_task(label, total=None, note="")
            self.progress.start()

    def update(self, done: int, total: int, note: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total or None, note=note)
        elif time.monotonic() - self.last >= 5:
            self.last = time.monotonic()
            pct = f"{100 * done / total:.0f}%" if total else "-"
            sys.stderr.write(f"{self.label}: {format_bytes(done)} of {format_bytes(total)} ({pct}), {note}\n")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- status -----------------------------------------------------------------------------------------
@app.command()
def status(
    name: Annotated[str, typer.Argument(help="Cache name.")],
    as_json: Json = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """One cache: per node state, bytes, rate, last error, since when; workloads using it; events."""
    kube = _kube(kubeconfig, context, namespace)
    now = time.time()
    view = cv.cache_view(_get_cache(kube, name))
    errors = _node_errors(kube, view)
    nodes = [
        {
            **n.as_dict(),
            "rate_bytes_per_second": n.rate(now),
            "last_error": n.message or errors.get(n.node, ""),
        }
        for n in view.nodes
    ]
    used_by = cv.users(view, _workloads(kube))
    events = _events(kube, view)
    if as_json:
        _emit({**view.as_dict(now), "nodes": nodes, "used_by": used_by, "events": events})
        return
    out = sys.stdout
    out.write(f"Name:        {view.name}{' (namespace ' + view.namespace + ')' if view.namespace else ''}\n")
    out.write(f"URI:         {view.uri}\n")
    out.write(f"Storage key: {view.key}\n")
    out.write(f"Size:        {_bytes(view.size_bytes)}\n")
    out.write(f"Node groups: {', '.join(view.node_groups)}\n")
    out.write(f"Copies:      {view.available}/{view.total} available, {view.failed} failed\n")
    if view.deleting:
        out.write("Deleting:    yes\n")
    out.write("\n")
    rows = []
    for n, d in zip(view.nodes, nodes, strict=True):
        rate = d["rate_bytes_per_second"]
        since = n.finished_at if n.state == "Downloaded" else n.started_at
        done = f"{_bytes(n.bytes_done)}/{_bytes(n.bytes_total)}" if n.bytes_total else _bytes(n.bytes_done)
        rows.append(
            [
                n.node,
                n.state,
                done,
                f"{format_bytes(rate)}/s" if rate else "-",
                _age(since, now),
                d["last_error"] or "-",
            ]
        )
    if rows:
        _table(["NODE", "STATE", "BYTES", "RATE", "SINCE", "LAST ERROR"], rows)
    else:
        out.write("no node status yet\n")
    out.write("\nUsed by:\n" + ("".join(f"  {u}\n" for u in used_by) or "  (nothing)\n"))
    out.write("\nEvents:\n")
    if events:
        _table(
            ["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            [[_age(e["time"], now), e["type"], e["reason"], e["object"], e["message"]] for e in events],
        )
    else:
        out.write("  (none)\n")


def _events(kube: kc.Kube, view: cv.CacheView, limit: int = 20) -> list[dict[str, Any]]:
    """Events about the cache, and agents' events on nodes that mention it (its name or key)."""
    from lightkube.resources.core_v1 import Event

    found: list[dict[str, Any]] = []
    with kc.api_errors("listing Events"):
        for kind in ("LocalModelCache", "LocalModelNamespaceCache", "LocalModelNode"):
            selector: dict[str, Any] = {"involvedObject.kind": kind}
            if kind != "LocalModelNode":
                selector["involvedObject.name"] = view.name
            for e in kube.client.list(Event, namespace="*", fields=selector):
                msg = str(e.message or "")
                if kind == "LocalModelNode" and view.name not in msg and view.key not in msg:
                    continue
                when = e.lastTimestamp or e.eventTime or e.firstTimestamp or e.metadata.creationTimestamp
                found.append(
                    {
                        "time": when.timestamp() if when else None,
                        "type": str(e.type or ""),
                        "reason": printable(str(e.reason or ""), 80),
                        "object": f"{kind}/{e.involvedObject.name}",
                        "message": cv.scrub(msg),
                    }
                )
    found.sort(key=lambda e: e["time"] or 0)
    return found[-limit:]


# -- clear ------------------------------------------------------------------------------------------
@app.command()
def clear(
    names: Annotated[list[str] | None, typer.Argument(help="Cache names.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every cache (of the namespace with -n).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what each node would free.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the caches are gone.")] = False,
    timeout: Annotated[
        str, typer.Option("--timeout", help="With --wait: give up after this (exit 124).")
    ] = "10m",
    as_json: Json = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Delete caches. A cache some workload uses is refused, naming them (exit 7)."""
    from modelcache.duration import parse_duration

    if bool(names) == all_:
        raise UsageError("name the caches to clear, or use --all")
    deadline = time.monotonic() + parse_duration(timeout, "--timeout")
    kube = _kube(kubeconfig, context, namespace)
    if all_:
        objs = [
            o
            for o in _list_caches(kube, namespaced=kube.namespace_given)
            if not kube.namespace_given or o.get("kind") == "LocalModelNamespaceCache"
        ]
    else:
        objs = [_get_cache(kube, n) for n in dict.fromkeys(names or [])]
    views = [cv.cache_view(o) for o in objs]
    workloads = _workloads(kube)
    busy = [(v, cv.users(v, workloads)) for v in views]
    busy = [(v, u) for v, u in busy if u]
    if busy:
        v, u = busy[0]
        more = f" (and {len(busy) - 1} more cache(s) in use)" if len(busy) > 1 else ""
        raise ConflictError(f"cache {v.name} is in use by {', '.join(u[:5])}{more}; nothing deleted")
    model_nodes = _model_nodes(kube)
    freed = {v.status_key: cv.frees(v, model_nodes) for v in views}
    plan = [{"name": v.name, "namespace": v.namespace or None, "frees": freed[v.status_key]} for v in views]
    if not dry_run:
        for v in views:
            _delete(kube, v)
        if wait:
            _wait_gone(kube, views, deadline)
    if as_json:
        _emit({"dry_run": dry_run, "caches": plan})
        return
    verb = "would delete" if dry_run else "deleted"
    for v in views:
        where = ", ".join(f"{format_bytes(b)} on {n}" for n, b in freed[v.status_key].items())
        sys.stdout.write(f"{verb} {v.name}: frees {where or 'nothing on any node'}\n")


def _delete(kube: kc.Kube, v: cv.CacheView) -> None:
    try:
        if v.namespace:
            with kc.api_errors(f"deleting LocalModelNamespaceCache {v.namespace}/{v.name}"):
                kube.client.delete(kc.LocalModelNamespaceCache, v.name, namespace=v.namespace)
        else:
            with kc.api_errors(f"deleting LocalModelCache {v.name}"):
                kube.client.delete(kc.LocalModelCache, v.name)
    except NotFoundError:  # gone meanwhile: that is what we wanted
        pass


def _wait_gone(kube: kc.Kube, views: list[cv.CacheView], deadline: float) -> None:
    """Until each cache object is gone and no node reports it any more."""

    def left() -> list[str]:
        out = []
        for v in views:
            try:
                _get_named(kube, v)
                out.append(v.name)
            except NotFoundError:
                pass
        reported = {
            k for lmn in _model_nodes(kube) for k in (((lmn.get("status") or {}).get("modelStatus")) or {})
        }
        out += [f"{v.name} (still on nodes)" for v in views if v.status_key in reported and v.name not in out]
        return out

    _poll(left, deadline, "deletion")


def _get_named(kube: kc.Kube, v: cv.CacheView) -> None:
    if v.namespace:
        with kc.api_errors(f"LocalModelNamespaceCache {v.namespace}/{v.name}"):
            kube.client.get(kc.LocalModelNamespaceCache, v.name, namespace=v.namespace)
    else:
        with kc.api_errors(f"LocalModelCache {v.name}"):
            kube.client.get(kc.LocalModelCache, v.name)


def _poll(pending: Callable[[], list[str]], deadline: float, what: str) -> None:
    while True:
        left = pending()
        if not left:
            return
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out waiting for {what}: {', '.join(left[:5])}")
        time.sleep(1.0)


# -- nodes ------------------------------------------------------------------------------------------
@app.command()
def nodes(
    as_json: Json = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Per node group and node: budget, used, free, models held, agent health."""
    from lightkube.resources.core_v1 import Node

    from modelcache.controller.reconcile import group_from, node_from

    kube = _kube(kubeconfig, context, None)
    with kc.api_errors("listing LocalModelNodeGroups and Nodes"):
        groups = [group_from(kc.plain(g)) for g in kube.client.list(kc.LocalModelNodeGroup)]
        cluster_nodes = [node_from(kc.plain(n)) for n in kube.client.list(Node)]
    rows = cv.node_rows(groups, cluster_nodes, _model_nodes(kube))
    if as_json:
        _emit([r.as_dict() for r in rows])
        return
    if not rows:
        sys.stdout.write("no node group has member nodes\n")
        return
    _table(
        ["GROUP", "NODE", "BUDGET", "USED", "FREE", "MODELS", "AGENT"],
        [
            [r.group, r.node, _bytes(r.budget), format_bytes(r.used), _bytes(r.free), str(r.models), r.health]
            for r in rows
        ],
    )
    for r in rows:
        for e in r.errors:
            sys.stdout.write(f"{r.node}: {e}\n")


def main() -> None:
    """`kubectl-modelcache`: kubectl runs it for `kubectl modelcache ...`."""
    from modelcache.cli.main import main as modelcache_main

    sys.argv = [sys.argv[0], "cache", *sys.argv[1:]]
    modelcache_main()
