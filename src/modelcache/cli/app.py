"""The typer app: parse, call the engine/store, print. No business logic here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from modelcache.errors import IntegrityError, NotFoundError, UsageError
from modelcache.quantity import format_bytes, parse_quantity
from modelcache.safepath import printable
from modelcache.store import ModelRecord, Store
from modelcache.uri import redact

app = typer.Typer(
    name="modelcache",
    help="Download each model once onto local disk, verified, and start from the local copy.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
log = logging.getLogger("modelcache")


@dataclass
class Globals:
    home: Path | None = None
    quiet: bool = False
    debug: bool = False

    def store(self) -> Store:
        return Store(self.home)


G = Globals()


def _shown(uri: str) -> str:
    """A URI for output: no secrets, no control characters (a tampered index may hold any)."""
    return printable(redact(uri), 1000)


class _TextFormatter(logging.Formatter):
    """Log lines with control characters escaped, so a name cannot forge or split a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), 4000)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"ts": record.created, "level": record.levelname.lower(), "msg": record.getMessage()}
        )


@app.callback()
def _globals(
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="MODELCACHE_HOME", help="Cache root (default ~/.cache/modelcache)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    log_format: Annotated[str, typer.Option("--log-format", help="text or json")] = "text",
) -> None:
    G.home, G.debug, G.quiet = home, debug, quiet
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    elif log_format == "text":
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    else:
        raise typer.BadParameter("use text or json", param_hint="--log-format")
    root = logging.getLogger("modelcache")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


# -- pull / path -------------------------------------------------------------------------------
@app.command()
def pull(
    uri: Annotated[str, typer.Argument(help="Model URI (file://, http(s)://) or a local path.")],
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit (sources with revisions).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Only files matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip files matching this glob (repeatable).")
    ] = None,
    connections: Annotated[
        int | None, typer.Option(min=1, max=256, help="Parallel connections (default 32).")
    ] = None,
    limit_rate: Annotated[str | None, typer.Option(help="Bandwidth cap per second, e.g. 50Mi.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the path.")] = False,
) -> None:
    """Download a model into the cache (once), verify it, print its directory."""
    from modelcache.cli.progress import make_progress
    from modelcache.engine import pull as do_pull
    from modelcache.sources import SourceOptions
    from modelcache.transfer import TransferConfig

    config = TransferConfig()
    if connections:
        config.connections = connections
    if limit_rate:
        config.limit_rate = parse_quantity(limit_rate)
    options = SourceOptions(revision=revision, include=tuple(include or ()), exclude=tuple(exclude or ()))
    store = G.store()
    from modelcache.uri import parse_uri

    label = redact(parse_uri(uri).uri).rstrip("/").rsplit("/", 1)[-1] or redact(uri)
    progress = make_progress(label, quiet=G.quiet)
    with progress if progress is not None else contextlib.nullcontext():
        result = asyncio.run(do_pull(store, uri, options=options, config=config, on_event=progress))
    rec = result.record
    if result.hit:
        log.info(
            "cache hit: %s (%s) in %.0f ms", rec.key, format_bytes(rec.size_bytes), result.seconds * 1000
        )
    else:
        rate = result.bytes_fetched / max(result.seconds, 1e-9)
        log.info(
            "pulled %s: %s in %.1f s (%s/s)",
            rec.key,
            format_bytes(rec.size_bytes),
            result.seconds,
            format_bytes(rate),
        )
    if as_json:
        _emit_json(
            {
                **rec.as_dict(),
                "hit": result.hit,
                "seconds": round(result.seconds, 3),
                "bytes_fetched": result.bytes_fetched,
            }
        )
    else:
        sys.stdout.write(f"{rec.path}\n")


@app.command()
def path(ref: Annotated[str, typer.Argument(help="URI, local path or key.")]) -> None:
    """Print the model directory if it is cached (exit 0), else exit 3."""
    store = G.store()
    rec = store.get(ref)
    store.touch(rec.key)
    sys.stdout.write(f"{rec.path}\n")


# -- inspect -----------------------------------------------------------------------------------
@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="JSON list of models.")] = False) -> None:
    """List cached models, most recently used first, then downloads in progress."""
    records = G.store().list_models()
    if as_json:
        _emit_json([r.as_dict() for r in records])
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for col in ("KEY", "STATE", "SIZE", "FILES", "LAST USED", "PIN"):
        table.add_column(col, justify="right" if col in ("SIZE", "FILES") else "left", no_wrap=True)
    table.add_column("URI", overflow="fold")
    for r in records:
        table.add_row(
            r.key,
            r.state,
            format_bytes(r.size_bytes),
            str(r.file_count),
            _ago(r.last_used_at),
            "yes" if r.pinned else "",
            Text(_shown(r.uri)),  # Text: brackets in a URI are not rich markup
        )
    console = Console()
    if records:
        console.print(table)
    total = sum(r.size_bytes for r in records if r.state == "complete")
    console.print(
        f"{sum(r.state == 'complete' for r in records)} model(s), {format_bytes(total)} in {G.store().root}",
        markup=False,
    )


@app.command()
def show(ref: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Details of one cached model: files, sizes, checksums, revision."""
    store = G.store()
    rec = store.get(ref)
    try:
        m = store.manifest(rec.key)
    except NotFoundError as exc:  # the model is there, its manifest is not: damage, not "not cached"
        raise IntegrityError(f"manifest missing for {rec.key}; `modelcache rm --force {rec.key}`") from exc
    data = {**rec.as_dict(), "source": m.source, "files": [f.__dict__ for f in m.files]}
    if as_json:
        _emit_json(data)
        return
    for k in ("key", "uri", "path", "state", "revision", "pinned", "in_use"):
        sys.stdout.write(f"{k:>10}: {printable(str(data[k]), 1000)}\n")
    sys.stdout.write(f"{'size':>10}: {format_bytes(rec.size_bytes)} in {rec.file_count} file(s)\n")
    sys.stdout.write(f"{'last used':>10}: {_ago(rec.last_used_at)}\n")
    for f in m.files:
        sys.stdout.write(f"  {f.sha256[:16]}  {format_bytes(f.size):>10}  {printable(f.path, 1000)}\n")


# -- change ------------------------------------------------------------------------------------
@app.command()
def rm(
    refs: Annotated[list[str], typer.Argument(help="URIs or keys.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Also remove pinned models.")] = False,
) -> None:
    """Remove models (or interrupted downloads). Pinned ones need --force; models in use are never removed."""
    from modelcache.store.plans import observe_targets, plan_removal

    store = G.store()
    plan = plan_removal(observe_targets(store, refs, force=force), force=force)
    plan.check()
    done = plan.removals if dry_run else plan.execute(store).removed
    for r in done:
        size = f" {format_bytes(r.size_bytes)}" if r.kind != "damaged" else ""
        sys.stdout.write(f"{'would remove' if dry_run else 'removed'} {r.describe()}{size}\n")


@app.command()
def pin(ref: str) -> None:
    """Protect a model from gc and from rm without --force."""
    store = G.store()
    rec = store.get(ref)
    store.set_pinned(rec.key, True)
    sys.stdout.write(f"pinned {rec.key} {_shown(rec.uri)}\n")


@app.command()
def unpin(ref: str) -> None:
    """Let gc evict a model again."""
    store = G.store()
    rec = store.get(ref)
    store.set_pinned(rec.key, False)
    sys.stdout.write(f"unpinned {rec.key} {_shown(rec.uri)}\n")


@app.command()
def verify(
    ref: Annotated[str | None, typer.Argument(help="URI or key (default: every model).")] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Re-hash every byte (slow); default checks files and sizes.")
    ] = False,
) -> None:
    """Check models against their manifests. Exit 4 and name the file on any mismatch."""
    store = G.store()
    store.repair()
    recs: list[ModelRecord] = (
        [store.get(ref)] if ref else [r for r in store.list_models() if r.state == "complete"]
    )
    bad: list[str] = []
    for rec in recs:
        problems = store.verify(rec.key, full=full)
        status = "ok" if not problems else "FAILED"
        sys.stdout.write(f"{status:>6} {rec.key} {_shown(rec.uri)}\n")
        for p in problems:
            sys.stdout.write(f"         {printable(p, 1000)}\n")
            bad.append(f"{rec.key}: {p}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(f"verification failed: {bad[0]}{more}")


@app.command()
def gc(
    max_size: Annotated[
        str | None, typer.Option("--max-size", help="Shrink the cache to this size, e.g. 100Gi.")
    ] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Remove models unused for this long, e.g. 7d.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan only.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Remove models unused for --older-than, then least-recently-used ones until the cache fits
    --max-size; pinned and in-use models stay. Also compacts the usage log (`modelcache stats`)."""
    from modelcache.duration import parse_duration
    from modelcache.store.plans import observe_candidates, plan_gc

    if max_size is None and older_than is None:
        raise UsageError("gc needs --max-size and/or --older-than")
    target = parse_quantity(max_size) if max_size is not None else None
    age = parse_duration(older_than, "--older-than") if older_than is not None else None
    store = G.store()
    plan = plan_gc(observe_candidates(store), max_size=target, older_than=age, now=time.time())
    done = plan.removals if dry_run else plan.execute(store).removed
    if not dry_run:
        from modelcache.stats import compact

        compact(store.root)
    if as_json:
        _emit_json(
            {
                **plan.as_dict(),
                "dry_run": dry_run,
                "evict": [r.key for r in done],
                "older_than": age,
                "freed": sum(r.size_bytes for r in done),
            }
        )
    else:
        verb = "would evict" if dry_run else "evicted"
        for r in done:
            sys.stdout.write(f"{verb} {r.key} {format_bytes(r.size_bytes)} ({r.reason})\n")
        goal = f" (target {format_bytes(target)})" if target is not None else ""
        sys.stdout.write(f"{format_bytes(plan.total_before)} -> {format_bytes(plan.total_after)}{goal}\n")
    if not plan.satisfied and target is not None:
        log.warning(
            "pinned or in-use models alone exceed %s; nothing else can be evicted", format_bytes(target)
        )


@app.command()
def stats(
    since: Annotated[
        str | None, typer.Option("--since", help="Window: the last D (e.g. 24h, 7d); default all time.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    textfile: Annotated[
        Path | None,
        typer.Option("--textfile", help="Also write the figures for Prometheus' textfile collector."),
    ] = None,
) -> None:
    """Size, models and volume use of the cache; hit rate and time saved by `initialize` hits."""
    from modelcache.duration import format_duration, parse_duration
    from modelcache.stats import observe, prometheus, write_textfile

    now = time.time()
    window = parse_duration(since, "--since") if since is not None else None
    s = observe(G.store().root, now - window if window is not None else None, now)
    if textfile is not None:
        write_textfile(textfile, prometheus(s))
    if as_json:
        _emit_json(s.as_dict())
        return
    vol = s.volume
    used = f"; volume {format_bytes(vol.total)}, {vol.used * 100 // max(vol.total, 1)}% used, " if vol else ""
    free = f"{format_bytes(vol.free)} free" if vol else ""
    rate = f"{s.hit_rate:.1%}" if s.hit_rate is not None else "-"
    modes = ", ".join(f"{m} {n}" for m, n in sorted(s.modes.items())) or "-"
    lines = [
        f"cache:      {s.models} model(s), {format_bytes(s.size_bytes)}{used}{free}",
        f"window:     {'last ' + format_duration(window) if window is not None else 'all time'}",
        f"starts:     {s.starts} ({s.hits} hit(s), {s.misses} miss(es)); hit rate {rate}",
        f"served:     {format_bytes(s.bytes_served)} ({modes}); "
        f"downloaded {format_bytes(s.bytes_downloaded)}",
        f"time saved: {format_duration(s.time_saved_seconds)} ({s.time_saved_seconds:.1f} s)",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


# -- air-gapped bundles ------------------------------------------------------------------------
@app.command("export")
def export_(
    ref: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write (.tar).")],
) -> None:
    """Write a cached model and its manifest as a tar bundle for another site."""
    from modelcache.bundle import export_bundle

    store = G.store()
    rec = store.get(ref)
    size = export_bundle(store, rec.key, output)
    sys.stdout.write(f"exported {rec.key} to {output} ({format_bytes(size)})\n")


@app.command("import")
def import_(bundle: Path) -> None:
    """Load a bundle into the cache, verifying every file against its manifest."""
    from modelcache.bundle import import_bundle

    rec = import_bundle(G.store(), bundle)
    sys.stdout.write(f"{rec.path}\n")


@app.command()
def initialize(
    args: Annotated[
        list[str], typer.Argument(help="SRC_URI DEST_DIR pairs, as KServe's storage initializer.")
    ],
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", envvar="MODELCACHE_CACHE_DIR", help="Shared cache (e.g. an RWX volume)."),
    ] = None,
) -> None:
    """Storage-initializer drop-in: fill DEST from the shared cache (download into it once on a miss)."""
    from modelcache.initializer import initialize as init_one
    from modelcache.initializer import pairs

    for uri, dest in pairs(args):
        res = asyncio.run(init_one(uri, dest, cache_dir=cache_dir))
        sys.stdout.write(
            json.dumps(
                {
                    "uri": redact(res.uri),
                    "dest": str(res.dest),
                    "hit": res.hit,
                    "method": res.method,
                    "seconds": round(res.seconds, 3),
                    "bytes": res.bytes,
                }
            )
            + "\n"
        )


_OPTIONAL = ("dev", "controller", "agent", "webhook", "kserve", "cache")


def _mount_optional(only: str | None = None) -> None:
    """Commands that live in their own modules join when present. Only the one being run is
    imported (the dev control plane pulls in lightkube: ~100 ms every `pull` would pay), all of
    them for help output.

    `cli/dev.py` is a typer sub-app; `cli/<name>.py` for controller, agent and webhook exposes
    `main`, a typer command function.
    """
    import importlib

    for name in _OPTIONAL if only is None else (only,):
        try:
            module = importlib.import_module(f"modelcache.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"modelcache.cli.{name}":
                raise
            continue
        if name == "dev":
            app.add_typer(
                module.app,
                name="dev",
                help="Local control plane (etcd + kube-apiserver) for trying the operator.",
            )
        elif name == "kserve":
            app.add_typer(module.app, name="kserve", help="Migrating from KServe's local model cache.")
        elif name == "cache":
            app.add_typer(module.app, name="cache", help="The cluster's model caches (kubectl modelcache).")
        else:
            app.command(name)(module.main)


def _command_word(argv: list[str]) -> str | None:
    """The subcommand in argv (skipping global options), or None."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("--home", "--log-format") else 1
    return argv[i] if i < len(argv) else None


def run(argv: list[str]) -> int:
    word = _command_word(argv)
    builtin = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    if word is None or word not in builtin:
        _mount_optional(word if word in _OPTIONAL else None)
    if not argv:
        argv = ["--help"]
    try:
        rv = app(args=argv, prog_name="modelcache", standalone_mode=False)
    except Exception as exc:
        # click's usage errors (unknown command, missing argument, bad option value) become our
        # one-line error with exit 2, like every other bad input. Duck-typed: typer vendors click.
        format_message = getattr(exc, "format_message", None)
        if callable(format_message) and isinstance(getattr(exc, "exit_code", None), int):
            first = (str(format_message()).strip().splitlines() or ["bad usage"])[0]
            raise UsageError(f"{first} (see `modelcache --help`)") from exc
        raise
    return rv if isinstance(rv, int) else 0
