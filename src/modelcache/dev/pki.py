"""The dev control plane's PKI files, made in Python (modelcache.certs) so nothing needs openssl."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from modelcache.certs import CertKey, issue, key_pem, make_ca, new_key, write_private

__all__ = ["CertKey", "Pki", "issue", "make_ca", "make_service_account_keys"]

CA_NAME = "modelcache-dev-ca"


def make_service_account_keys() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) for signing and verifying service-account tokens."""
    key = new_key()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key_pem(key), public


@dataclass(frozen=True)
class Pki:
    """The files of one control plane's PKI, under `<home>/dev/pki/`."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def ca(self) -> CertKey:
        return CertKey.read(self.ca_cert, self.ca_key)

    def admin(self) -> CertKey:
        return CertKey.read(self.admin_cert, self.admin_key)

    def generate(self, extra_sans: Sequence[str] = ()) -> None:
        """Create a fresh CA, serving cert, admin client cert and service-account key pair."""
        ca = make_ca(CA_NAME)
        ca.write(self.ca_cert, self.ca_key)
        hosts = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "127.0.0.1"]
        issue(ca, "kube-apiserver", hosts=[*hosts, *extra_sans], server=True).write(
            self.serving_cert, self.serving_key
        )
        issue(ca, "modelcache-dev-admin", organizations=["system:masters"], client=True).write(
            self.admin_cert, self.admin_key
        )
        private, public = make_service_account_keys()
        write_private(self.sa_key, private, 0o600)
        write_private(self.sa_pub, public, 0o644)

    def mint_client(self, user: str, groups: Sequence[str] = ()) -> CertKey:
        """A client certificate for `user` in `groups`, signed by this control plane's CA."""
        return issue(self.ca(), user, organizations=groups, client=True)
