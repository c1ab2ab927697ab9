"""gcp-storage-emulator (pip) on 127.0.0.1 as a subprocess, plus a tiny JSON API client for fixtures.

A subprocess (not the in-process Python API) because the emulator is a single-threaded
http.server: in the pytest process it would compete for the GIL with the test itself.
Uploads use the JSON API's simple media upload, so no google-cloud-storage is needed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class GcsEmulator:
    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What STORAGE_EMULATOR_HOST should be."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "gcp_storage_emulator"]
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*cmd, "start", "--host", HOST, "--port", str(self.port), "--in-memory", "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gcp-storage-emulator did not start within 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- JSON API helpers ------------------------------------------------------------------
    def _call(self, method: str, path: str, body: bytes | None = None, ctype: str = "") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def create_bucket(self, name: str) -> None:
        try:
            self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there
                raise

    def upload(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        """Multipart upload (the emulator drops simple media uploads of empty bodies); returns the
        object resource with its generation."""
        boundary = "modelcache-test-boundary"
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps({'name': name})}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        path = f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=multipart"
        result: dict[str, Any] = self._call("POST", path, body, f"multipart/related; boundary={boundary}")
        return result

    def metadata(self, bucket: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        )
        return result
