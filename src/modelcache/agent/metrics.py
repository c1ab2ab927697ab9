"""The agent's Prometheus metrics and its small HTTP server (/metrics, /healthz, /readyz).

One registry per agent (not the global default), so tests can run several agents in one process.
Duration buckets reach 8 hours: a 1 TB model over a throttled link takes that long.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_downloaded = Counter(
            "modelcache_agent_downloaded_bytes", "Bytes received from model sources.", ["scheme"], registry=r
        )
        self.downloads = Counter(
            "modelcache_agent_downloads", "Model downloads finished, by outcome.", ["outcome"], registry=r
        )
        self.duration = Histogram(
            "modelcache_agent_download_duration_seconds",
            "Wall time of successful model downloads.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.cache_size = Gauge(
            "modelcache_agent_cache_size_bytes", "Bytes the cache may hold (budget capacity).", registry=r
        )
        self.cache_used = Gauge(
            "modelcache_agent_cache_used_bytes", "Bytes held by models and partial downloads.", registry=r
        )
        self.cache_free = Gauge(
            "modelcache_agent_cache_free_bytes", "Free bytes on the cache filesystem.", registry=r
        )
        self.models = Gauge("modelcache_agent_models", "Wanted models by status.", ["status"], registry=r)
        self.evictions = Counter(
            "modelcache_agent_evictions", "Models removed from the cache to free space.", registry=r
        )
        self.reconciles = Counter(
            "modelcache_agent_reconciles", "Completed reconcile passes (observe, plan, act).", registry=r
        )
        self.verify_failures = Counter(
            "modelcache_agent_verify_failures",
            "Models that failed verification (fast: files/sizes, full: sha256).",
            ["kind"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(
    metrics: Metrics, host: str, port: int, healthy: Callable[[], bool], ready: Callable[[], bool]
) -> web.AppRunner:
    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
