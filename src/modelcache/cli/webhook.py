"""`modelcache webhook`: the admission webhook server (validation of caches and node groups,
InferenceService and pod mutation). The work is in `modelcache.webhook`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelcache.errors import UsageError


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
) -> None:
    """Serve the admission webhooks over TLS, managing their certificate and caBundle."""
    import asyncio
    import logging
    from urllib.parse import urlsplit

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
