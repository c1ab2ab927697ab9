"""moto's S3 on 127.0.0.1 in a thread, wrapped to count the object bytes it serves and to throttle them.

Counting and throttling happen in a WSGI middleware in front of moto's own app, so tests measure what
the server really sent (resume refetch) and can slow a pull down enough to kill it mid-way.
`enforce_auth()` switches on moto's IAM checks (its INITIAL_NO_AUTH_ACTION_COUNT mechanism), so wrong
keys are refused the way AWS refuses them.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from tests.support.nginx import free_port

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

PIECE = 256 * 1024


class _Meter:
    """WSGI middleware: per-object byte counts of GET bodies, and an optional per-response rate cap."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.rate: float | None = None  # bytes/s per response
        self.lock = threading.Lock()
        self.sent: dict[str, int] = defaultdict(int)
        self.gets: list[tuple[str, str]] = []  # (path, Range header)
        self.active = 0  # GET bodies being sent right now

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = unquote(environ.get("PATH_INFO", ""))
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or path.startswith("/moto-api")
            or environ.get("QUERY_STRING")
        ):
            return self.app(environ, start_response)
        with self.lock:
            self.gets.append((path, environ.get("HTTP_RANGE", "")))
        return self._metered(path, self.app(environ, start_response))

    def _metered(self, path: str, body: Iterable[bytes]) -> Iterator[bytes]:
        with self.lock:
            self.active += 1
        try:
            for block in body:
                for i in range(0, len(block), PIECE):
                    piece = block[i : i + PIECE]
                    if self.rate:
                        time.sleep(len(piece) / self.rate)
                    with self.lock:
                        self.sent[path] += len(piece)
                    yield piece
        finally:
            with self.lock:
                self.active -= 1
            close = getattr(body, "close", None)
            if close is not None:
                close()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class MotoS3:
    """A moto server for S3 (and IAM, for auth) on 127.0.0.1:<free port>."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # a server context: the endpoint is https
        self.port = 0
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.meter: _Meter | None = None
        self._auth = False  # moto's auth switch is process-wide: stop() turns it off again

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.meter = _Meter(DomainDispatcherApplication(create_backend_app))
        self.port = free_port()
        self._server = make_server(
            "127.0.0.1",
            self.port,
            self.meter,
            threaded=True,
            request_handler=_QuietHandler,
            ssl_context=self.tls,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            if self._auth:
                self.enforce_auth(False)  # or every later MotoS3 in this process starts locked
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- clients and fixtures ------------------------------------------------------------------
    def client(self, service: str, key: str = "setup", secret: str = "setup") -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            verify=False if self.tls else None,  # the test's own CA: setup only, never the code under test
        )

    def create_user(self, name: str = "puller") -> tuple[str, str]:
        """An IAM user allowed everything on S3; returns (access key id, secret access key)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName=name, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce_auth(self, on: bool = True) -> None:
        """From now on every request must be signed by a known IAM key with the right secret (or,
        with on=False, anything goes again). moto keeps this switch process-wide."""
        import urllib.request

        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
        self._auth = on

    # -- measurements --------------------------------------------------------------------------
    def bytes_sent(self, bucket: str, key: str) -> int:
        assert self.meter is not None
        with self.meter.lock:
            return self.meter.sent.get(f"/{bucket}/{key}", 0)

    def reset_stats(self) -> None:
        assert self.meter is not None
        with self.meter.lock:
            self.meter.sent.clear()
            self.meter.gets.clear()

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no object body is being sent (a killed client's responses notice the broken pipe)."""
        assert self.meter is not None
        deadline = time.monotonic() + timeout
        while self.meter.active and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_rate(self, rate: float | None) -> None:
        assert self.meter is not None
        self.meter.rate = rate
