"""The webhook's serving certificate: created, stored in a Secret, renewed, and published as the
caBundle of our webhook configurations. Or, with cert-manager, read from files it mounts.

Rotation without an outage: the CA lives long (5 years) and signs a short-lived serving certificate
(90 days, renewed 30 days before expiry), so a renewal leaves the caBundle unchanged. A CA close to
expiry is replaced by a new one that joins the bundle *next to* the old one; the serving certificate
switches to the new CA only at its next renewal, by which time every configuration trusts both.

Decisions (`plan`, `issue`) are pure; the Secret and configuration calls are at the bottom.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from modelcache import certs
from modelcache.certs import BACKDATE

if TYPE_CHECKING:
    from lightkube import AsyncClient

log = logging.getLogger("modelcache.webhook")

CA_LIFETIME = dt.timedelta(days=5 * 365)
CA_RENEW_BEFORE = dt.timedelta(days=365)
CERT_LIFETIME = dt.timedelta(days=90)
CERT_RENEW_BEFORE = dt.timedelta(days=30)

KEY_CA_BUNDLE = "ca.crt"
KEY_CA_KEY = "ca.key"
KEY_CERT = "tls.crt"
KEY_KEY = "tls.key"


@dataclass(frozen=True)
class Material:
    """PEM bytes. `ca_bundle` may hold two CAs during a CA rotation; `ca_key` is the newest's."""

    ca_bundle: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def to_secret_data(self) -> dict[str, str]:
        return {
            k: base64.b64encode(v).decode()
            for k, v in (
                (KEY_CA_BUNDLE, self.ca_bundle),
                (KEY_CA_KEY, self.ca_key),
                (KEY_CERT, self.cert),
                (KEY_KEY, self.key),
            )
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str] | None) -> Material | None:
        data = data or {}
        try:
            raw = {k: base64.b64decode(data[k]) for k in (KEY_CA_BUNDLE, KEY_CA_KEY, KEY_CERT, KEY_KEY)}
        except (KeyError, ValueError):
            return None
        return cls(raw[KEY_CA_BUNDLE], raw[KEY_CA_KEY], raw[KEY_CERT], raw[KEY_KEY])

    @property
    def ca_bundle_b64(self) -> str:
        return base64.b64encode(self.ca_bundle).decode()


class Action(StrEnum):
    KEEP = "keep"
    NEW = "new"  # no usable material: new CA and certificate
    ROTATE_CA = "rotate-ca"  # CA near expiry: add a new CA to the bundle, keep serving
    RENEW_CERT = "renew-cert"  # serving certificate near expiry / wrong names: reissue from the CA


def new_ca(now: dt.datetime) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a fresh CA that may only sign leaves."""
    ca = certs.make_ca(
        f"modelcache-webhook-ca-{now:%Y%m%d%H%M%S}", now=now, validity=CA_LIFETIME, path_length=0
    )
    return ca.cert_pem, ca.key_pem


def issue_cert(ca_pem: bytes, ca_key_pem: bytes, hosts: list[str], now: dt.datetime) -> tuple[bytes, bytes]:
    """A serving certificate for `hosts` (DNS names or IPs), never outliving its CA."""
    leaf = certs.issue(
        certs.CertKey(ca_pem, ca_key_pem), hosts[0], hosts=hosts, server=True, now=now, validity=CERT_LIFETIME
    )
    return leaf.cert_pem, leaf.key_pem


def _covers(cert: x509.Certificate, hosts: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n.value) for n in san}
    return all(str(h) in have for h in hosts)


def plan(material: Material | None, hosts: list[str], now: dt.datetime) -> Action:
    """What to do with the stored material: keep, renew the certificate, rotate the CA, start over."""
    if material is None:
        return Action.NEW
    try:
        cas = x509.load_pem_x509_certificates(material.ca_bundle)
        cert = x509.load_pem_x509_certificate(material.cert)
        serialization.load_pem_private_key(material.key, password=None)
        serialization.load_pem_private_key(material.ca_key, password=None)
    except ValueError:
        return Action.NEW
    newest = cas[0]
    if newest.not_valid_after_utc <= now:
        return Action.NEW
    if newest.not_valid_after_utc - now < CA_RENEW_BEFORE and len(cas) == 1:
        return Action.ROTATE_CA
    signed_by_bundle = any(_issued_by(cert, ca) for ca in cas)
    if (
        not signed_by_bundle
        or cert.not_valid_after_utc - now < CERT_RENEW_BEFORE
        or cert.not_valid_before_utc > now + BACKDATE
        or not _covers(cert, hosts)
    ):
        return Action.RENEW_CERT
    return Action.KEEP


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _unexpired(bundle: bytes, now: dt.datetime) -> list[x509.Certificate]:
    try:
        return [c for c in x509.load_pem_x509_certificates(bundle) if c.not_valid_after_utc > now]
    except ValueError:
        return []


def apply(action: Action, material: Material | None, hosts: list[str], now: dt.datetime) -> Material:
    """The new material for `action` (pure apart from key generation)."""
    if action is Action.KEEP and material is not None:
        return material
    if action is Action.NEW or material is None:
        ca, ca_key = new_ca(now)
        cert, key = issue_cert(ca, ca_key, hosts, now)
        return Material(ca, ca_key, cert, key)
    if action is Action.ROTATE_CA:
        ca, ca_key = new_ca(now)
        old = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in _unexpired(material.ca_bundle, now)
        )
        return replace(material, ca_bundle=ca + old, ca_key=ca_key)
    newest = x509.load_pem_x509_certificates(material.ca_bundle)[0].public_bytes(serialization.Encoding.PEM)
    cert, key = issue_cert(newest, material.ca_key, hosts, now)
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in _unexpired(material.ca_bundle, now))
    return replace(material, ca_bundle=bundle, cert=cert, key=key)


def hosts_for(service: str | None, namespace: str, url_host: str | None) -> list[str]:
    """Names the apiserver may use to reach us: the Service's DNS names, or the --url host."""
    if url_host:
        return [url_host, *(["localhost"] if url_host in ("127.0.0.1", "::1") else [])]
    assert service
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
    ]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- Kubernetes I/O -------------------------------------------------------------------------------
async def ensure_secret(
    client: AsyncClient, namespace: str, name: str, hosts: list[str], attempts: int = 5
) -> Material:
    """Read the Secret, renew what `plan` says, write it back (optimistic concurrency between
    replicas: on a conflict we re-read and take the winner's material)."""
    from lightkube import ApiError
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Secret

    for _ in range(attempts):
        try:
            secret: Secret | None = await client.get(Secret, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            secret = None
        current = Material.from_secret_data(secret.data if secret else None)
        now = now_utc()
        action = plan(current, hosts, now)
        if action is Action.KEEP and current is not None:
            return current
        fresh = apply(action, current, hosts, now)
        log.info("webhook certificate: %s (secret %s/%s)", action.value, namespace, name)
        try:
            if secret is None:
                await client.create(
                    Secret(
                        metadata=ObjectMeta(name=name, namespace=namespace),
                        type="kubernetes.io/tls",
                        data=fresh.to_secret_data(),
                    )
                )
            else:
                secret.data = fresh.to_secret_data()
                await client.replace(secret)  # carries resourceVersion: 409 if someone else won
        except ApiError as exc:
            if exc.status.code in (409,):
                continue
            raise
        return fresh
    raise RuntimeError(f"could not settle secret {namespace}/{name} after {attempts} attempts")


async def sync_ca_bundle(client: AsyncClient, configuration: str, ca_bundle_b64: str) -> int:
    """Set caBundle on every webhook of our Mutating/ValidatingWebhookConfigurations; returns how
    many were changed. A configuration that does not exist (yet) is skipped."""
    from lightkube import ApiError
    from lightkube.resources.admissionregistration_v1 import (
        MutatingWebhookConfiguration,
        ValidatingWebhookConfiguration,
    )
    from lightkube.types import PatchType

    changed = 0
    kinds: tuple[Any, ...] = (ValidatingWebhookConfiguration, MutatingWebhookConfiguration)
    for kind in kinds:
        try:
            current = await client.get(kind, configuration)
        except ApiError as exc:
            if exc.status.code == 404:
                continue
            raise
        ops: list[dict[str, Any]] = []
        for i, hook in enumerate(current.webhooks or []):
            if hook.clientConfig.caBundle != ca_bundle_b64:
                ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.name})
                ops.append(
                    {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle_b64}
                )
        if ops:
            await client.patch(kind, configuration, ops, patch_type=PatchType.JSON)
            changed += len(ops) // 2
            log.info("caBundle updated on %s %s (%d webhooks)", kind.__name__, configuration, len(ops) // 2)
    return changed
