"""The work the node agent starts: acting on a plan, downloads, probes, adoption, verification, peers.

`Work.apply` carries out one `plan.Plan` (clean, evict, re-fetch, start probes and downloads as
tasks); each task records its outcome in `Work.progress` (failures with a backoff retry time that
`plan` honours) and kicks a reconcile when it ends. `Work.verify_loop` re-hashes one overdue model
at a time. `Peers` is node-to-node fill: the peer server and each download's peer list.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lightkube import ApiError, AsyncClient

from modelcache.agent import credentials as cred
from modelcache.agent import plan as pl
from modelcache.agent.metrics import Metrics
from modelcache.agent.observe import DiskThread, Observed, Observer, Remembered, plain
from modelcache.agent.status import StatusReporter
from modelcache.api.types import LocalModelInfo
from modelcache.errors import ConflictError, ModelcacheError, NotFoundError
from modelcache.kube import resources
from modelcache.store import Store
from modelcache.store import adopt as ad
from modelcache.transfer import ProgressEvent, TransferConfig
from modelcache.uri import parse_uri, redact

if TYPE_CHECKING:
    from modelcache.agent.agent import Settings
    from modelcache.peer.server import PeerServer

log = logging.getLogger("modelcache.agent")


@dataclass
class LastPass:
    """What the last reconcile settled, read between passes by tasks and status: the entries this
    agent serves and the complete models that passed the fast check (and were not evicted)."""

    wanted: list[pl.Entry] = field(default_factory=list)
    healthy: dict[str, pl.OnDisk] = field(default_factory=dict)

    def info(self, key: str) -> LocalModelInfo:
        """The first wanted entry of a model (several entries may name the same source)."""
        return next(e.info for e in self.wanted if e.key == key)


class Peers:
    """Node-to-node fill (modelcache.peer): off without a port and a token."""

    def __init__(self, client: AsyncClient, settings: Settings) -> None:
        self.client = client
        self.s = settings
        self._ips: dict[str, str] = {}  # node name -> InternalIP, fetched once per node

    @property
    def enabled(self) -> bool:
        return bool(self.s.peer_port and self.s.peer_token)

    async def start_server(self, store: Store) -> PeerServer | None:
        """Serve this node's models to the other agents (signed requests only), when configured."""
        if not self.enabled:
            return None
        from modelcache.peer.server import PeerServer

        server = PeerServer(
            store,
            self.s.peer_token,
            host=self.s.peer_host,
            port=self.s.peer_port,
            upload_rate=self.s.peer_upload_rate,
        )
        await server.start()
        log.info("serving peers on port %d", server.port)
        return server

    async def config(self, key: str, info: LocalModelInfo, base: TransferConfig) -> TransferConfig:
        """The transfer config for one download: with the nodes that hold or fetch this model as
        peers (LocalModelNode statuses, looked up again every few seconds while it runs, and each
        Node's InternalIP, fetched once), or `base` as is when peering is off."""
        if not self.enabled:
            return base
        from modelcache.peer.source import swarm

        try:
            pairs, me = await self._pairs(info)
        except Exception as exc:  # no peers is always safe: the origin is the fallback
            log.warning("%s: cannot list peers (%s); fetching from the origin only", key, type(exc).__name__)
            return base
        if pairs:
            log.info("%s: %d peer(s) hold or fetch it", key, len(pairs))

        async def discover() -> list[tuple[str, str]]:
            return (await self._pairs(info))[0]

        peers = swarm(key, pairs, me, discover)
        return replace(base, peers=peers, piece_hashes=True)

    async def _pairs(self, info: LocalModelInfo) -> tuple[list[tuple[str, str]], str | None]:
        """(address, token) of every other node reporting this model Downloaded/Downloading, and ours."""
        from lightkube.resources.core_v1 import Node

        from modelcache.peer import discovery

        statuses = [plain(o) async for o in self.client.list(resources.LocalModelNode)]
        names = set(discovery.peer_nodes(info.modelName, statuses, self.s.node_name))
        # Nodes by name, each once: every downloading agent asks every few seconds, and listing all
        # Nodes (large objects) from every agent would load the apiserver of a big cluster.
        for name in sorted((names | {self.s.node_name}) - set(self._ips)):
            try:
                node = await self.client.get(Node, name=name)
            except ApiError as exc:
                if exc.status.code == 404:
                    continue  # gone: it serves nothing
                raise
            if ip := discovery.internal_ip(node.to_dict()):
                self._ips[name] = ip
        ips = self._ips
        port, token = self.s.peer_port, self.s.peer_token
        pairs = [(discovery.address(ips[n], port), token) for n in sorted(names & set(ips))]
        me = ips.get(self.s.node_name)
        return pairs, discovery.address(me, port) if me else None


class Work:
    """The running downloads and probes and what they learnt, per model key.

    Owns `progress` (phase, bytes, last error, retry time: `plan` reads it, status reports it),
    `sizes` (from probes, for the budget) and `listings` (source listings of folders waiting to be
    adopted). `secrets` is shared with the status reporter: credential values to scrub.
    """

    def __init__(
        self,
        client: AsyncClient,
        settings: Settings,
        store: Store,
        disk: DiskThread,
        metrics: Metrics,
        observer: Observer,
        status: StatusReporter,
        remembered: Remembered,
        last: LastPass,
        secrets: set[str],
        kick: Callable[[], None],
    ) -> None:
        self.s = settings
        self.store = store  # the engine's (event loop) connection
        self.disk = disk
        self.metrics = metrics
        self.observer = observer
        self.status = status
        self.remembered = remembered
        self.last = last
        self.secrets = secrets
        self.kick = kick
        self.peers = Peers(client, settings)
        self.transfer_config = TransferConfig(reserve=settings.reserve)
        self.progress: dict[str, pl.Progress] = {}
        self.sizes: dict[str, int] = {}
        self.listings: dict[str, ad.Listing] = {}
        self.downloads: dict[str, asyncio.Task[None]] = {}
        self.probes: dict[str, asyncio.Task[None]] = {}
        self._files_dir = Path(tempfile.mkdtemp(prefix="modelcache-agent-creds-"))
        self._rng = random.Random()

    def active(self) -> set[str]:
        """Keys with a download or probe running (`plan` starts nothing more for them)."""
        return set(self.downloads) | set(self.probes)

    def running(self) -> list[asyncio.Task[None]]:
        return [*self.downloads.values(), *self.probes.values()]

    def close(self) -> None:
        """Remove the credential files written for sources (after the tasks have stopped)."""
        shutil.rmtree(self._files_dir, ignore_errors=True)

    # -- acting on a plan ----------------------------------------------------------------------------
    async def apply(self, p: pl.Plan, obs: Observed, keys: dict[str, str]) -> None:
        """Carry out one plan; `keys` are the wanted models (key -> source URI)."""
        for k, task in [*self.downloads.items(), *self.probes.items()]:
            if k not in keys:  # the entry left the spec mid-download: stop (its staging is cleaned)
                log.info("model %s is no longer wanted; stopping its download", k)
                task.cancel()
        for k in p.clean_staging:
            log.info("removing an abandoned partial download %s", k)
            await self.disk.run(self.disk.store.clear_staging, k)
        for k in p.evict:
            try:
                await self.disk.run(self.disk.store.remove, k)
            except (ConflictError, NotFoundError) as exc:
                log.info("not evicting %s: %s", k, exc)
                continue
            self.metrics.evictions.inc()
            uri = obs.disk[k].uri if k in obs.disk else k
            log.info("evicted %s (%s) to free space", k, redact(uri))
            await self.status.event(
                "Evicted", f"removed unreferenced model {k} ({redact(uri)}) from the cache"
            )
        for k in p.refetch:
            self.metrics.verify_failures.labels(kind="fast").inc()
            try:
                await self.disk.run(self.disk.store.remove, k, force=True)
            except (ConflictError, NotFoundError) as exc:
                log.warning("cannot remove damaged model %s yet: %s", k, exc)
                continue
            self.progress.pop(k, None)
            await self.status.event(
                "VerifyFailed", f"model {k} failed the fast check; fetching it again", warn=True
            )
            self.kick()
        for k, message in p.no_space.items():
            prog = self.progress.setdefault(k, pl.Progress())
            if prog.last_error != message:
                log.warning("%s: %s", redact(keys[k]), message)
                await self.status.event("InsufficientSpace", f"{redact(keys[k])}: {message}", warn=True)
            prog.phase, prog.last_error, prog.no_space = "error", message, True
        for k in p.fits:
            prog = self.progress[k]
            prog.phase, prog.last_error, prog.no_space = "pending", None, False
        for k in p.probe:
            self.probes[k] = asyncio.create_task(self._probe(k, self.last.info(k)))
        for k in p.download:
            staged = obs.partials[k].done_bytes if k in obs.partials else 0
            self.downloads[k] = asyncio.create_task(self._download(k, self.last.info(k), staged))

    # -- adoption of folders another cache left (KServe's agent) -------------------------------------
    async def adopt_foreign(self, obs: Observed, keys: dict[str, str]) -> set[str]:
        """Adopt, replace or keep waiting on each wanted folder without a manifest (store/adopt.py).

        Returns the keys not to plan downloads for this pass (their folder stays as it is).
        """
        # Cannot tell what pods mount: treat every folder as mounted (never moved).
        mounted = await self.observer.mounted_or(
            self.remembered.pvc_to_key, lambda: set(obs.foreign), "treating folders as mounted"
        )
        blocked: set[str] = set()
        now = time.time()
        for key, folder in obs.foreign.items():
            listing = self.listings.get(key)
            verdict = ad.decide(folder, listing, key in mounted)
            uri = keys[key]
            prog = self.progress.setdefault(key, pl.Progress())
            if verdict.action == "adopt" and listing is not None:
                try:
                    await self.disk.run(ad.adopt, self.disk.store, folder, listing, uri)
                except ModelcacheError as exc:
                    log.info("not adopting %s yet: %s", key, exc.message)
                    blocked.add(key)
                    continue
                self.listings.pop(key, None)
                self.remembered.verified_at[key] = 0.0  # hashed first by the verify loop, at a capped rate
                prog.phase, prog.last_error, prog.no_space = "downloaded", None, False
                prog.finished_at = now
                log.info("adopted %s (%s) in place: %s", key, redact(uri), verdict.reason)
                await self.status.event(
                    "Adopted",
                    f"model {key} ({redact(uri)}): adopted the folder already on disk "
                    f"({folder.size_bytes} bytes, {verdict.reason}); nothing downloaded",
                )
            elif verdict.action == "replace":
                log.warning("%s (%s): %s", key, redact(uri), verdict.reason)
                await self.disk.run(ad.discard, self.disk.store, key)
                await self.status.event(
                    "AdoptionRefused", f"model {key} ({redact(uri)}): {verdict.reason}", warn=True
                )
            else:
                blocked.add(key)
                if listing is None:
                    retry = prog.retry_at is not None and prog.retry_at > now
                    if key not in self.probes and not retry:
                        self.probes[key] = asyncio.create_task(self._list_source(key, self.last.info(key)))
                elif prog.last_error != verdict.reason:
                    prog.phase, prog.last_error = "error", verdict.reason
                    log.warning("%s (%s): %s", key, redact(uri), verdict.reason)
                    await self.status.event(
                        "AdoptionBlocked", f"model {key} ({redact(uri)}): {verdict.reason}", warn=True
                    )
        return blocked

    async def _list_source(self, key: str, info: LocalModelInfo) -> None:
        """The source's listing of a folder waiting for adoption (a resolve: no file bytes move)."""
        from modelcache.engine import resolve_with_retries
        from modelcache.sources import SourceOptions, open_source

        prog = self.progress.setdefault(key, pl.Progress())
        try:
            creds = await self._credentials(info)
            uri = parse_uri(info.sourceModelUri)
            source = open_source(uri, SourceOptions(env=creds.env))
            try:
                snapshot = await resolve_with_retries(source, self.transfer_config)
            finally:
                await source.aclose()
            self.sizes[key] = snapshot.total_bytes
            self.listings[key] = ad.Listing(
                files=tuple(ad.ListedFile(f.path, f.size, f.sha256) for f in snapshot.files),
                revision=snapshot.revision,
                archive=bool(snapshot.archive),
                scheme=uri.scheme,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            prog.attempts += 1
            message = self._fail(key, exc)
            await self.status.event("AdoptionBlocked", f"{redact(info.sourceModelUri)}: {message}", warn=True)
        finally:
            self.probes.pop(key, None)
            self.kick()

    # -- downloads and probes ------------------------------------------------------------------------
    async def _credentials(self, info: LocalModelInfo) -> cred.Credentials:
        creds = await cred.resolve(
            info, self.observer.lookup(), self.observer.cred_config, self._files_dir, base=os.environ
        )
        self.secrets |= creds.secrets
        if creds.origin:
            log.debug("credentials for %s from %s", redact(info.sourceModelUri), ", ".join(creds.origin))
        return creds

    def _fail(self, key: str, exc: BaseException) -> str:
        """Record a failed attempt: the scrubbed message, and when to retry (jittered backoff)."""
        prog = self.progress.setdefault(key, pl.Progress())
        if isinstance(exc, ModelcacheError):
            message = exc.message
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
        message = pl.scrub(message, self.secrets)
        prog.phase, prog.last_error, prog.no_space = "error", message, False
        delay = pl.retry_delay(max(1, prog.attempts), self.s.retry_base, self.s.retry_cap, self._rng)
        prog.retry_at = time.time() + delay
        log.warning("model %s failed (attempt %d): %s; retrying in %.0fs", key, prog.attempts, message, delay)
        return message

    async def _probe(self, key: str, info: LocalModelInfo) -> None:
        """Learn a model's size before admitting it to the budget (a resolve, no bytes moved)."""
        from modelcache.engine import resolve_with_retries
        from modelcache.sources import SourceOptions, open_source

        prog = self.progress.setdefault(key, pl.Progress())
        try:
            creds = await self._credentials(info)
            source = open_source(parse_uri(info.sourceModelUri), SourceOptions(env=creds.env))
            try:
                snapshot = await resolve_with_retries(source, self.transfer_config)
            finally:
                await source.aclose()
            self.sizes[key] = snapshot.total_bytes
            prog.bytes_total = snapshot.total_bytes
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            prog.attempts += 1
            message = self._fail(key, exc)
            self.metrics.downloads.labels(outcome="failure").inc()
            await self.status.event("DownloadFailed", f"{redact(info.sourceModelUri)}: {message}", warn=True)
        finally:
            self.probes.pop(key, None)
            self.kick()

    async def _download(self, key: str, info: LocalModelInfo, staged: int) -> None:
        from modelcache.engine import pull
        from modelcache.sources import SourceOptions

        prog = self.progress.setdefault(key, pl.Progress())
        prog.phase, prog.attempts, prog.retry_at = "downloading", prog.attempts + 1, None
        prog.started_at, prog.finished_at, prog.bytes_done = time.time(), None, staged
        scheme = parse_uri(info.sourceModelUri).scheme
        bytes_counter = self.metrics.bytes_downloaded.labels(scheme=scheme)
        t0 = time.monotonic()

        def on_event(ev: ProgressEvent) -> None:
            if ev.kind == "plan":
                prog.bytes_done, prog.bytes_total = ev.nbytes, ev.total
            elif ev.kind == "advance":
                prog.bytes_done += ev.nbytes
                bytes_counter.inc(ev.nbytes)
            elif ev.kind == "retry":
                log.info("%s: %s", key, pl.scrub(ev.message, self.secrets))

        log.info("downloading %s into %s (attempt %d)", redact(info.sourceModelUri), key, prog.attempts)
        try:
            creds = await self._credentials(info)
            result = await pull(
                self.store,
                info.sourceModelUri,
                options=SourceOptions(env=creds.env),
                config=await self.peers.config(key, info, self.transfer_config),
                on_event=on_event,
            )
            size = result.record.size_bytes
            prog.phase, prog.last_error, prog.no_space = "downloaded", None, False
            prog.bytes_done = prog.bytes_total = size
            prog.finished_at = time.time()
            self.remembered.verified_at[key] = time.time()
            await self.disk.run(self.remembered.save, self.disk.store)
            self.metrics.downloads.labels(outcome="hit" if result.hit else "success").inc()
            if not result.hit:
                self.metrics.duration.observe(time.monotonic() - t0)
            log.info("downloaded %s (%d bytes) in %.1fs", key, size, time.monotonic() - t0)
            await self.status.event("Downloaded", f"model {key} ({redact(info.sourceModelUri)}) is ready")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = self._fail(key, exc)
            self.metrics.downloads.labels(outcome="failure").inc()
            await self.status.event("DownloadFailed", f"{redact(info.sourceModelUri)}: {message}", warn=True)
        finally:
            self.downloads.pop(key, None)
            self.kick()

    # -- full verification ---------------------------------------------------------------------------
    async def verify_loop(self, reconcile_lock: asyncio.Lock) -> None:
        """Re-hash one overdue model at a time, at most one per `verify_gap` seconds.

        A damaged model is removed under `reconcile_lock`, so a reconcile never plans on a half-removed one.
        """
        tick = max(0.2, min(30.0, self.s.verify_interval / 2, max(self.s.verify_gap, 0.2)))
        last = -1e18
        while True:
            await asyncio.sleep(tick)
            if time.monotonic() - last < self.s.verify_gap:
                continue
            referenced = {e.key for e in self.last.wanted}
            key = pl.next_full_verify(
                self.last.healthy,
                referenced,
                self.remembered.verified_at,
                set(self.downloads),
                time.time(),
                self.s.verify_interval,
            )
            if key is None:
                continue
            last = time.monotonic()
            try:
                problems = await asyncio.to_thread(self._full_check, key)
            except (NotFoundError, OSError, ValueError):
                continue  # removed meanwhile
            if not problems:
                self.remembered.verified_at[key] = time.time()
                await self.disk.run(self.remembered.save, self.disk.store)
                continue
            mounted = await self.observer.mounted_or(
                self.remembered.pvc_to_key, lambda: set(self.last.healthy), "treating every model as mounted"
            )
            if key in mounted:  # an adopted folder a pod reads: never moved
                log.warning(
                    "model %s failed the sha256 check but a pod mounts it: %s", key, "; ".join(problems[:3])
                )
                await self.status.event(
                    "VerifyFailed",
                    f"model {key} failed the sha256 check; a pod mounts it, left in place",
                    warn=True,
                )
                self.remembered.verified_at[key] = time.time()
                continue
            self.metrics.verify_failures.labels(kind="full").inc()
            log.warning(
                "model %s failed the sha256 check: %s; fetching it again", key, "; ".join(problems[:3])
            )
            await self.status.event(
                "VerifyFailed", f"model {key} failed the sha256 check; fetching it again", warn=True
            )
            async with reconcile_lock:
                if key in self.downloads:
                    continue
                try:
                    await self.disk.run(self.disk.store.remove, key, force=True)
                except (ConflictError, NotFoundError) as exc:
                    log.warning("cannot remove damaged model %s yet: %s", key, exc)
                    continue
                self.last.healthy.pop(key, None)
                self.progress.pop(key, None)
            self.kick()

    def _full_check(self, key: str) -> list[str]:
        """sha256 of every file: adopted folders are hashed at the capped rate, ours re-verified."""
        store = Store(self.s.root)  # its own SQLite connection: this runs on a worker thread
        if ad.needs_hashing(store.manifest(key)):
            problems = ad.hash_adopted(store, key, self.s.adopt_read_rate)
            if not problems:
                log.info("adopted model %s hashed: every file recorded", key)
            return problems
        return store.verify(key, full=True)
