"""`modelcache webhook`: the admission webhook server (validation of caches and node groups,
InferenceService and pod mutation). The work is in `modelcache.webhook`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelcache.errors import UsageError
from modelcache.webhook.limits import Limits

_LIMITS = Limits()  # the defaults, shown in --help


def main(
    port: Annotated[int, typer.Option(envvar="MODELCACHE_WEBHOOK_PORT", help="HTTPS port.")] = 9443,
    host: Annotated[
        str | None,
        typer.Option(envvar="MODELCACHE_WEBHOOK_HOST", help="Bind address [default: 0.0.0.0; --url's host]."),
    ] = None,
    namespace: Annotated[
        str,
        typer.Option(envvar="POD_NAMESPACE", help="Our namespace: the certificate Secret lives here."),
    ] = "kserve",
    service_name: Annotated[
        str,
        typer.Option(
            envvar="MODELCACHE_WEBHOOK_SERVICE", help="Service the apiserver calls (certificate names)."
        ),
    ] = "modelcache-webhook",
    url: Annotated[
        str | None,
        typer.Option(
            envvar="MODELCACHE_WEBHOOK_URL",
            help="Reached by URL instead of a Service, e.g. https://127.0.0.1:9443 (dev control plane).",
        ),
    ] = None,
    register: Annotated[
        bool,
        typer.Option(help="Create/replace the webhook configurations pointing at us (dev; needs RBAC)."),
    ] = False,
    configuration: Annotated[
        str, typer.Option(help="Name of our Mutating/ValidatingWebhookConfigurations.")
    ] = "modelcache-webhook",
    secret: Annotated[
        str, typer.Option(help="Secret holding the self-managed CA and serving certificate.")
    ] = "modelcache-webhook-tls",
    cert_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="MODELCACHE_WEBHOOK_CERT_DIR",
            help="Read tls.crt/tls.key from here (cert-manager); no Secret or caBundle management.",
        ),
    ] = None,
    kserve_namespace: Annotated[
        str, typer.Option(help="Namespace of KServe's inferenceservice-config ConfigMap.")
    ] = "kserve",
    when_not_ready: Annotated[
        str,
        typer.Option(
            envvar="MODELCACHE_WEBHOOK_WHEN_NOT_READY",
            help="Pod whose model is on no node yet: 'warn' admits it unchanged (warning + event); "
            "'require' mounts it and requires a ready node (Pending until one has it).",
        ),
    ] = "warn",
    resync_seconds: Annotated[
        float, typer.Option(min=1.0, help="How often to check the certificate and caBundle.")
    ] = 60.0,
    max_connections: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="MODELCACHE_WEBHOOK_MAX_CONNECTIONS",
            help="Open connections at most (~280 KB each); at the cap the longest-waiting idle or "
            "slow client is dropped, or the new one if all are busy.",
        ),
    ] = _LIMITS.max_connections,
    tls_handshake_timeout: Annotated[
        float,
        typer.Option(min=0.1, envvar="MODELCACHE_WEBHOOK_TLS_HANDSHAKE_TIMEOUT", help="Seconds."),
    ] = _LIMITS.tls_handshake_timeout,
    header_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            envvar="MODELCACHE_WEBHOOK_HEADER_TIMEOUT",
            help="Seconds to send request line and headers.",
        ),
    ] = _LIMITS.header_timeout,
    body_timeout: Annotated[
        float,
        typer.Option(min=0.1, envvar="MODELCACHE_WEBHOOK_BODY_TIMEOUT", help="Seconds to send the body."),
    ] = _LIMITS.body_timeout,
    idle_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            envvar="MODELCACHE_WEBHOOK_IDLE_TIMEOUT",
            help="Seconds a keep-alive connection may idle.",
        ),
    ] = _LIMITS.idle_timeout,
    max_body: Annotated[
        str,
        typer.Option(
            envvar="MODELCACHE_WEBHOOK_MAX_BODY",
            help="Largest AdmissionReview (quantity, e.g. 7Mi: an UPDATE carries two objects of up to 3Mi).",
        ),
    ] = "7Mi",
) -> None:
    """Serve the admission webhooks over TLS, managing their certificate and caBundle."""
    import asyncio
    import logging
    from urllib.parse import urlsplit

    from modelcache.quantity import parse_quantity
    from modelcache.webhook.admission import NotReadyPolicy, Options
    from modelcache.webhook.server import ServerConfig, run

    try:
        policy = NotReadyPolicy(when_not_ready)
    except ValueError:
        raise UsageError(f"--when-not-ready must be warn or require, got {when_not_ready!r}") from None
    bind = host
    if url:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise UsageError(f"--url must be https://HOST[:PORT], got {url!r}")
        if parts.port and parts.port != port:
            port = parts.port
        bind = bind or parts.hostname
    if cert_dir is not None and not (cert_dir / "tls.crt").is_file():
        raise UsageError(f"--cert-dir {cert_dir}: no tls.crt there")
    if register and cert_dir is not None:
        raise UsageError("--register needs the self-managed certificate (its CA goes into caBundle)")
    body_limit = parse_quantity(max_body)
    if not _LIMITS.small_body_bytes <= body_limit <= _LIMITS.large_body_budget_bytes:
        raise UsageError(f"--max-body must be between 64Ki and 32Mi, got {max_body!r}")
    limits = Limits(
        tls_handshake_timeout=tls_handshake_timeout,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_body_bytes=body_limit,
    )
    if not logging.getLogger("modelcache").handlers:  # run without the app's global options
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    config = ServerConfig(
        port=port,
        host=bind or "0.0.0.0",
        namespace=namespace,
        kserve_namespace=kserve_namespace,
        service=None if url else service_name,
        url=url,
        secret=secret,
        configuration=configuration,
        cert_dir=cert_dir,
        register=register,
        resync_seconds=resync_seconds,
        options=Options(when_not_ready=policy),
        limits=limits,
    )
    asyncio.run(run(config))


if __name__ == "__main__":  # `python -m modelcache.cli.webhook`, before the app registers `webhook`
    import sys

    from modelcache.errors import ModelcacheError

    try:
        typer.run(main)
    except ModelcacheError as exc:
        sys.stderr.write(f"modelcache: error: {exc.message}\n")
        sys.exit(exc.exit_code)
