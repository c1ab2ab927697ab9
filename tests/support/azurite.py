"""Azurite (Microsoft's Azure Storage emulator, npm) on 127.0.0.1, plus a tiny Blob REST client.

`scripts/deps/azurite.sh` installs it into ${MODELCACHE_NPM_DIR:-~/.cache/modelcache/npm}; when it
is missing the fixture fails loudly (a silent skip would hide that Azure is untested). Uploads are
signed here with Shared Key independently of the source under test, so a signing bug in one
cannot hide a bug in the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

HOST = "127.0.0.1"
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> Path:
    npm_dir = Path(os.environ.get("MODELCACHE_NPM_DIR", Path.home() / ".cache" / "modelcache" / "npm"))
    candidate = npm_dir / "node_modules" / ".bin" / "azurite-blob"
    if candidate.exists():
        return candidate
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    raise RuntimeError(
        f"azurite-blob not found in {candidate.parent} or PATH: run scripts/deps/azurite.sh first"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Azurite:
    def __init__(self, location: Path) -> None:
        self.location = location
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}/{ACCOUNT}"

    def connection_string(self, key: str = KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self) -> None:
        binary = azurite_binary()
        self.location.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--blobHost",
                HOST,
                "--blobPort",
                str(self.port),
                "--location",
                str(self.location),
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"azurite-blob exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("azurite-blob did not start within 60 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- Blob REST helpers (Shared Key) ----------------------------------------------------------
    def _put(self, path: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> None:
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-12-02", **headers}
        url_path = f"/{ACCOUNT}{path}"
        ms = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in headers.items()))
        resource = f"/{ACCOUNT}{url_path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
        ctype = "application/octet-stream"  # urllib would add a form content type otherwise
        to_sign = "\n".join(
            ["PUT", "", "", str(len(body)) if body else "", "", ctype, "", "", "", "", "", ""]
        )
        to_sign += "\n" + ms + resource
        sig = base64.b64encode(
            hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
        ).decode()
        qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        req = urllib.request.Request(
            f"http://{HOST}:{self.port}{url_path}{'?' + qs if qs else ''}", data=body, method="PUT"
        )
        for k, v in headers.items():
            req.add_header(k, v)
        if ctype:
            req.add_header("Content-Type", ctype)
        req.add_header("Content-Length", str(len(body)))
        req.add_header("Authorization", f"SharedKey {ACCOUNT}:{sig}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()

    def create_container(self, name: str, *, public: bool = False) -> None:
        extra = {"x-ms-blob-public-access": "container"} if public else {}
        try:
            self._put(f"/{name}", {"restype": "container"}, b"", extra)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there
                raise

    def upload(self, container: str, name: str, data: bytes) -> None:
        self._put(f"/{container}/{quote(name, safe='/~')}", {}, data, {"x-ms-blob-type": "BlockBlob"})

    def etag(self, container: str, name: str) -> str:
        """The blob's ETag (Get Blob Properties is allowed anonymously on public containers only,
        so ask through a listing signed the same way is overkill: use HEAD with Shared Key)."""
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-12-02"}
        url_path = f"/{ACCOUNT}/{container}/{quote(name, safe='/~')}"
        ms = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        to_sign = "\n".join(["HEAD"] + [""] * 11) + "\n" + ms + f"/{ACCOUNT}{url_path}"
        sig = base64.b64encode(
            hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
        ).decode()
        req = urllib.request.Request(f"http://{HOST}:{self.port}{url_path}", method="HEAD")
        for k, v in headers.items():
            req.add_header(k, v)
        req.add_header("Authorization", f"SharedKey {ACCOUNT}:{sig}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(resp.headers["ETag"])
