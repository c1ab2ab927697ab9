"""The controller process: leader election, kopf watches, the config watcher and the reconcile loop.

One loop does all the work: wake up on any watch event (debounced), on config change, on retry, or
every `reconcilationFrequencyInSecs`; snapshot the indexes; `reconcile.plan()`; apply the plan. A
failed write is retried with backoff on the next pass; nothing is edge-triggered, so a missed event
costs at most one resync period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import kopf
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube import operators as ops
from lightkube.resources.apps_v1 import DaemonSet
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod

from modelcache.errors import ModelcacheError, UsageError
from modelcache.kube import resources
from modelcache.kube.backoff import Backoff
from modelcache.kube.config import LocalModelConfig, parse_local_model_config
from modelcache.kube.constants import CONFIGMAP_NAME, MANAGED_BY, MANAGED_BY_LABEL, MODEL_POD_LABEL
from modelcache.kube.metrics import ReconcileMetrics

from . import reconcile as r
from .apply import Writer
from .handlers import Hub, build_registry, configure_selectors, services
from .jobs import COMPONENT_LABEL as JOB_COMPONENT_LABEL
from .jobs import JOB_COMPONENT, DownloadJob, job_from
from .leader import LeaderElector, default_identity

log = logging.getLogger("modelcache.controller")

FIELD_MANAGER = "modelcache-controller"
ClusterStorageContainerRes = resources.ClusterStorageContainer
EXIT_LOST_LEADERSHIP = 1


@dataclass
class Options:
    namespace: str = "kserve"
    kubeconfig: Path | None = None
    agent_image: str = r.DEFAULT_AGENT_IMAGE
    agent_settings: dict[str, Any] = field(default_factory=dict)  # r.AGENT_SETTING_KEYS
    leader_elect: bool = True
    lease_duration: float = 15.0
    health_port: int = 0  # 0: no health endpoint
    health_host: str = "0.0.0.0"  # the kubelet probes from outside the pod
    debounce: float = 0.3
    identity: str = field(default_factory=default_identity)


class LostLeadershipError(ModelcacheError):
    """Another replica holds the Lease now; exit so that the Deployment restarts us as a candidate."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _obj_dict(obj: Any) -> dict[str, Any]:
    """A lightkube model as the plain dict the API sent."""
    data = obj.to_dict()
    assert isinstance(data, dict)
    return data


class Controller:
    def __init__(self, client: AsyncClient, opts: Options) -> None:
        self.client = client
        self.opts = opts
        self.config = LocalModelConfig()
        self.config_loaded = asyncio.Event()
        self._wake = asyncio.Event()
        self.metrics = ReconcileMetrics()
        self.hub = Hub(self.poke)
        self.writer = Writer(client, opts.namespace)
        self.passes = 0
        self.converged = False
        #: Pods asking for a cache that our webhook never labelled (created before it labelled them),
        #: which the label-selected watch cannot see; volumes are left alone until the first sweep.
        self.unlabelled_pods: list[r.Service] = []
        self.pods_swept = asyncio.Event()
        self._jobs_seen = False  # Jobs existed at the last listing: keep listing to clean them up

    def poke(self) -> None:
        """Ask for a pass (a watch event, a config change, a sweep result): one queue add."""
        self.metrics.added()
        self._wake.set()

    # -- config ----------------------------------------------------------------------------------------

    def _set_config(self, data: dict[str, Any] | None) -> None:
        try:
            config = parse_local_model_config(data)
        except UsageError as exc:
            log.error("%s; keeping the previous configuration", exc)
            self.config_loaded.set()
            return
        if config != self.config or not self.config_loaded.is_set():
            if config.model_dump() != self.config.model_dump():
                log.info("configuration: %s", config.model_dump_json())
            if not config.enabled:
                log.info(
                    "localModel.enabled is false: caches are still reconciled (as KServe does); "
                    "InferenceServices are not routed to them until it is true"
                )
            self.config = config
            _, ignored = r.agent_image(config, self.opts.agent_image)
            if ignored:
                log.warning("%s", ignored)
            self.poke()
        self.config_loaded.set()

    async def watch_config(self) -> None:
        """Follow `inferenceservice-config` in our namespace; absent means KServe's defaults."""
        backoff = Backoff(base=2.0, cap=30.0)
        while True:
            try:
                try:
                    cm = await self.client.get(ConfigMap, CONFIGMAP_NAME, namespace=self.opts.namespace)
                    self._set_config(dict(cm.data or {}))
                    version = cm.metadata.resourceVersion if cm.metadata else None
                except ApiError as exc:
                    if exc.status.code != 404:
                        raise
                    self._set_config(None)
                    version = None
                backoff.reset()  # the server answered
                async for op, obj in self.client.watch(
                    ConfigMap,
                    namespace=self.opts.namespace,
                    fields={"metadata.name": CONFIGMAP_NAME},
                    resource_version=version,
                ):
                    self._set_config(None if op == "DELETED" else dict(obj.data or {}))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching %s/%s: %s; retrying", self.opts.namespace, CONFIGMAP_NAME, exc)
                await asyncio.sleep(backoff.next())

    # -- observe ---------------------------------------------------------------------------------------

    async def _list_volumes(self) -> list[r.Volume] | None:
        labels: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, r.VOLUME_ROLE_LABEL: ops.exists()}
        try:
            found = []
            async for pv in self.client.list(PersistentVolume, labels=labels):
                found.append(r.volume_from({"kind": "PersistentVolume", **_obj_dict(pv)}))
            async for pvc in self.client.list(PersistentVolumeClaim, namespace="*", labels=labels):
                found.append(r.volume_from({"kind": "PersistentVolumeClaim", **_obj_dict(pvc)}))
        except Exception as exc:
            log.warning("listing PVs/PVCs failed (volumes left alone this pass): %s", exc)
            return None
        return [v for v in found if v is not None]

    async def _list_daemonsets(self) -> dict[str, str] | None:
        labels: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, r.COMPONENT_LABEL: r.AGENT_COMPONENT}
        try:
            out = {}
            async for ds in self.client.list(DaemonSet, namespace=self.opts.namespace, labels=labels):
                meta = ds.metadata
                if meta is None or not meta.name:
                    continue
                out[meta.name] = (meta.annotations or {}).get(r.SPEC_HASH_ANNOTATION, "")
        except Exception as exc:
            log.warning("listing DaemonSets failed (left alone this pass): %s", exc)
            return None
        return out

    async def _list_unlabelled_pods(self, namespaces: list[str]) -> list[r.Service]:
        labels: dict[str, Any] = {MODEL_POD_LABEL: ops.not_exists()}
        found = []
        for namespace in namespaces:
            async for pod in self.client.list(Pod, namespace=namespace, labels=labels, chunk_size=500):
                service = r.pod_service_from(_obj_dict(pod))
                if service is not None:
                    found.append(service)
        return found

    async def sweep_unlabelled_pods(self) -> None:
        """Once at start, list every pod without our label (in pages) for ones asking for a cache:
        pods created before the webhook labelled them. While some remain, re-list their namespaces
        every resync period; once none do, never again (the label-selected watch sees the rest)."""
        await self.config_loaded.wait()
        backoff = Backoff(base=2.0, cap=60.0)
        namespaces = ["*"]
        while True:
            try:
                found = await self._list_unlabelled_pods(namespaces)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listing pods without %s failed: %s; retrying", MODEL_POD_LABEL, exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            changed = found != self.unlabelled_pods
            self.unlabelled_pods = found
            if changed or not self.pods_swept.is_set():
                self.poke()
            self.pods_swept.set()
            if not found:
                log.info(
                    "no pod asks for a cache without the %s label; pods are watched by label", MODEL_POD_LABEL
                )
                return
            namespaces = sorted({s.namespace for s in found})
            if changed:
                log.warning(
                    "%d pod(s) ask for a cache but lack the %s=true label (created before the webhook "
                    "set it), e.g. %s/%s; their namespaces are re-listed every %ss until they are "
                    "labelled or gone",
                    len(found),
                    MODEL_POD_LABEL,
                    found[0].namespace,
                    found[0].name,
                    self.config.resync_seconds,
                )
            await asyncio.sleep(float(self.config.resync_seconds))

    async def _list_jobs(
        self, model_nodes: Mapping[str, r.ModelNode]
    ) -> tuple[list[DownloadJob] | None, list[dict[str, Any]]]:
        """Our download Jobs in jobNamespace and the ClusterStorageContainers, when any entry needs a
        Job or Jobs were seen last time (to delete them); else nothing is read (no RBAC needed)."""
        wanted = any(r.needs_download_job(e.source_uri) for mn in model_nodes.values() for e in mn.entries)
        if not wanted and not self._jobs_seen:
            return [], []
        labels: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, JOB_COMPONENT_LABEL: JOB_COMPONENT}
        try:
            found = [
                job_from(_obj_dict(j))
                async for j in self.client.list(Job, namespace=self.config.jobNamespace, labels=labels)
            ]
            jobs = [j for j in found if j is not None]
            cscs: list[dict[str, Any]] = []
            if wanted:
                try:
                    cscs = [_obj_dict(c) async for c in self.client.list(ClusterStorageContainerRes)]
                except ApiError as exc:
                    if exc.status.code != 404:  # no such CRD: no storage containers
                        raise
                except httpx2.HTTPStatusError as exc:  # no such group/version: a plain-text 404
                    if exc.response.status_code != 404:
                        raise
        except Exception as exc:
            log.warning(
                "listing download Jobs in %s failed (left alone this pass): %s", self.config.jobNamespace, exc
            )
            return None, []
        self._jobs_seen = bool(jobs)
        return jobs, cscs

    async def observe(self) -> r.Observed:
        snap = self.hub.snapshot()
        snap["pods_idx"] = snap.get("pods_idx", []) + list(self.unlabelled_pods)
        model_nodes = {m.name: m for m in snap.get("model_nodes_idx", []) if isinstance(m, r.ModelNode)}
        (volumes, daemonsets, (jobs, cscs)) = await asyncio.gather(
            self._list_volumes(), self._list_daemonsets(), self._list_jobs(model_nodes)
        )
        if not self.pods_swept.is_set():
            volumes = None  # serving PVCs of unlabelled pods are unknown yet: neither create nor delete
        caches = [
            c for c in snap.get("caches_idx", []) + snap.get("ns_caches_idx", []) if isinstance(c, r.Cache)
        ]
        return r.Observed(
            namespace=self.opts.namespace,
            config=self.config,
            nodes={n.name: n for n in snap.get("nodes_idx", []) if isinstance(n, r.Node)},
            groups={g.name: g for g in snap.get("groups_idx", []) if isinstance(g, r.NodeGroup)},
            caches=caches,
            model_nodes=model_nodes,
            services=services(snap),
            volumes=volumes,
            daemonsets=daemonsets,
            agent_image=self.opts.agent_image,
            agent_settings=self.opts.agent_settings,
            jobs=jobs,
            storage_containers=cscs,
        )

    # -- the loop --------------------------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        await self.config_loaded.wait()
        backoff = Backoff(base=0.5, cap=30.0)
        retry_at: float | None = None
        while True:
            timeout = float(self.config.resync_seconds)
            if retry_at is not None:
                timeout = max(0.0, min(timeout, retry_at - time.monotonic()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                self.metrics.added()  # the resync or retry timer (controller-runtime: AddAfter)
            if self.hub.indexes is None:
                self._wake.clear()
                continue  # kopf has not finished its initial listing yet
            await asyncio.sleep(self.opts.debounce)  # let a burst of events land in the indexes
            self._wake.clear()
            started = time.monotonic()
            self.metrics.started()
            try:
                observed = await self.observe()
                plan = r.plan(observed, _now())
                log.debug(
                    "pass %d: %d nodes, %d groups, %d caches, %d LocalModelNodes -> %d writes",
                    self.passes + 1,
                    len(observed.nodes),
                    len(observed.groups),
                    len(observed.caches),
                    len(observed.model_nodes),
                    len(plan),
                )
                outcome = await self.writer.apply(plan)
            except Exception:
                log.exception("reconcile pass failed; retrying")
                self.metrics.finished("error")
                retry_at = time.monotonic() + backoff.next()
                continue
            self.passes += 1
            self.converged = len(plan) == 0
            if len(plan) or outcome.failed:
                log.info(
                    "pass %d: %d writes, %d skipped (just written), %d failed in %.2fs",
                    self.passes,
                    outcome.writes,
                    outcome.skipped,
                    len(outcome.failed),
                    time.monotonic() - started,
                )
            if outcome.failed:
                self.metrics.finished("error")
                retry_at = time.monotonic() + backoff.next()
            elif outcome.skipped:
                self.metrics.finished("requeue_after")
                retry_at = time.monotonic() + self.writer.recent.window  # recheck once the echo is due
                backoff.reset()
            else:
                self.metrics.finished("success")
                retry_at = None
                backoff.reset()


def _login_handler(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _configure(settings: kopf.OperatorSettings) -> None:
    settings.posting.enabled = False  # our events are our own; kopf would post its log lines
    configure_selectors(settings)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10


async def _health_server(host: str, port: int, controller: Controller, elector: LeaderElector | None) -> None:
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        role = "leader" if elector is None or elector.is_leader else "standby"
        return web.Response(text=f"ok {role} passes={controller.passes} converged={controller.converged}")

    async def metrics(_: web.Request) -> web.Response:
        """Prometheus text: process metrics, controller-runtime's reconcile and workqueue metrics
        (kube/metrics.py) and the loop's own gauges (the chart's metrics port)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        leader = 1 if elector is None or elector.is_leader else 0
        ours = (
            "# TYPE modelcache_controller_leader gauge\n"
            f"modelcache_controller_leader {leader}\n"
            "# TYPE modelcache_controller_reconcile_passes counter\n"
            f"modelcache_controller_reconcile_passes_total {controller.passes}\n"
            "# TYPE modelcache_controller_converged gauge\n"
            f"modelcache_controller_converged {int(controller.converged)}\n"
        )
        body = generate_latest().decode() + ours
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run(opts: Options) -> None:
    """Run until SIGTERM/SIGINT (exit 0) or until leadership is lost (LostLeadershipError)."""
    try:
        if opts.kubeconfig is not None:
            os.environ["KUBECONFIG"] = str(opts.kubeconfig)  # kopf's login reads it too
            kube_config = KubeConfig.from_file(opts.kubeconfig)
        else:
            kube_config = KubeConfig.from_env()
    except ConfigError as exc:
        raise UsageError(f"no usable cluster configuration: {exc}") from exc
    client = AsyncClient(kube_config, field_manager=FIELD_MANAGER, trust_env=False)
    controller = Controller(client, opts)
    elector = None
    if opts.leader_elect:
        elector = LeaderElector(
            client,
            opts.namespace,
            opts.identity,
            lease_duration=opts.lease_duration,
            renew_deadline=opts.lease_duration * 2 / 3,
            retry_period=max(opts.lease_duration / 7.5, 0.5),
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    background: list[asyncio.Task[Any]] = []
    if opts.health_port:
        background.append(
            asyncio.create_task(_health_server(opts.health_host, opts.health_port, controller, elector))
        )
    try:
        if elector is not None:
            acquiring = asyncio.create_task(elector.acquire())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                acquiring.cancel()
                return
            stopping.cancel()
        log.info("controller %s active in namespace %s", opts.identity, opts.namespace)

        registry = build_registry(controller.hub)
        _login_handler(registry)

        @kopf.on.startup(registry=registry)
        def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
            _configure(settings)

        # It ends by itself once no unlabelled pod is left: not one of the tasks whose end means "stop".
        background.append(asyncio.create_task(controller.sweep_unlabelled_pods(), name="pod-sweep"))
        # kopf takes over SIGTERM/SIGINT once it runs: its task ending normally means "stop".
        kopf_stop: asyncio.Future[None] = loop.create_future()
        kopf_task = asyncio.create_task(
            kopf.operator(registry=registry, clusterwide=True, standalone=True, stop_flag=kopf_stop),
            name="kopf",
        )
        tasks = {
            kopf_task,
            asyncio.create_task(controller.watch_config(), name="config"),
            asyncio.create_task(controller.reconcile_forever(), name="reconcile"),
            asyncio.create_task(stop.wait(), name="stop"),
        }
        if elector is not None:
            tasks.add(asyncio.create_task(elector.keep(), name="leader"))
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if not kopf_stop.done():
            kopf_stop.set_result(None)
        for task in tasks - {kopf_task}:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=15)
        names = {task.get_name() for task in done}
        if "leader" in names:
            raise LostLeadershipError("lost leadership of the controller lease; exiting")
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None and task.get_name() != "stop":
                raise RuntimeError(f"{task.get_name()} stopped: {failure}")
    finally:
        if elector is not None:
            await elector.release()
        for task in background:
            task.cancel()
        await client.close()
