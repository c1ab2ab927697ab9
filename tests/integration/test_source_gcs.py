"""gs:// end to end through the CLI against gcp-storage-emulator on 127.0.0.1.

The emulator honours `Range` on media downloads, so the source reads in parallel chunks and resumes
against it just as against real GCS. It checks no credentials, so the service-account flow is
exercised against a local OAuth token endpoint named by the key file's `token_uri`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import assert_one_line_error, popen_cli, run_cli, staging_done
from tests.support.gcs_emulator import GcsEmulator

MiB = 1 << 20
BUCKET = "models"


def rand(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsEmulator]:
    with GcsEmulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


def env_for(gcs: GcsEmulator, **extra: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "GCE_METADATA_HOST": "",
        **extra,
    }


def pull(home: Path, uri: str, gcs: GcsEmulator, *args: str, **env: str) -> dict[str, Any]:
    proc = run_cli(home, "pull", uri, "--json", *args, **env_for(gcs, **env))
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def show(home: Path, key: str) -> dict[str, Any]:
    proc = run_cli(home, "show", key, "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_prefix_nested_files_and_single_object(gcs: GcsEmulator, home: Path) -> None:
    files = {
        "bert/config.json": b'{"hidden": 768}',
        "bert/weights/model.safetensors": rand(6 * MiB + 321, 1),
        "bert/tok/vocab.txt": rand(70_000, 2),
        "bert/empty.txt": b"",
        "bert/odd names/a+b ü%20.bin": rand(3000, 5),
        "bert-large/other.bin": b"a sibling prefix, not part of gs://models/bert",
    }
    for name, data in files.items():
        gcs.upload(BUCKET, name, data)
    gcs.upload(BUCKET, "bert/weights/", b"")  # a "folder" placeholder object holds no file

    res = pull(home, f"gs://{BUCKET}/bert", gcs, MODELCACHE_CHUNK_SIZE=str(MiB))
    out = Path(res["path"])
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {k.removeprefix("bert/"): v for k, v in files.items() if k.startswith("bert/")}
    rec = show(home, res["key"])
    assert rec["revision"].startswith("sha256:")
    assert rec["source"]["bucket"] == BUCKET

    # a trailing slash is another URI (another key) with the same files
    res_slash = pull(home, f"gs://{BUCKET}/bert/", gcs)
    assert res_slash["key"] != res["key"]
    assert show(home, res_slash["key"])["revision"] == rec["revision"]

    # one object: saved under its base name, revision = its generation
    single = pull(home, f"gs://{BUCKET}/bert/weights/model.safetensors", gcs, MODELCACHE_CHUNK_SIZE=str(MiB))
    assert (Path(single["path"]) / "model.safetensors").read_bytes() == files[
        "bert/weights/model.safetensors"
    ]
    generation = gcs.metadata(BUCKET, "bert/weights/model.safetensors")["generation"]
    srec = show(home, single["key"])
    assert srec["revision"] == generation
    assert srec["source"]["md5"] == hashlib.md5(files["bert/weights/model.safetensors"]).hexdigest()

    # rewriting one object changes the prefix revision
    gcs.upload(BUCKET, "bert/config.json", b'{"hidden": 1024}')
    again = pull(home, f"gs://{BUCKET}/bert", gcs, MODELCACHE_HOME=str(home.parent / "other"))
    assert show(home.parent / "other", again["key"])["revision"] != rec["revision"]


def test_single_archive_is_unpacked(gcs: GcsEmulator, home: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = rand(300_000, 3)
        info = tarfile.TarInfo("m/w.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    gcs.upload(BUCKET, "arch/model.tar.gz", buf.getvalue())
    res = pull(home, f"gs://{BUCKET}/arch/model.tar.gz", gcs)
    assert (Path(res["path"]) / "m" / "w.bin").read_bytes() == data


def test_missing_bucket_prefix_object_exit_3(gcs: GcsEmulator, home: Path) -> None:
    gcs.upload(BUCKET, "present/a.bin", b"a")
    for uri, fragment in [
        ("gs://no-such-bucket/x", "bucket not found"),
        (f"gs://{BUCKET}/absent", "no such object or prefix"),
        (f"gs://{BUCKET}/present/nope.bin", "no such object or prefix"),
        (f"gs://{BUCKET}/absent/", "no objects"),
    ]:
        line = assert_one_line_error(run_cli(home, "pull", uri, **env_for(gcs)), 3)
        assert fragment in line, (uri, line)
    # --revision pins a generation: the live one is found, another one is not
    uri = f"gs://{BUCKET}/present/a.bin"
    generation = gcs.metadata(BUCKET, "present/a.bin")["generation"]
    assert pull(home, uri, gcs, "--revision", generation)["revision"] == generation
    other = home.parent / "other"  # a fresh cache, so the pull asks the server again
    line = assert_one_line_error(run_cli(other, "pull", uri, "--revision", "1", **env_for(gcs)), 3)
    assert "generation 1 not found" in line
    # a prefix insists on the revision a previous pull reported
    revision = pull(home, f"gs://{BUCKET}/present", gcs)["revision"]
    assert pull(home, f"gs://{BUCKET}/present/", gcs, "--revision", revision)["revision"] == revision
    line = assert_one_line_error(
        run_cli(other, "pull", f"gs://{BUCKET}/present", "--revision", "sha256:0", **env_for(gcs)), 3
    )
    assert "is gone" in line


class TokenEndpoint:
    """A local OAuth token endpoint: checks the service-account JWT, then grants or refuses."""

    def __init__(self, public_key: rsa.RSAPublicKey, *, grant: bool) -> None:
        self.public_key, self.grant = public_key, grant
        self.assertions: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                form = dict(urllib.parse.parse_qsl(body.decode()))
                ok = outer._check(form)
                payload = (
                    {"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"}
                    if ok and outer.grant
                    else {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
                )
                raw = json.dumps(payload).encode()
                self.send_response(200 if ok and outer.grant else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _check(self, form: dict[str, str]) -> bool:
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return False
        head, claims, sig = form["assertion"].split(".")
        pad = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))  # noqa: E731
        self.public_key.verify(pad(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        self.assertions.append(json.loads(pad(claims)))
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _service_account(tmp_path: Path, token_uri: str) -> tuple[Path, str, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key_id": "kid1",
                "private_key": pem,
                "client_email": "loader@p.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return path, pem, key


def test_service_account_credentials(gcs: GcsEmulator, home: Path, tmp_path: Path) -> None:
    gcs.upload(BUCKET, "private/w.bin", b"w" * 1000)
    uri = f"gs://{BUCKET}/private"
    sa, pem, key = _service_account(tmp_path, "placeholder")
    secret_line = pem.splitlines()[5]  # a line of the key body

    # refused: exit 6, message names the env var, no key material
    refuse = TokenEndpoint(key.public_key(), grant=False)
    try:
        sa.write_text(sa.read_text().replace("placeholder", refuse.url))
        proc = run_cli(home, "pull", uri, **env_for(gcs, GOOGLE_APPLICATION_CREDENTIALS=str(sa)))
    finally:
        refuse.close()
    line = assert_one_line_error(proc, 6)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line and "invalid_grant" in line
    assert secret_line not in proc.stderr and "PRIVATE KEY" not in proc.stderr
    assert refuse.assertions and refuse.assertions[0]["iss"] == "loader@p.iam.gserviceaccount.com"

    # granted: the pull succeeds with a signed JWT exchanged for a token
    grant = TokenEndpoint(key.public_key(), grant=True)
    try:
        sa.write_text(sa.read_text().replace(refuse.url, grant.url))
        res = pull(home, uri, gcs, GOOGLE_APPLICATION_CREDENTIALS=str(sa))
    finally:
        grant.close()
    assert (Path(res["path"]) / "w.bin").read_bytes() == b"w" * 1000
    assert grant.assertions[0]["scope"].endswith("devstorage.read_only")

    # a key file that is not there, or not a key file
    line = assert_one_line_error(
        run_cli(home, "pull", uri + "x", **env_for(gcs, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no"))),
        6,
    )
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "service_account", "client_email": "x", "private_key": "nope"}))
    line = assert_one_line_error(
        run_cli(home, "pull", uri + "y", **env_for(gcs, GOOGLE_APPLICATION_CREDENTIALS=str(bad))), 6
    )
    assert "private_key" in line and "nope" not in line


def test_resume_after_kill_minus_9(gcs: GcsEmulator, home: Path) -> None:
    size = 24 * MiB
    data = rand(size, 7)
    gcs.upload(BUCKET, "big/model.bin", data)
    uri = f"gs://{BUCKET}/big"
    proc = popen_cli(
        home, "pull", uri, "--limit-rate", "6Mi", **env_for(gcs, MODELCACHE_CHUNK_SIZE=str(2 * MiB))
    )
    deadline = time.monotonic() + 60
    while staging_done(home) < size * 0.4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = staging_done(home)
    again = run_cli(home, "pull", uri, "--json", **env_for(gcs))
    assert again.returncode == 0, again.stderr
    res = json.loads(again.stdout)
    assert (Path(res["path"]) / "model.bin").read_bytes() == data
    assert "resuming" in again.stderr
    assert res["bytes_fetched"] <= size - done_before + 0.10 * done_before, (res, done_before)


class MetadataServer:
    """A local GCE metadata server: hands out a token to callers that send Metadata-Flavor."""

    def __init__(self, *, grant: bool) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Metadata-Flavor")))
                ok = grant and self.headers.get("Metadata-Flavor") == "Google"
                raw = json.dumps({"access_token": "ya29.md", "expires_in": 3599} if ok else {}).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_metadata_server_credentials(gcs: GcsEmulator, home: Path) -> None:
    gcs.upload(BUCKET, "wi/w.bin", b"workload identity")
    md = MetadataServer(grant=True)
    try:
        res = pull(home, f"gs://{BUCKET}/wi", gcs, GCE_METADATA_HOST=md.host)
    finally:
        md.close()
    assert (Path(res["path"]) / "w.bin").read_bytes() == b"workload identity"
    assert md.requests[0] == ("/computeMetadata/v1/instance/service-accounts/default/token", "Google")
    refusing = MetadataServer(grant=False)
    try:
        proc = run_cli(home, "pull", f"gs://{BUCKET}/wi/", **env_for(gcs, GCE_METADATA_HOST=refusing.host))
    finally:
        refusing.close()
    assert "GCE metadata server" in assert_one_line_error(proc, 6)
