"""The node agent: the thin composition of `observe` -> `plan` -> `tasks` / `status`.

One reconcile = observe (this node's LocalModelNode from the watch, the store on disk, the budget,
pods on the node when an eviction is on the table) -> `plan.plan` -> act (clean, evict, re-fetch,
start probes and downloads as tasks) -> patch status if it changed. It runs on every watch event,
when a task finishes, and every `reconcilationFrequencyInSecs`; progress between runs is reported at
most every `progress_interval` seconds.

`observe.Observer` holds what the apiserver said, `tasks.Work` the running tasks and per-model
progress, `status.StatusReporter` the writes back; this module owns the loop that ties them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightkube import AsyncClient

from modelcache.agent import plan as pl
from modelcache.agent.metrics import Metrics, serve
from modelcache.agent.observe import DiskThread, Observer, Remembered, observe_disk
from modelcache.agent.status import StatusReporter
from modelcache.agent.tasks import LastPass, Work
from modelcache.kube import backoff
from modelcache.store import Store

log = logging.getLogger("modelcache.agent")


@dataclass
class Settings:
    """The agent's command line (`modelcache agent`), fixed for the life of the process."""

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


class Agent:
    """One node's agent: wires the pieces together and runs the watch, reconcile and verify loops."""

    def __init__(self, client: AsyncClient, settings: Settings, metrics: Metrics | None = None) -> None:
        self.s = settings
        # SQLite connections belong to the thread that opened them: the engine uses `store` on the
        # event loop; everything else on disk goes through one worker thread (`disk`).
        self.store = Store(settings.root)
        self.disk = DiskThread(settings.root)
        self.metrics = metrics or Metrics()
        self._kick = asyncio.Event()
        self.remembered = Remembered()
        self.last = LastPass()
        secrets: set[str] = set()  # every credential value seen, to scrub messages
        self.observer = Observer(client, settings, self.kick)
        self.status = StatusReporter(client, settings, self.metrics, self.observer, secrets)
        self.work = Work(
            client,
            settings,
            self.store,
            self.disk,
            self.metrics,
            self.observer,
            self.status,
            self.remembered,
            self.last,
            secrets,
            self.kick,
        )
        self._wake_at: float | None = None
        self._reconcile_lock = asyncio.Lock()
        self._ready = False
        self._loop_alive = True
        self._beat = time.monotonic()  # last pass of the reconcile loop, for /healthz

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def resync(self) -> float:
        return self.observer.resync

    def _healthy(self) -> bool:
        """Alive and not stuck: the reconcile loop has turned within a few resync periods."""
        return self._loop_alive and time.monotonic() - self._beat < 3 * self.resync + 60

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        """Until cancelled: serve metrics, watch, reconcile, verify."""
        await self.disk.run(self._startup)
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
        peer_server = await self.work.peers.start_server(self.store)
        tasks = [
            asyncio.create_task(self.observer.watch(), name="watch"),
            asyncio.create_task(self._loop(), name="reconcile"),
            asyncio.create_task(self.work.verify_loop(self._reconcile_lock), name="verify"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            self._loop_alive = False
            running = [*tasks, *self.work.running()]
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await runner.cleanup()
            if peer_server is not None:
                await peer_server.stop()
            self.disk.shutdown()
            self.work.close()

    def _startup(self) -> None:
        """Adopt what is on disk: repair after any crash; complete models count as downloaded."""
        disk = self.disk.store
        disk.ensure()
        disk.repair()
        self.remembered.load(disk)
        adopted = len(disk.index.all())
        if adopted:
            log.info("adopted %d complete model(s) already on disk", adopted)

    async def _loop(self) -> None:
        """Reconcile when kicked, every resync and at the plan's wake time; between those, only
        report progress (a download's bytes) every `progress_interval`."""
        await self.observer.synced.wait()
        last_full = -1e18
        failures = 0
        while True:
            now = time.monotonic()
            timeout = max(0.0, last_full + self.resync - now)
            if self.work.downloads:
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

    # -- reconcile -----------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """One pass; serialised with the verify loop's removal of a damaged model."""
        async with self._reconcile_lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        """observe -> plan -> act -> report, once (the caller holds the reconcile lock)."""
        wanted = self.last.wanted = pl.entries(self.observer.spec(), self.s.node_group)
        await self.observer.load_config(wanted)
        group = self.observer.group_name(wanted)
        pvc_to_key = self.remembered.pvc_to_key
        learnt = False
        for e in wanted:
            name = e.pvc_name(group)
            if name and pvc_to_key.get(name) != e.key:
                pvc_to_key[name] = e.key
                learnt = True
        keys = pl.uris_by_key(wanted)
        obs = await self.disk.run(observe_disk, self.disk.store, set(keys))
        blocked: set[str] = set()
        if obs.foreign:
            blocked = await self.work.adopt_foreign(obs, keys)
            obs = await self.disk.run(observe_disk, self.disk.store, set(keys))
        stale = [n for n, k in pvc_to_key.items() if k not in keys and k not in obs.disk]
        for n in stale:  # the model is gone: no pod can be using it through this name any more
            del pvc_to_key[n]
        if learnt or stale:
            await self.disk.run(self.remembered.save, self.disk.store)
        budget = pl.Budget(
            self.observer.storage_limit,
            obs.fs_free,
            self.s.reserve,
            self.s.high_watermark,
            self.s.low_watermark,
        )
        active = self.work.active()
        now = time.time()

        planned = [e for e in wanted if e.key not in blocked]

        def decide(mounted: set[str]) -> pl.Plan:
            return pl.plan(
                planned,
                obs.disk,
                obs.partials,
                self.work.sizes,
                active,
                self.work.progress,
                mounted,
                budget,
                now,
                max_concurrent=self.s.max_concurrent,
                delete_unreferenced=self.s.delete_unreferenced,
            )

        p = decide(set())
        if p.evict:  # only then is it worth asking which models pods on this node are using
            # Cannot tell what is mounted: evict nothing this time.
            mounted = await self.observer.mounted_or(pvc_to_key, lambda: set(obs.disk), "not evicting")
            p = decide(mounted)
        await self.work.apply(p, obs, keys)
        self._wake_at = p.wake_at
        self.last.healthy = {
            k: d for k, d in obs.disk.items() if d.healthy and k not in p.evict and k not in p.refetch
        }
        used = sum(d.size_bytes for d in obs.disk.values()) + sum(x.done_bytes for x in obs.partials.values())
        self.metrics.cache_size.set(p.capacity)
        self.metrics.cache_used.set(used)
        self.metrics.cache_free.set(obs.fs_free)
        await self.report()
        self.metrics.reconciles.inc()
        self._ready = True

    async def report(self) -> None:
        """Patch this node's status from the last reconcile and the tasks' progress."""
        await self.status.report(
            self.last.wanted, self.last.healthy, set(self.work.downloads), self.work.progress
        )
