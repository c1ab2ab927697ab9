"""Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, and helpers to push to it.

The registry runs from our own YAML config (filesystem storage in a temp dir); the packaged system
service is never used. `scripts/deps/docker-registry.sh` installs the binary and `htpasswd`
(apache2-utils: the registry only accepts bcrypt hashes). ORAS artifacts are pushed with the `oras`
package; modelcar images are built by hand (tar layers + config + manifest) and pushed through the
registry's HTTP API, so no container tooling is needed.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

BINARY = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: modelcache-test-secret
{auth}
"""


def available() -> bool:
    return Path(BINARY).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The registry token flow's other half (what Docker Hub's auth.docker.io does), on 127.0.0.1.

    GET /token?service=..&scope=repository:NAME:pull -> {"token": JWT}, RS256-signed by a
    self-signed certificate the registry trusts (`rootcertbundle`), the certificate sent in `x5c`.
    Basic credentials that match `users` get the actions asked for; anyone else gets a token with
    no access (the registry then answers 401 insufficient_scope), a wrong password gets 401 here.
    """

    issuer = "modelcache-test-issuer"
    service = "modelcache-test-registry"

    def __init__(self, work: Path, users: dict[str, str]) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcache test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = work / "token-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.issued = 0
        self.subjects: list[str] = []  # who asked for each token over HTTP ("" = anonymous)
        self.server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def token(self, subject: str, access: list[dict[str, object]], ttl: int = 300) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        self.issued += 1
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": f"t{self.issued}-{now}",
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def start(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                subject = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if service.users.get(user) != password:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    subject = user
                service.subjects.append(subject)
                access: list[dict[str, object]] = []
                for scope in query.get("scope", []):
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    if subject and kind == "repository":
                        access.append({"type": kind, "name": name, "actions": actions.split(",")})
                body = json.dumps({"token": service.token(subject, access), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Registry:
    """A registry process. With `users`, it demands credentials: `auth="htpasswd"` (Basic, checked
    against an htpasswd file) or `auth="token"` (the Bearer token flow, via a `TokenService`)."""

    def __init__(self, work: Path, users: dict[str, str] | None = None, auth: str = "htpasswd") -> None:
        self.work = work
        self.root = work / "storage"
        self.users = users or {}
        self.auth = auth
        self.tokens: TokenService | None = None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, repo: str, ref: str = "latest") -> str:
        sep = "@" if ref.startswith("sha256:") else ":"
        return f"oci://{self.host}/{repo}{sep}{ref}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users and self.auth == "token":
            self.tokens = TokenService(self.work, self.users)
            self.tokens.start()
            auth = (
                f"auth:\n  token:\n    realm: {self.tokens.realm}\n    service: {self.tokens.service}\n"
                f"    issuer: {self.tokens.issuer}\n    rootcertbundle: {self.tokens.bundle}\n"
            )
        elif self.users:
            htpasswd = self.work / "htpasswd"
            lines = []
            for user, password in self.users.items():
                out = subprocess.run(
                    ["htpasswd", "-nbB", user, password], check=True, capture_output=True, text=True
                ).stdout
                lines.append(out.strip())
            htpasswd.write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: modelcache-test\n    path: {htpasswd}\n"
        self.port = free_port()
        config = self.work / "config.yml"
        config.write_text(CONFIG.format(root=self.root, port=self.port, auth=auth))
        log = open(self.work / "registry.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited: {(self.work / 'registry.log').read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.tokens is not None:
            self.tokens.stop()
            self.tokens = None

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- HTTP API ---------------------------------------------------------------------------
    def _request(
        self, method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if not url.startswith("http"):
            url = f"http://{self.host}{url}"
        hdrs = dict(headers or {})
        if self.tokens is not None:
            repo = urllib.parse.urlsplit(url).path.split("/v2/", 1)[1].rsplit("/", 2)[0]
            if "/blobs/uploads" in url:
                repo = urllib.parse.urlsplit(url).path.split("/v2/", 1)[1].split("/blobs/uploads", 1)[0]
            access: list[dict[str, object]] = [
                {"type": "repository", "name": repo, "actions": ["pull", "push"]}
            ]
            hdrs["Authorization"] = "Bearer " + self.tokens.token("pusher", access)
        elif self.users:
            user, password = next(iter(self.users.items()))
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload: POST for an upload session, then one PUT with the digest."""
        digest = digest_of(data)
        status, headers, body = self._request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        assert status == 202, (status, body)
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        status, _, body = self._request(
            "PUT",
            f"{location}{sep}digest={digest}",
            data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        assert status == 201, (status, body)
        return digest

    def push_manifest(self, repo: str, ref: str, manifest: dict[str, object], media_type: str) -> str:
        body = json.dumps(manifest, indent=2).encode()
        status, _, resp = self._request(
            "PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type}
        )
        assert status == 201, (status, resp)
        return digest_of(body)

    def push_modelcar(
        self,
        repo: str,
        tag: str,
        layers: list[dict[str, Member]],
        *,
        arch: str = "amd64",
        docker: bool = False,
    ) -> tuple[str, list[str]]:
        """Push an image whose layers are tar.gz of {path: bytes} (None = a directory), with OCI
        media types or (`docker`) Docker's v2 schema 2 ones. Returns (manifest digest, layer digests)."""
        layer_type = DOCKER_LAYER if docker else LAYER_GZIP
        manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        descriptors = []
        diff_ids = []
        for files in layers:
            raw = tar_bytes(files)
            blob = gzip.compress(raw, mtime=0)
            descriptors.append(
                {"mediaType": layer_type, "digest": self.push_blob(repo, blob), "size": len(blob)}
            )
            diff_ids.append(digest_of(raw))
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else IMAGE_CONFIG,
                "digest": self.push_blob(repo, config),
                "size": len(config),
            },
            "layers": descriptors,
        }
        digest = self.push_manifest(repo, tag, manifest, manifest_type)
        return digest, [str(d["digest"]) for d in descriptors]

    def push_index(self, repo: str, tag: str, manifests: dict[str, str]) -> str:
        """A multi-platform index over already pushed manifests ({"linux/amd64": digest})."""
        entries = []
        for plat, digest in manifests.items():
            os_name, arch = plat.split("/")
            _, _, body = self._request(
                "GET", f"/v2/{repo}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
            )
            entries.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": len(body),
                    "platform": {"os": os_name, "architecture": arch},
                }
            )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.push_manifest(repo, tag, index, OCI_INDEX)

    def push_oras(self, repo: str, tag: str, files: list[Path]) -> str:
        """`oras push` with the real ORAS client (anonymous registries only: oras-py mistakes a
        Basic challenge's realm for a token URL), returning the manifest digest."""
        import oras.client  # type: ignore[import-untyped]

        assert not self.users, "use push_files on a registry with auth"
        client = oras.client.OrasClient(hostname=self.host, insecure=True)
        # oras-py titles each layer with the file's base name
        client.push(
            target=f"{self.host}/{repo}:{tag}",
            files=[str(f) for f in files],
            disable_path_validation=True,
            quiet=True,
        )
        status, headers, _ = self._request(
            "HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        assert status == 200, status
        return headers["Docker-Content-Digest"]

    def push_files(self, repo: str, tag: str, files: dict[str, bytes], **annotations: dict[str, str]) -> str:
        """An ORAS-style artifact built by hand: one layer per file, titled by its name.
        `annotations` adds per-file layer annotations (keyed by file name)."""
        empty = b"{}"
        layers = []
        for name, data in files.items():
            layers.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": self.push_blob(repo, data),
                    "size": len(data),
                    "annotations": {"org.opencontainers.image.title": name, **annotations.get(name, {})},
                }
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.modelcache.test",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": self.push_blob(repo, empty),
                "size": len(empty),
            },
            "layers": layers,
        }
        return self.push_manifest(repo, tag, manifest, OCI_MANIFEST)

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to corrupt it on purpose)."""
        hexd = digest.split(":", 1)[1]
        return self.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


@dataclass(frozen=True)
class Link:
    """A tar member that is a link (symbolic unless `hard`) to `target`."""

    target: str
    hard: bool = False


Member = bytes | Link | None


def tar_bytes(files: dict[str, Member]) -> bytes:
    """An uncompressed tar of {path: bytes}; None makes a directory, paths keep their order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            elif isinstance(data, Link):
                info.type = tarfile.LNKTYPE if data.hard else tarfile.SYMTYPE
                info.linkname = data.target
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
