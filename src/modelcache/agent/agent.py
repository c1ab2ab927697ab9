"""The node agent's loop: the thin edge around `plan` (Kubernetes, disk, the engine).

One reconcile = observe (this node's LocalModelNode from the watch, the store on disk, the budget,
pods on the node when an eviction is on the table) -> `plan.plan` -> act (clean, evict, re-fetch,
start probes and downloads as tasks) -> patch status if it changed. It runs on every watch event,
when a task finishes, and every `reconcilationFrequencyInSecs`; progress between runs is reported at
most every `progress_interval` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lightkube import AsyncClient
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, ServiceAccount
from lightkube.types import PatchType

from modelcache.agent import credentials as cred
from modelcache.agent import plan as pl
from modelcache.agent.metrics import Metrics, serve
from modelcache.api.types import GROUP, VERSION, LocalModelInfo, LocalModelNodeSpec
from modelcache.errors import ConflictError, ModelcacheError, NotFoundError
from modelcache.kube import backoff, resources
from modelcache.kube.config import LocalModelConfig, parse_local_model_config
from modelcache.kube.constants import CONFIGMAP_NAME
from modelcache.kube.events import EventRecorder, ObjectRef
from modelcache.quantity import parse_quantity
from modelcache.store import Store
from modelcache.store import adopt as ad
from modelcache.transfer import ProgressEvent, TransferConfig, free_bytes
from modelcache.uri import parse_uri, redact

log = logging.getLogger("modelcache.agent")

LocalModelNodeRes = resources.LocalModelNode
LocalModelNodeGroupRes = resources.LocalModelNodeGroup
ClusterStorageContainerRes = resources.ClusterStorageContainer
STATE_FILE = "agent.json"
T = TypeVar("T")
COMPONENT = "modelcache-agent"


@dataclass
class Settings:
    node_name: str
    root: Path
    namespace: str = "kserve"  # where inferenceservice-config lives
    node_group: str | None = None
    storage_limit: int | None = None  # overrides the node group's storageLimit
    reserve: int = 1 << 30  # keep this much of the filesystem free
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    max_concurrent: int = 2
    progress_interval: float = 5.0
    resync_seconds: float | None = None  # overrides reconcilationFrequencyInSecs
    retry_base: float = 10.0
    retry_cap: float = 600.0
    verify_interval: float = 7 * 86400.0  # full sha256 re-verify of each model this often
    verify_gap: float = 60.0  # and at most one full verify per this many seconds
    delete_unreferenced: bool = False
    adopt_read_rate: float = 64 << 20  # bytes/s when hashing folders adopted from another cache
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    # Node-to-node fill (modelcache.peer): off without a token; the port is the same on every node.
    peer_port: int = 0
    peer_host: str = "0.0.0.0"  # where the peer server listens (the node's IP on multi-homed hosts)
    peer_token: str = field(default="", repr=False)
    peer_upload_rate: int | None = 256 << 20


@dataclass
class _Observed:
    disk: dict[str, pl.OnDisk] = field(default_factory=dict)
    partials: dict[str, pl.Partial] = field(default_factory=dict)
    fs_free: int = 0
    foreign: dict[str, ad.Folder] = field(default_factory=dict)  # wanted keys: folders to adopt


def _plain(obj: Any) -> dict[str, Any]:
    """A generic (custom) resource as plain JSON data."""
    data: dict[str, Any] = obj.to_dict()
    return data


class _KubeLookup:
    """credentials.Lookup over the apiserver, in the job namespace, cached for one resolve."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._secrets: dict[str, Secret | None] = {}

    async def _secret(self, name: str) -> Secret | None:
        if name not in self._secrets:
            try:
                self._secrets[name] = await self.client.get(Secret, name, namespace=self.namespace)
            except Exception as exc:
                if getattr(getattr(exc, "status", None), "code", None) == 404:
                    self._secrets[name] = None
                else:
                    raise
        return self._secrets[name]

    async def secret(self, name: str) -> dict[str, str] | None:
        s = await self._secret(name)
        if s is None:
            return None
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (s.data or {}).items()}
        data.update(s.stringData or {})
        return data

    async def secret_annotations(self, name: str) -> dict[str, str]:
        s = await self._secret(name)
        return dict((s.metadata.annotations if s and s.metadata else None) or {})

    async def service_account(self, name: str) -> dict[str, Any] | None:
        try:
            sa = await self.client.get(ServiceAccount, name, namespace=self.namespace)
        except Exception as exc:
            if getattr(getattr(exc, "status", None), "code", None) == 404:
                return None
            raise
        result: dict[str, Any] = sa.to_dict()
        return result

    async def storage_containers(self) -> list[dict[str, Any]]:
        return [_plain(o) async for o in self.client.list(ClusterStorageContainerRes)]


class Agent:
    def __init__(self, client: AsyncClient, settings: Settings, metrics: Metrics | None = None) -> None:
        self.client = client
        self.s = settings
        self.events = EventRecorder(client, COMPONENT, host=settings.node_name)
        # SQLite connections belong to the thread that opened them: the engine uses `store` on the
        # event loop; everything else on disk goes through one worker thread with `disk`.
        self.store = Store(settings.root)
        self.disk = Store(settings.root)
        self._disk_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-disk")
        self.metrics = metrics or Metrics()
        self.transfer_config = TransferConfig()
        self.lmn: dict[str, Any] | None = None
        self.progress: dict[str, pl.Progress] = {}
        self.sizes: dict[str, int] = {}
        self.listings: dict[str, ad.Listing] = {}  # source listings of folders waiting for adoption
        self.downloads: dict[str, asyncio.Task[None]] = {}
        self.probes: dict[str, asyncio.Task[None]] = {}
        self.verified_at: dict[str, float] = {}
        self.pvc_to_key: dict[str, str] = {}
        self.healthy: dict[str, pl.OnDisk] = {}
        self.wanted: list[pl.Entry] = []
        self.secrets: set[str] = set()  # every credential value seen, to scrub messages
        self.config = LocalModelConfig()
        self.cred_config = cred.CredentialConfig()
        self.storage_limit: int | None = settings.storage_limit
        self._config_at = -1e18
        self._kick = asyncio.Event()
        self._synced = asyncio.Event()  # the LocalModelNode has been listed once
        self._wake_at: float | None = None
        self._last_patch = -1e18
        self._reconcile_lock = asyncio.Lock()
        self._ready = False
        self._loop_alive = True
        self._beat = time.monotonic()  # last pass of the reconcile loop, for /healthz
        self._files_dir = Path(tempfile.mkdtemp(prefix="modelcache-agent-creds-"))
        self._rng = random.Random()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def resync(self) -> float:
        return float(self.s.resync_seconds or self.config.resync_seconds)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking store work on the agent's one disk thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._disk_pool, functools.partial(fn, *args, **kwargs))

    def _healthy(self) -> bool:
        """Alive and not stuck: the reconcile loop has turned within a few resync periods."""
        return self._loop_alive and time.monotonic() - self._beat < 3 * self.resync + 60

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        """Until cancelled: serve metrics, watch, reconcile, verify."""
        await self._io(self._startup)
        runner = await serve(
            self.metrics,
            self.s.metrics_host,
            self.s.metrics_port,
            self._healthy,
            lambda: self._ready,
        )
        ports = [
            sock.getsockname()[1]
            for site in runner.sites
            for sock in (getattr(getattr(site, "_server", None), "sockets", None) or [])
        ]
        log.info(
            "agent for node %s: cache %s, metrics on http://%s:%s/metrics",
            self.s.node_name,
            self.store.root,
            self.s.metrics_host,
            ports[0] if ports else self.s.metrics_port,
        )
        peer_server = await self._start_peer_server()
        tasks = [
            asyncio.create_task(self._watch(), name="watch"),
            asyncio.create_task(self._loop(), name="reconcile"),
            asyncio.create_task(self._verify_loop(), name="verify"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            self._loop_alive = False
            for t in [*tasks, *self.downloads.values(), *self.probes.values()]:
                t.cancel()
            await asyncio.gather(
                *tasks, *self.downloads.values(), *self.probes.values(), return_exceptions=True
            )
            await runner.cleanup()
            if peer_server is not None:
                await peer_server.stop()
            self._disk_pool.shutdown(wait=False)
            shutil.rmtree(self._files_dir, ignore_errors=True)

    async def _start_peer_server(self) -> Any:
        """Serve this node's models to the other agents (signed requests only), when configured."""
        if not (self.s.peer_port and self.s.peer_token):
            return None
        from modelcache.peer.server import PeerServer

        server = PeerServer(
            self.store,
            self.s.peer_token,
            host=self.s.peer_host,
            port=self.s.peer_port,
            upload_rate=self.s.peer_upload_rate,
        )
        await server.start()
        log.info("serving peers on port %d", server.port)
        return server

    async def _peers(self, key: str, info: LocalModelInfo) -> TransferConfig:
        """The transfer config for one download: with the nodes that hold or fetch this model as
        peers (from LocalModelNode statuses and Node InternalIPs, looked up again every few seconds
        while it runs), or as is when peering is off."""
        if not (self.s.peer_port and self.s.peer_token):
            return self.transfer_config
        import dataclasses

        from modelcache.peer.source import swarm

        try:
            pairs, me = await self._peer_pairs(info)
        except Exception as exc:  # no peers is always safe: the origin is the fallback
            log.warning("%s: cannot list peers (%s); fetching from the origin only", key, type(exc).__name__)
            return self.transfer_config
        if pairs:
            log.info("%s: %d peer(s) hold or fetch it", key, len(pairs))

        async def discover() -> list[tuple[str, str]]:
            return (await self._peer_pairs(info))[0]

        peers = swarm(key, pairs, me, discover)
        return dataclasses.replace(self.transfer_config, peers=peers, piece_hashes=True)

    async def _peer_pairs(self, info: LocalModelInfo) -> tuple[list[tuple[str, str]], str | None]:
        """(address, token) of every other node reporting this model Downloaded/Downloading, and ours."""
        from lightkube.resources.core_v1 import Node

        from modelcache.peer import discovery

        statuses = [_plain(o) async for o in self.client.list(LocalModelNodeRes)]
        names = set(discovery.peer_nodes(info.modelName, statuses, self.s.node_name))
        ips: dict[str, str] = {}
        async for node in self.client.list(Node):
            name = node.metadata.name if node.metadata else None
            if name in names or name == self.s.node_name:
                ip = discovery.internal_ip(node.to_dict())
                if ip:
                    ips[str(name)] = ip
        port, token = self.s.peer_port, self.s.peer_token
        pairs = [(discovery.address(ips[n], port), token) for n in sorted(names & set(ips))]
        me = ips.get(self.s.node_name)
        return pairs, discovery.address(me, port) if me else None

    def _startup(self) -> None:
        """Adopt what is on disk: repair after any crash; complete models count as downloaded."""
        self.disk.ensure()
        self.disk.repair()
        try:
            data = json.loads((self.disk.meta / STATE_FILE).read_text())
        except (OSError, ValueError):
            data = {}
        self.verified_at = {k: float(v) for k, v in (data.get("verified_at") or {}).items()}
        self.pvc_to_key = {k: str(v) for k, v in (data.get("pvc_to_key") or {}).items()}
        now = time.time()
        for row in self.disk.index.all():
            self.verified_at.setdefault(row.key, now)
        adopted = len(self.disk.index.all())
        if adopted:
            log.info("adopted %d complete model(s) already on disk", adopted)

    def _save_state(self) -> None:
        from modelcache.store.manifest import write_json_atomic

        write_json_atomic(
            self.disk.meta / STATE_FILE,
            json.dumps({"verified_at": self.verified_at, "pvc_to_key": self.pvc_to_key}),
        )

    # -- watch ---------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """List then watch from the list's version (the informer pattern), only this node's object.

        Nothing is planned before the first list: an agent that has not yet seen its entries must
        not take "no entries" for an answer and evict what the node still wants.
        """
        failures = 0
        fields: dict[str, Any] = {"metadata.name": self.s.node_name}
        while True:
            try:
                listing = self.client.list(LocalModelNodeRes, fields=fields)
                found = [_plain(o) async for o in listing]
                self._observe(found[0] if found else None)
                self._synced.set()
                async for op, obj in self.client.watch(
                    LocalModelNodeRes, fields=fields, resource_version=listing.resourceVersion
                ):
                    failures = 0
                    self._observe(None if op == "DELETED" else _plain(obj))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("watch of LocalModelNode %s failed: %s; retrying", self.s.node_name, exc)
                await asyncio.sleep(backoff.delay(failures + 1))

    def _observe(self, obj: dict[str, Any] | None) -> None:
        before, self.lmn = self.lmn, obj
        if pl.spec_changed(before, obj) or not self._synced.is_set():  # not for our own status writes
            self.kick()

    async def _loop(self) -> None:
        await self._synced.wait()
        last_full = -1e18
        failures = 0
        while True:
            now = time.monotonic()
            timeout = max(0.0, last_full + self.resync - now)
            if self.downloads:
                timeout = min(timeout, self.s.progress_interval)
            if self._wake_at is not None:
                timeout = min(timeout, max(0.0, self._wake_at - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=max(0.05, timeout))
            kicked = self._kick.is_set()
            self._kick.clear()
            full = (
                kicked
                or time.monotonic() - last_full >= self.resync
                or (self._wake_at is not None and time.time() >= self._wake_at)
            )
            try:
                if full:
                    await self.reconcile()
                    last_full = time.monotonic()
                else:
                    await self.report()
                failures = 0
                self._beat = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._beat = time.monotonic()
                log.warning("reconcile failed: %s; retrying", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                await asyncio.sleep(backoff.delay(failures + 1))
                self.kick()

    # -- observe -------------------------------------------------------------------------------
    async def _load_config(self) -> None:
        """inferenceservice-config and the node group's storageLimit, re-read once per resync."""
        if time.monotonic() - self._config_at < self.resync:
            return
        try:
            cm = await self.client.get(ConfigMap, CONFIGMAP_NAME, namespace=self.s.namespace)
            self.config = parse_local_model_config(cm.data)
            self.cred_config = cred.parse_credential_config(cm.data)
        except ModelcacheError as exc:
            log.warning("%s; using KServe's defaults", exc)
        except Exception as exc:
            log.warning("cannot read %s/%s: %s; using defaults", self.s.namespace, CONFIGMAP_NAME, exc)
        if self.s.storage_limit is None:
            self.storage_limit = await self._group_limit()
        self._config_at = time.monotonic()

    def _group_name(self) -> str | None:
        if self.s.node_group:
            return self.s.node_group
        for e in self.wanted:
            if e.info.nodeGroup:
                return e.info.nodeGroup
        return None

    async def _group_limit(self) -> int | None:
        name = self._group_name()
        if not name:
            return None
        try:
            group = await self.client.get(LocalModelNodeGroupRes, name)
            return parse_quantity((group.get("spec") or {})["storageLimit"])
        except Exception as exc:
            log.warning("cannot read storageLimit of LocalModelNodeGroup %s: %s", name, exc)
            return self.storage_limit

    def _observe_disk(self, wanted_keys: set[str]) -> _Observed:
        obs = _Observed()
        self.disk.ensure()
        for rec in self.disk.list_models():  # repairs first: a directory deleted by hand drops out
            if rec.state == "complete":
                healthy = True
                if rec.key in wanted_keys:
                    try:
                        problems = self.disk.verify(rec.key, full=False)
                    except (NotFoundError, OSError) as exc:
                        problems = [str(exc)]
                    if problems:
                        healthy = False
                        log.warning("model %s failed the fast check: %s", rec.key, "; ".join(problems[:3]))
                obs.disk[rec.key] = pl.OnDisk(
                    key=rec.key,
                    uri=rec.uri,
                    size_bytes=rec.size_bytes,
                    last_used_at=rec.last_used_at or rec.created_at or 0.0,
                    healthy=healthy,
                    pinned=rec.pinned,
                    in_use=rec.in_use,
                    created_at=rec.created_at,
                )
            else:
                obs.partials[rec.key] = pl.Partial(
                    rec.key, rec.uri, rec.size_bytes, held=rec.state == "downloading"
                )
        for key in ad.foreign_keys(self.disk):
            if key in wanted_keys:
                obs.foreign[key] = ad.scan(self.disk, key)
        obs.fs_free = free_bytes(self.disk.root)
        return obs

    async def _mounted(self) -> set[str]:
        pods = [
            p.to_dict()
            async for p in self.client.list(Pod, namespace="*", fields={"spec.nodeName": self.s.node_name})
        ]
        return pl.mounted_keys(pods, self.pvc_to_key)

    # -- reconcile -----------------------------------------------------------------------------
    async def reconcile(self) -> None:
        async with self._reconcile_lock:
            await self._reconcile()

    def _spec(self) -> LocalModelNodeSpec | None:
        if not self.lmn or not self.lmn.get("spec"):
            return None
        return LocalModelNodeSpec.model_validate(self.lmn["spec"])

    async def _reconcile(self) -> None:
        self.wanted = pl.entries(self._spec(), self.s.node_group)
        await self._load_config()
        group = self._group_name()
        remembered = False
        for e in self.wanted:
            name = e.pvc_name(group)
            if name and self.pvc_to_key.get(name) != e.key:
                self.pvc_to_key[name] = e.key
                remembered = True
        keys = pl.uris_by_key(self.wanted)
        obs = await self._io(self._observe_disk, set(keys))
        blocked: set[str] = set()
        if obs.foreign:
            blocked = await self._adopt_foreign(obs, keys)
            obs = await self._io(self._observe_disk, set(keys))
        stale = [n for n, k in self.pvc_to_key.items() if k not in keys and k not in obs.disk]
        for n in stale:  # the model is gone: no pod can be using it through this name any more
            del self.pvc_to_key[n]
        if remembered or stale:
            await self._io(self._save_state)
        budget = pl.Budget(
            self.storage_limit, obs.fs_free, self.s.reserve, self.s.high_watermark, self.s.low_watermark
        )
        active = set(self.downloads) | set(self.probes)
        now = time.time()

        planned = [e for e in self.wanted if e.key not in blocked]

        def decide(mounted: set[str]) -> pl.Plan:
            return pl.plan(
                planned,
                obs.disk,
                obs.partials,
                self.sizes,
                active,
                self.progress,
                mounted,
                budget,
                now,
                max_concurrent=self.s.max_concurrent,
                delete_unreferenced=self.s.delete_unreferenced,
            )

        p = decide(set())
        if p.evict:  # only then is it worth asking which models pods on this node are using
            try:
                mounted = await self._mounted()
            except Exception as exc:  # cannot tell what is mounted: evict nothing this time
                log.warning("cannot list pods on node %s: %s; not evicting", self.s.node_name, exc)
                mounted = set(obs.disk)
            p = decide(mounted)
        await self._apply(p, obs, keys)
        self._wake_at = p.wake_at
        self.healthy = {
            k: d for k, d in obs.disk.items() if d.healthy and k not in p.evict and k not in p.refetch
        }
        used = sum(d.size_bytes for d in obs.disk.values()) + sum(x.done_bytes for x in obs.partials.values())
        self.metrics.cache_size.set(p.capacity)
        self.metrics.cache_used.set(used)
        self.metrics.cache_free.set(obs.fs_free)
        await self.report()
        self.metrics.reconciles.inc()
        self._ready = True

    async def _apply(self, p: pl.Plan, obs: _Observed, keys: dict[str, str]) -> None:
        for k, task in [*self.downloads.items(), *self.probes.items()]:
            if k not in keys:  # the entry left the spec mid-download: stop (its staging is cleaned)
                log.info("model %s is no longer wanted; stopping its download", k)
                task.cancel()
        for k in p.clean_staging:
            log.info("removing an abandoned partial download %s", k)
            await self._io(self.disk.clear_staging, k)
        for k in p.evict:
            try:
                await self._io(self.disk.remove, k)
            except (ConflictError, NotFoundError) as exc:
                log.info("not evicting %s: %s", k, exc)
                continue
            self.metrics.evictions.inc()
            uri = obs.disk[k].uri if k in obs.disk else k
            log.info("evicted %s (%s) to free space", k, redact(uri))
            await self._event("Evicted", f"removed unreferenced model {k} ({redact(uri)}) from the cache")
        for k in p.refetch:
            self.metrics.verify_failures.labels(kind="fast").inc()
            try:
                await self._io(self.disk.remove, k, force=True)
            except (ConflictError, NotFoundError) as exc:
                log.warning("cannot remove damaged model %s yet: %s", k, exc)
                continue
            self.progress.pop(k, None)
            await self._event(
                "VerifyFailed", f"model {k} failed the fast check; fetching it again", warn=True
            )
            self.kick()
        for k, message in p.no_space.items():
            prog = self.progress.setdefault(k, pl.Progress())
            if prog.last_error != message:
                log.warning("%s: %s", redact(keys[k]), message)
                await self._event("InsufficientSpace", f"{redact(keys[k])}: {message}", warn=True)
            prog.phase, prog.last_error, prog.no_space = "error", message, True
        for k in p.fits:
            prog = self.progress[k]
            prog.phase, prog.last_error, prog.no_space = "pending", None, False
        for k in p.probe:
            self.probes[k] = asyncio.create_task(self._probe(k, self._entry(k)))
        for k in p.download:
            staged = obs.partials[k].done_bytes if k in obs.partials else 0
            self.downloads[k] = asyncio.create_task(self._download(k, self._entry(k), staged))

    # -- adoption of folders another cache left (KServe's agent) -------------------------------------
    async def _adopt_foreign(self, obs: _Observed, keys: dict[str, str]) -> set[str]:
        """Adopt, replace or keep waiting on each wanted folder without a manifest (store/adopt.py).

        Returns the keys not to plan downloads for this pass (their folder stays as it is).
        """
        try:
            mounted = await self._mounted()
        except Exception as exc:  # cannot tell: treat every folder as mounted (never moved)
            log.warning("cannot list pods on node %s: %s; treating folders as mounted", self.s.node_name, exc)
            mounted = set(obs.foreign)
        blocked: set[str] = set()
        now = time.time()
        for key, folder in obs.foreign.items():
            listing = self.listings.get(key)
            verdict = ad.decide(folder, listing, key in mounted)
            uri = keys[key]
            prog = self.progress.setdefault(key, pl.Progress())
            if verdict.action == "adopt" and listing is not None:
                try:
                    await self._io(ad.adopt, self.disk, folder, listing, uri)
                except ModelcacheError as exc:
                    log.info("not adopting %s yet: %s", key, exc.message)
                    blocked.add(key)
                    continue
                self.listings.pop(key, None)
                self.verified_at[key] = 0.0  # hashed first by the verify loop, at a capped rate
                prog.phase, prog.last_error, prog.no_space = "downloaded", None, False
                prog.finished_at = now
                log.info("adopted %s (%s) in place: %s", key, redact(uri), verdict.reason)
                await self._event(
                    "Adopted",
                    f"model {key} ({redact(uri)}): adopted the folder already on disk "
                    f"({folder.size_bytes} bytes, {verdict.reason}); nothing downloaded",
                )
            elif verdict.action == "replace":
                log.warning("%s (%s): %s", key, redact(uri), verdict.reason)
                await self._io(ad.discard, self.disk, key)
                await self._event(
                    "AdoptionRefused", f"model {key} ({redact(uri)}): {verdict.reason}", warn=True
                )
            else:
                blocked.add(key)
                if listing is None:
                    retry = prog.retry_at is not None and prog.retry_at > now
                    if key not in self.probes and not retry:
                        self.probes[key] = asyncio.create_task(self._list_source(key, self._entry(key)))
                elif prog.last_error != verdict.reason:
                    prog.phase, prog.last_error = "error", verdict.reason
                    log.warning("%s (%s): %s", key, redact(uri), verdict.reason)
                    await self._event(
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
            await self._event("AdoptionBlocked", f"{redact(info.sourceModelUri)}: {message}", warn=True)
        finally:
            self.probes.pop(key, None)
            self.kick()

    def _entry(self, key: str) -> LocalModelInfo:
        return next(e.info for e in self.wanted if e.key == key)

    # -- work ----------------------------------------------------------------------------------
    async def _credentials(self, info: LocalModelInfo) -> cred.Credentials:
        lookup = _KubeLookup(self.client, self.config.jobNamespace)
        creds = await cred.resolve(info, lookup, self.cred_config, self._files_dir, base=os.environ)
        self.secrets |= creds.secrets
        if creds.origin:
            log.debug("credentials for %s from %s", redact(info.sourceModelUri), ", ".join(creds.origin))
        return creds

    def _fail(self, key: str, exc: BaseException) -> str:
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
            await self._event("DownloadFailed", f"{redact(info.sourceModelUri)}: {message}", warn=True)
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
                config=await self._peers(key, info),
                on_event=on_event,
            )
            size = result.record.size_bytes
            prog.phase, prog.last_error, prog.no_space = "downloaded", None, False
            prog.bytes_done = prog.bytes_total = size
            prog.finished_at = time.time()
            self.verified_at[key] = time.time()
            await self._io(self._save_state)
            self.metrics.downloads.labels(outcome="hit" if result.hit else "success").inc()
            if not result.hit:
                self.metrics.duration.observe(time.monotonic() - t0)
            log.info("downloaded %s (%d bytes) in %.1fs", key, size, time.monotonic() - t0)
            await self._event("Downloaded", f"model {key} ({redact(info.sourceModelUri)}) is ready")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = self._fail(key, exc)
            self.metrics.downloads.labels(outcome="failure").inc()
            await self._event("DownloadFailed", f"{redact(info.sourceModelUri)}: {message}", warn=True)
        finally:
            self.downloads.pop(key, None)
            self.kick()

    # -- full verification -------------------------------------------------------------------------
    async def _verify_loop(self) -> None:
        """Re-hash one overdue model at a time, at most one per `verify_gap` seconds."""
        tick = max(0.2, min(30.0, self.s.verify_interval / 2, max(self.s.verify_gap, 0.2)))
        last = -1e18
        while True:
            await asyncio.sleep(tick)
            if time.monotonic() - last < self.s.verify_gap:
                continue
            referenced = {e.key for e in self.wanted}
            key = pl.next_full_verify(
                self.healthy,
                referenced,
                self.verified_at,
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
                self.verified_at[key] = time.time()
                await self._io(self._save_state)
                continue
            if key in await self._mounted_or_all():  # an adopted folder a pod reads: never moved
                log.warning(
                    "model %s failed the sha256 check but a pod mounts it: %s", key, "; ".join(problems[:3])
                )
                await self._event(
                    "VerifyFailed",
                    f"model {key} failed the sha256 check; a pod mounts it, left in place",
                    warn=True,
                )
                self.verified_at[key] = time.time()
                continue
            self.metrics.verify_failures.labels(kind="full").inc()
            log.warning(
                "model %s failed the sha256 check: %s; fetching it again", key, "; ".join(problems[:3])
            )
            await self._event(
                "VerifyFailed", f"model {key} failed the sha256 check; fetching it again", warn=True
            )
            async with self._reconcile_lock:
                if key in self.downloads:
                    continue
                try:
                    await self._io(self.disk.remove, key, force=True)
                except (ConflictError, NotFoundError) as exc:
                    log.warning("cannot remove damaged model %s yet: %s", key, exc)
                    continue
                self.healthy.pop(key, None)
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

    async def _mounted_or_all(self) -> set[str]:
        try:
            return await self._mounted()
        except Exception as exc:
            log.warning(
                "cannot list pods on node %s: %s; treating every model as mounted", self.s.node_name, exc
            )
            return set(self.healthy)

    # -- status --------------------------------------------------------------------------------
    async def report(self) -> None:
        """Patch status.modelStatus / status.models when they changed (byte counters throttled)."""
        if self.lmn is None:
            return
        phases, details = pl.desired_status(self.wanted, self.healthy, set(self.downloads), self.progress)
        counts: dict[str, int] = {}
        for v in phases.values():
            counts[v] = counts.get(v, 0) + 1
        for status in ("ModelDownloadPending", "ModelDownloading", "ModelDownloaded", "ModelDownloadError"):
            self.metrics.models.labels(status=status).set(counts.get(status, 0))
        due = time.monotonic() - self._last_patch >= self.s.progress_interval
        others = pl.status_keys(self._spec()) - set(phases)  # other groups' and download Jobs
        patch = pl.status_patch(self.lmn.get("status"), phases, details, progress_due=due, others=others)
        if patch is None:
            return
        try:
            updated = await self.client.patch(
                LocalModelNodeRes.Status, self.s.node_name, patch, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            if getattr(getattr(exc, "status", None), "code", None) == 404:
                return
            raise
        self._last_patch = time.monotonic()
        self.lmn = _plain(updated)

    async def _event(self, reason: str, message: str, warn: bool = False) -> None:
        """A Kubernetes Event on this node's LocalModelNode (best effort; messages are redacted)."""
        if self.lmn is None:
            return
        uid = str((self.lmn.get("metadata") or {}).get("uid") or "")
        ref = ObjectRef(f"{GROUP}/{VERSION}", "LocalModelNode", self.s.node_name, "", uid)
        await self.events.record(
            ref, "Warning" if warn else "Normal", reason, pl.scrub(message, self.secrets)
        )
