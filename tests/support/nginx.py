"""Debian's nginx on 127.0.0.1 with our own config: an independent Range server (and the bench origin)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

CONF = """\
{user}
worker_processes 2;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log {access};
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
  uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  sendfile on; tcp_nopush on; keepalive_requests 100000; keepalive_timeout 65;
  types {{ application/octet-stream bin; application/json json; }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    {limit}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Nginx:
    """Start/stop an nginx master serving `root`; `rate` caps each connection (nginx limit_rate)."""

    def __init__(self, root: Path, work: Path, *, rate: str | None = None, access_log: bool = False) -> None:
        self.root, self.work, self.rate, self.access_log = root, work, rate, access_log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.work / "nginx.conf"
        conf.write_text(
            CONF.format(
                # as root, workers would drop to nobody and be refused the 0700 pytest tmp dirs
                user="user root;" if os.geteuid() == 0 else "",
                work=self.work,
                root=self.root,
                port=self.port,
                access=f"{self.work}/access.log" if self.access_log else "off",
                limit=f"limit_rate {self.rate};" if self.rate else "",
            )
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.work)], stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start; see {self.work}/error.log")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
