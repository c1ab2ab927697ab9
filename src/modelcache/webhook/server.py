"""The admission webhook server: an aiohttp TLS server that reads the cluster state a request needs
and hands it to the pure decisions in `admission`.

Why aiohttp rather than kopf's webhook server: we need full control of the AdmissionReview response
(JSON patch, warnings, status codes), a certificate we rotate ourselves and reload without a
restart, and no operator loop; the whole server is this file.

Why per-request reads rather than a watch cache: admission must see the latest state. A cache
created a moment ago must be visible to the duplicate and capacity checks of the next one, and a
watch cache lags; list calls against the apiserver are consistent reads. The reads are small and
targeted (`admission.reads` says which): caches and node groups (a handful of objects), nodes by
the model's ready label, and only a cache DELETE lists pods. A pod admission costs 1-4 calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from modelcache.kube.config import parse_local_model_config
from modelcache.kube.constants import (
    CONFIGMAP_NAME,
    LOCALMODEL_LABEL,
    READY_NODE_LABEL_VALUE,
    ready_label,
)
from modelcache.kube.events import EventRecorder, ObjectRef
from modelcache.kube.metrics import WebhookMetrics
from modelcache.uri import redact, storage_key
from modelcache.webhook import admission, registration, tls
from modelcache.webhook.admission import Cluster, Decision, EventNote, NotReadyPolicy, Obj, Options
from modelcache.webhook.limits import Limits
from modelcache.webhook.listener import BODY, Listener

log = logging.getLogger("modelcache.webhook")
COMPONENT = "modelcache-webhook"


@dataclass
class ServerConfig:
    port: int = 9443
    host: str = "0.0.0.0"
    namespace: str = "kserve"
    kserve_namespace: str = "kserve"
    service: str | None = "modelcache-webhook"
    url: str | None = None
    secret: str = "modelcache-webhook-tls"
    configuration: str = registration.CONFIGURATION_NAME
    cert_dir: Path | None = None  # cert-manager (or any) mounted tls.crt/tls.key: no self-management
    register: bool = False
    resync_seconds: float = 60.0
    options: Options = field(default_factory=Options)
    limits: Limits = field(default_factory=Limits)

    @property
    def url_host(self) -> str | None:
        return urlsplit(self.url).hostname if self.url else None


# -- cluster reads --------------------------------------------------------------------------------
def _resources() -> dict[str, Any]:
    from modelcache.kube import resources  # lightkube only once serving: the CLI starts fast

    return {
        "cache": resources.LocalModelCache,
        "ns_cache": resources.LocalModelNamespaceCache,
        "group": resources.LocalModelNodeGroup,
        "isvc": resources.InferenceService,
        "llmisvc": list(resources.LLMInferenceServices),
    }


class StateReader:
    def __init__(self, client: Any, kserve_namespace: str) -> None:
        self.client = client
        self.kserve_namespace = kserve_namespace
        self.res = _resources()
        self.events = EventRecorder(client, COMPONENT)

    async def _list(self, res: Any, **kwargs: Any) -> list[Obj]:
        """Plain dicts; a kind whose CRD is not installed (404) lists as empty. `res` may be a
        list of versions of one kind, tried in order until one is served."""
        import httpx2
        from lightkube import ApiError

        for version in res if isinstance(res, list) else [res]:
            try:
                return [o.to_dict() async for o in self.client.list(version, **kwargs)]
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
            except httpx2.HTTPStatusError as exc:  # no such group/version: a plain-text 404
                if exc.response.status_code != 404:
                    raise
        return []

    async def read(self, request: Obj, needs: admission.Reads) -> Cluster:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import ConfigMap, Node, Pod

        cluster = Cluster()
        if needs.caches:
            cluster.caches = await self._list(self.res["cache"])
        if needs.namespace_caches:
            cluster.namespace_caches = await self._list(
                self.res["ns_cache"], namespace=needs.namespace_caches_in
            )
        if needs.node_groups:
            groups = await self._list(self.res["group"])
            cluster.node_groups = {g["metadata"]["name"]: g for g in groups}
        if needs.config:
            try:
                cm = await self.client.get(ConfigMap, CONFIGMAP_NAME, namespace=self.kserve_namespace)
                cluster.local_model_config = parse_local_model_config(cm.data)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
        if needs.ready_nodes:
            pod = request.get("object") or {}
            namespace = str(request.get("namespace") or "")
            uri = admission.pod_model_uri(pod, namespace, cluster)
            if uri:
                label = ready_label(storage_key(uri))
                cluster.nodes = await self._list(Node, labels={label: READY_NODE_LABEL_VALUE})
        if needs.users_of:
            kind = (request.get("kind") or {}).get("kind")
            scope = str(request.get("namespace") or "*") if kind == "LocalModelNamespaceCache" else "*"
            selector = {LOCALMODEL_LABEL: needs.users_of}
            cluster.inference_services = await self._list(self.res["isvc"], namespace=scope, labels=selector)
            cluster.llm_inference_services = await self._list(
                self.res["llmisvc"], namespace=scope, labels=selector
            )
            # pods opt in by annotation too, which no selector can express
            cluster.pods = await self._list(Pod, namespace=scope)
        return cluster

    async def record(self, note: EventNote) -> None:
        inv = note.involved
        ref = ObjectRef(
            inv.get("apiVersion", ""),
            inv.get("kind", ""),
            inv.get("name", ""),
            note.namespace,
            inv.get("uid", ""),
        )
        await self.events.record(ref, note.type, note.reason, note.message)


# -- HTTP -----------------------------------------------------------------------------------------
class Reader(Protocol):
    """What the HTTP edge needs from the cluster (`StateReader`; tests serve a fixed state)."""

    async def read(self, request: Obj, needs: admission.Reads) -> Cluster: ...

    async def record(self, note: EventNote) -> None: ...


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def redact_text(text: str) -> str:
    """Free text (an exception from a cluster read, say) with every URI in it redacted, on one line."""
    one_line = " ".join(text.split())
    return _URI_IN_TEXT.sub(lambda m: redact(m.group(0)), one_line)


CLUSTER_READS = 8  # concurrent reads of cluster state for admission decisions
MAX_PENDING_EVENTS = 64  # Events still being written; more are dropped with a log line


class Webhook:
    def __init__(self, reader: Reader, options: Options) -> None:
        self.reader = reader
        self.options = options
        self.ready = False
        self._background: set[asyncio.Task[None]] = set()
        self.metrics = WebhookMetrics(tuple(registration.PATHS))
        # Anyone who can reach the port can POST reviews: bound what each costs the apiserver.
        self._reads = asyncio.Semaphore(CLUSTER_READS)

    async def decide(self, req: Obj, mutating: bool) -> Decision:
        try:
            async with self._reads:
                cluster = await self.reader.read(req, admission.reads(req))
            return admission.review(req, cluster, self.options)
        except Exception as exc:  # the cluster reads (or a bug): one line, the traceback at debug level
            reason = redact_text(f"{type(exc).__name__}: {exc}")[:300]
            log.warning("admission of %s failed: %s", admission.request_kind(req) or "?", reason)
            log.debug("admission failure", exc_info=True)
            if mutating:  # a mutation that cannot be computed is skipped, never blocks
                return Decision(warnings=(f"modelcache webhook did not mutate this object: {reason}",))
            return admission.deny(f"modelcache webhook could not check this request: {reason}", code=500)

    async def admit(self, request: web.Request) -> web.Response:
        """`_admit`, counted and timed per path as controller-runtime's webhook server does."""
        started = time.monotonic()
        self.metrics.begin(request.path)
        code = 500
        try:
            response = await self._admit(request)
            code = response.status
            return response
        finally:
            self.metrics.end(request.path, code, time.monotonic() - started)

    async def metrics_text(self, _: web.Request) -> web.Response:
        """Prometheus text: controller-runtime's webhook metrics and the process' own."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _admit(self, request: web.Request) -> web.Response:
        """HTTP 400 with a one-line reason for a body that is no AdmissionReview (see
        `admission.parse_review`), else the AdmissionReview response."""
        body = request[BODY] if BODY in request else await request.read()
        try:
            req = admission.parse_review(body)
        except admission.MalformedReview as exc:
            reason = redact_text(exc.reason)
            log.warning(
                "%s %s: not an AdmissionReview we can answer: %s", request.method, request.path, reason
            )
            return web.json_response(
                {"error": f"expected an admission.k8s.io/v1 AdmissionReview: {reason}"}, status=400
            )
        decision = await self.decide(req, mutating=request.path.startswith("/mutate"))
        for note in decision.events:
            if len(self._background) >= MAX_PENDING_EVENTS:  # events are best effort: drop, never queue
                log.warning("dropping an event: %d still being recorded", len(self._background))
                break
            task = asyncio.create_task(self._record(note))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        kind = admission.request_kind(req)
        log.info(
            "%s %s %s/%s: %s%s",
            req.get("operation"),
            kind,
            req.get("namespace") or "",
            req.get("name") or "",
            "allowed" if decision.allowed else f"denied ({decision.message})",
            f", {len(decision.patch)} patch ops" if decision.patch else "",
        )
        return web.json_response(admission.admission_response(str(req.get("uid", "")), decision))

    async def _record(self, note: EventNote) -> None:
        try:
            await self.reader.record(note)
        except Exception as exc:  # an event is best effort
            log.warning("could not record event %s: %s", note.reason, exc)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok") if self.ready else web.Response(status=503, text="not ready")

    def app(
        self, middlewares: Iterable[Any] = (), max_body_bytes: int = Limits.max_body_bytes
    ) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=list(middlewares))
        for path in registration.PATHS:
            app.router.add_post(path, self.admit)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_text)
        return app


# -- certificates ---------------------------------------------------------------------------------
class Certificates:
    """Keeps an SSLContext loaded with the current serving certificate."""

    def __init__(self, config: ServerConfig, client: Any) -> None:
        self.config = config
        self.client = client
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._dir = Path(tempfile.mkdtemp(prefix="modelcache-webhook-"))
        self._loaded: bytes = b""
        self._mtime: float = 0.0
        self.material: tls.Material | None = None

    def _load_pem(self, cert: bytes, key: bytes) -> None:
        if cert == self._loaded:
            return
        cert_path, key_path = self._dir / "tls.crt", self._dir / "tls.key"
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        self.context.load_cert_chain(cert_path, key_path)
        self._loaded = cert
        log.info("serving certificate loaded")

    def _load_dir(self) -> None:
        assert self.config.cert_dir is not None
        cert_path = self.config.cert_dir / "tls.crt"
        mtime = cert_path.stat().st_mtime
        if mtime != self._mtime:
            self.context.load_cert_chain(cert_path, self.config.cert_dir / "tls.key")
            self._mtime = mtime
            log.info("serving certificate loaded from %s", self.config.cert_dir)

    async def refresh(self) -> None:
        """Renew if due (self-managed) or reload changed files (cert-manager)."""
        if self.config.cert_dir is not None:
            self._load_dir()
            return
        hosts = tls.hosts_for(self.config.service, self.config.namespace, self.config.url_host)
        self.material = await tls.ensure_secret(self.client, self.config.namespace, self.config.secret, hosts)
        self._load_pem(self.material.cert, self.material.key)

    async def publish(self) -> None:
        """Keep our configurations' caBundle equal to the CA bundle (self-managed only)."""
        if self.material is not None:
            await tls.sync_ca_bundle(self.client, self.config.configuration, self.material.ca_bundle_b64)

    def close(self) -> None:
        for name in ("tls.crt", "tls.key"):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / name).unlink()
        with contextlib.suppress(OSError):
            self._dir.rmdir()


async def register(client: Any, config: ServerConfig, ca_bundle_b64: str) -> None:
    """Create or replace our webhook configurations (dev control plane: `--url ... --register`)."""
    from lightkube import ApiError
    from lightkube.codecs import from_dict

    service = None if config.url else (config.namespace, config.service or registration.APP_NAME)
    for doc in registration.configurations(
        url=config.url,
        service=service,
        ca_bundle=ca_bundle_b64,
        name=config.configuration,
        own_namespace=config.namespace,
    ):
        obj: Any = from_dict(doc)
        try:
            current = await client.get(type(obj), config.configuration)
            obj.metadata.resourceVersion = current.metadata.resourceVersion
            await client.replace(obj)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            await client.create(obj)
    log.info("registered webhook configurations %s -> %s", config.configuration, config.url or service)


@contextlib.asynccontextmanager
async def serve(
    webhook: Webhook, ssl_context: ssl.SSLContext, host: str, port: int, limits: Limits | None = None
) -> AsyncIterator[Listener]:
    """Serve `webhook` over TLS on host:port (0: a free port, see `Listener.port`) within `limits`.
    Needs no cluster: `run` wraps it with the certificate and cluster upkeep."""
    listener = Listener(limits)
    app = webhook.app(middlewares=[listener.middleware], max_body_bytes=listener.limits.max_body_bytes)
    runner = web.AppRunner(app, access_log=None, **listener.handler_options())
    await runner.setup()
    try:
        assert runner.server is not None
        await listener.start(runner.server, ssl_context, host, port)
        try:
            yield listener
        finally:
            await listener.close()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _client() -> AsyncIterator[Any]:
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig

    client = AsyncClient(KubeConfig.from_env(), field_manager=COMPONENT, trust_env=False)
    try:
        yield client
    finally:
        await client.close()


async def run(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT."""
    async with _client() as client:
        certs = Certificates(config, client)
        webhook = Webhook(StateReader(client, config.kserve_namespace), config.options)
        await certs.refresh()
        try:
            async with serve(webhook, certs.context, config.host, config.port, config.limits) as listener:
                log.info("webhook serving on https://%s:%d (%s)", config.host, listener.port, config.limits)
                if config.register and certs.material is not None:
                    await register(client, config, certs.material.ca_bundle_b64)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                while not stop.is_set():
                    try:
                        await certs.refresh()
                        await certs.publish()
                        webhook.ready = True
                    except Exception as exc:  # keep serving with what we have; retry next round
                        log.warning("certificate upkeep failed (will retry): %s", redact_text(str(exc)))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=config.resync_seconds)
        finally:
            certs.close()


__all__ = ["Limits", "NotReadyPolicy", "ServerConfig", "Webhook", "run", "serve"]
