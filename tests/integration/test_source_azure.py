"""Azure Blob end to end through the CLI against Azurite on 127.0.0.1.

Azurite is installed by scripts/deps/azurite.sh; without it these tests fail (never skip). Both URI
forms are exercised: az://container/prefix and KServe's https://ACCOUNT.blob.core.windows.net/...,
the latter pointed at Azurite by the connection string's BlobEndpoint for that account.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_one_line_error, popen_cli, run_cli, staging_done
from tests.support.azurite import ACCOUNT, KEY, Azurite

MiB = 1 << 20
CONTAINER = "models"
PUBLIC = "public-models"
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="


def rand(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        az.create_container(CONTAINER)
        az.create_container(PUBLIC, public=True)
        yield az


#: Ambient Azure settings of the machine running the tests must not leak in (empty = unset).
CLEAN = {
    name: ""
    for name in (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZ_CLIENT_ID",
        "AZ_CLIENT_SECRET",
        "AZ_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_AUTHORITY_HOST",
    )
}


def conn_env(az: Azurite, key: str | None = KEY) -> dict[str, str]:
    """Where the account lives (and, with `key`, its key), as a connection string."""
    text = az.connection_string(key) if key else f"AccountName={ACCOUNT};BlobEndpoint={az.endpoint}"
    return {**CLEAN, "AZURE_STORAGE_CONNECTION_STRING": text}


def pull(home: Path, uri: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = run_cli(home, "pull", uri, "--json", *args, **env)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def show(home: Path, key: str) -> dict[str, Any]:
    proc = run_cli(home, "show", key, "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_prefix_nested_and_single_blob_both_uri_forms(azurite: Azurite, home: Path) -> None:
    files = {
        "llama/config.json": b'{"layers": 2}',
        "llama/weights/model-00001.safetensors": rand(5 * MiB + 77, 1),
        "llama/tok/tokenizer.json": rand(50_000, 2),
        "llama/odd names/a+b ü%20=.bin": rand(3000, 5),
        "llama-v2/other.bin": b"a sibling prefix: not part of .../llama",
    }
    for name, data in files.items():
        azurite.upload(CONTAINER, name, data)
    azurite.upload(CONTAINER, "llama/empty.txt", b"")  # zero-byte blobs are skipped, as KServe does
    expected = {k.removeprefix("llama/"): v for k, v in files.items() if k.startswith("llama/")}

    res = pull(home, f"az://{CONTAINER}/llama", {**conn_env(azurite), "MODELCACHE_CHUNK_SIZE": str(MiB)})
    assert tree(Path(res["path"])) == expected
    rec = show(home, res["key"])
    assert rec["revision"].startswith("sha256:")
    assert rec["source"]["container"] == CONTAINER and rec["source"]["account"] == ACCOUNT

    https = f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/llama/"
    res2 = pull(home, https, conn_env(azurite))
    assert tree(Path(res2["path"])) == expected
    assert show(home, res2["key"])["revision"] == rec["revision"]

    # one blob: saved under its base name; revision = its ETag
    name = "llama/weights/model-00001.safetensors"
    single = pull(home, f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/{name}", conn_env(azurite))
    assert tree(Path(single["path"])) == {"model-00001.safetensors": files[name]}
    srec = show(home, single["key"])
    assert srec["revision"] == azurite.etag(CONTAINER, name)
    assert srec["source"]["md5"] == hashlib.md5(files[name]).hexdigest()  # Content-MD5, recorded

    # AZURE_STORAGE_ACCESS_KEY (KServe's variable) with the account from AZURE_STORAGE_ACCOUNT_NAME
    other = home.parent / "other"
    env = {**conn_env(azurite, None), "AZURE_STORAGE_ACCESS_KEY": KEY, "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT}
    res3 = pull(other, f"az://{CONTAINER}/llama/tok", env)
    assert tree(Path(res3["path"])) == {"tokenizer.json": files["llama/tok/tokenizer.json"]}

    # a rewritten blob changes the revision
    azurite.upload(CONTAINER, "llama/config.json", b'{"layers": 3}')
    res4 = pull(other, f"az://{CONTAINER}/llama", conn_env(azurite))
    assert show(other, res4["key"])["revision"] != rec["revision"]


def test_anonymous_public_container(azurite: Azurite, home: Path) -> None:
    azurite.upload(PUBLIC, "open/w.bin", b"public weights")
    azurite.upload(CONTAINER, "closed/w.bin", b"private weights")
    res = pull(home, f"az://{PUBLIC}/open", conn_env(azurite, None))
    assert tree(Path(res["path"])) == {"w.bin": b"public weights"}
    proc = run_cli(home, "pull", f"az://{CONTAINER}/closed", **conn_env(azurite, None))
    line = assert_one_line_error(proc, 6)
    assert "anonymous" in line and "AZURE_STORAGE_ACCESS_KEY" in line


def test_missing_container_and_prefix_exit_3(azurite: Azurite, home: Path) -> None:
    azurite.upload(CONTAINER, "here/a.bin", b"a")
    for uri, fragment in [
        ("az://no-such-container/x", "ContainerNotFound"),
        (f"az://{CONTAINER}/absent", "no blobs under 'absent'"),
        (f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/here/nope.bin", "no blobs"),
    ]:
        line = assert_one_line_error(run_cli(home, "pull", uri, **conn_env(azurite)), 3)
        assert fragment in line, (uri, line)
    # az:// without any account is a usage error that says what to set
    line = assert_one_line_error(run_cli(home, "pull", f"az://{CONTAINER}/here", **CLEAN), 2)
    assert "AZURE_STORAGE_ACCOUNT_NAME" in line
    # blob versions are not addressable yet, so --revision is refused rather than ignored
    proc = run_cli(home, "pull", f"az://{CONTAINER}/here", "--revision", "x", **conn_env(azurite))
    assert "--revision does not apply" in assert_one_line_error(proc, 2)


def test_wrong_credentials_exit_6_without_secrets(azurite: Azurite, home: Path) -> None:
    azurite.upload(CONTAINER, "sec/a.bin", b"a")
    uri = f"az://{CONTAINER}/sec"
    cases: list[tuple[dict[str, str], str]] = [
        (conn_env(azurite, WRONG_KEY), WRONG_KEY),
        ({**conn_env(azurite, None), "AZURE_STORAGE_ACCESS_KEY": WRONG_KEY}, WRONG_KEY),
        ({**conn_env(azurite, None), "AZURE_STORAGE_ACCESS_KEY": "not base64 !!"}, "not base64 !!"),
    ]
    for env, secret in cases:
        proc = run_cli(home, "pull", uri, **env)
        line = assert_one_line_error(proc, 6)
        assert "AZURE_STORAGE" in line
        assert secret not in proc.stderr and secret not in proc.stdout


def account_sas(key: str = KEY) -> str:
    """An account SAS (version 2019-12-12: list + read on blobs), signed as Azure documents it."""
    f = {
        "sv": "2019-12-12",
        "ss": "b",
        "srt": "co",
        "sp": "rl",
        "se": "2099-01-01T00:00:00Z",
        "spr": "https,http",
    }
    sts = "\n".join([ACCOUNT, f["sp"], f["ss"], f["srt"], "", f["se"], "", f["spr"], f["sv"], ""])
    digest = hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()
    f["sig"] = base64.b64encode(digest).decode()
    return urllib.parse.urlencode(f, quote_via=urllib.parse.quote, safe="")


def test_sas_in_uri_and_in_connection_string(azurite: Azurite, home: Path) -> None:
    data = rand(3 * MiB + 5, 4)
    azurite.upload(CONTAINER, "sas/w.bin", data)
    uri = f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/sas?{account_sas()}"
    res = pull(home, uri, {**conn_env(azurite, None), "MODELCACHE_CHUNK_SIZE": str(MiB)})
    assert tree(Path(res["path"])) == {"w.bin": data}
    # a SAS-only connection string names just the endpoint: the account comes from it
    sas_conn = f"BlobEndpoint={azurite.endpoint};SharedAccessSignature={account_sas()}"
    env = {**CLEAN, "AZURE_STORAGE_CONNECTION_STRING": sas_conn}
    res2 = pull(home, f"az://{CONTAINER}/sas", env)
    assert tree(Path(res2["path"])) == {"w.bin": data}
    # a SAS signed with the wrong key: exit 6, and its signature never printed
    bad = account_sas(WRONG_KEY)
    proc = run_cli(
        home,
        "pull",
        f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/sas/?{bad}",
        **conn_env(azurite, None),
    )
    line = assert_one_line_error(proc, 6)
    assert "SAS" in line
    sig = urllib.parse.parse_qs(bad)["sig"][0]
    assert sig not in proc.stderr and urllib.parse.quote(sig, safe="") not in proc.stderr


class TokenEndpoint:
    """A local Azure AD token endpoint that refuses every client (AZURE_AUTHORITY_HOST points here)."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.forms.append(dict(urllib.parse.parse_qsl(body.decode())))
                raw = json.dumps({"error": "invalid_client", "error_description": "AADSTS7000215"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_service_principal(azurite: Azurite, home: Path) -> None:
    secret = "sp-secret-value-that-must-not-leak"
    token = TokenEndpoint()
    try:
        env = {
            **conn_env(azurite),
            "AZ_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
            "AZ_TENANT_ID": "tenant-x",
            "AZ_CLIENT_SECRET": secret,
            "AZURE_AUTHORITY_HOST": token.url,
        }
        proc = run_cli(home, "pull", f"az://{CONTAINER}/sp", **env)
    finally:
        token.close()
    line = assert_one_line_error(proc, 6)
    assert "invalid_client" in line and "AZ_CLIENT_SECRET" in line
    assert secret not in proc.stderr and secret not in proc.stdout
    assert token.forms[0]["client_secret"] == secret
    assert token.forms[0]["scope"] == "https://storage.azure.com/.default"
    # a client id alone (managed identity) is not supported yet: said plainly
    env = {**conn_env(azurite), "AZURE_CLIENT_ID": "x", "AZURE_TENANT_ID": "t"}
    proc = run_cli(home, "pull", f"az://{CONTAINER}/sp", **env)
    assert "managed identity is not supported yet" in assert_one_line_error(proc, 2)


def test_resume_after_kill_minus_9(azurite: Azurite, home: Path) -> None:
    size = 24 * MiB
    data = rand(size, 9)
    azurite.upload(CONTAINER, "big/model.bin", data)
    uri = f"az://{CONTAINER}/big"
    env = conn_env(azurite)
    proc = popen_cli(home, "pull", uri, "--limit-rate", "6Mi", **env, MODELCACHE_CHUNK_SIZE=str(2 * MiB))
    deadline = time.monotonic() + 60
    while staging_done(home) < size * 0.4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = staging_done(home)
    again = run_cli(home, "pull", uri, "--json", **env)
    assert again.returncode == 0, again.stderr
    res = json.loads(again.stdout)
    assert (Path(res["path"]) / "model.bin").read_bytes() == data
    assert "resuming" in again.stderr
    assert res["bytes_fetched"] <= size - done_before + 0.10 * done_before, (res, done_before)


def test_blob_rewritten_mid_pull_is_refused(azurite: Azurite) -> None:
    """Reads carry If-Match: a blob replaced between listing and reading fails, never mixes versions."""
    import asyncio

    from modelcache.errors import SourceError
    from modelcache.sources import SourceOptions, open_source
    from modelcache.uri import parse_uri

    azurite.upload(CONTAINER, "swap/w.bin", b"old" * 1000)
    source = open_source(parse_uri(f"az://{CONTAINER}/swap"), SourceOptions(env=conn_env(azurite)))

    async def scenario() -> str:
        try:
            snap = await source.resolve()
            first = b"".join([b async for b in source.read(snap.files[0], 0, 3)])
            assert first == b"old"
            azurite.upload(CONTAINER, "swap/w.bin", b"new" * 1000)
            with pytest.raises(SourceError) as err:
                _ = [b async for b in source.read(snap.files[0], 3, 6)]
            return str(err.value)
        finally:
            await source.aclose()

    assert "changed during the download" in asyncio.run(scenario())
