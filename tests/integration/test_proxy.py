"""HTTPS_PROXY/HTTP_PROXY/NO_PROXY through a real forward proxy on 127.0.0.1 (http and s3 sources)."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import sys
from pathlib import Path

from modelcache import certs
from modelcache.sources.transport import bypass_proxy, proxy_for, proxy_kwargs
from tests.conftest import cli_env, write_random
from tests.support.moto_server import MotoS3
from tests.support.origin import Origin
from tests.support.proxy import ForwardProxy

MiB = 1 << 20


def run_cli(home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "modelcache.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(home, **env), timeout=120)


NO_ENV_PROXY = {
    k: "" for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")
}


def test_http_pull_goes_through_the_proxy_and_no_proxy_bypasses_it(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    data = write_random(origin_root / "m.bin", 6 * MiB + 3)
    url = origin.url_for("/m.bin")
    with ForwardProxy() as proxy:
        env = {**NO_ENV_PROXY, "http_proxy": f"http://user:s3cret@127.0.0.1:{proxy.port}"}
        proc = run_cli(
            tmp_path / "a", "pull", url, "--json", env={**env, "MODELCACHE_CHUNK_SIZE": str(2 * MiB)}
        )
        assert proc.returncode == 0, proc.stderr
        assert (Path(json.loads(proc.stdout)["path"]) / "m.bin").read_bytes() == data
        through = [r for r in proxy.requests if r.target.startswith(origin.url_for("/"))]
        assert len(through) >= 3  # the HEAD and several ranged GETs
        assert {r.proxy_authorization for r in through} == {"Basic dXNlcjpzM2NyZXQ="}
        assert "s3cret" not in proc.stderr

        proxy.requests.clear()
        env = {**NO_ENV_PROXY, "HTTP_PROXY": proxy.url, "NO_PROXY": "example.com, 127.0.0.0/8"}
        proc = run_cli(tmp_path / "b", "pull", url, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert proxy.requests == []


def test_s3_through_the_proxy(tmp_path: Path) -> None:
    """obstore's GETs and our own checksum HEADs (stdlib http.client) both take the proxy, with its
    credentials; the published sha256 still arrives through it (the bytes are checked against it)."""
    body = write_random(tmp_path / "src.bin", 3 * MiB + 11)
    with MotoS3() as moto, ForwardProxy() as proxy:
        moto.client("s3").create_bucket(Bucket="models")
        moto.client("s3").put_object(
            Bucket="models",
            Key="m/w.bin",
            Body=body,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
        )
        env = {
            **NO_ENV_PROXY,
            "AWS_ACCESS_KEY_ID": "setup",
            "AWS_SECRET_ACCESS_KEY": "setup",
            "AWS_ENDPOINT_URL": moto.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "HTTP_PROXY": proxy.url.replace("http://", "http://pxuser:pxs3cret@"),
        }
        proc = run_cli(tmp_path / "h", "pull", "s3://models/m/", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        got = (Path(out["path"]) / "w.bin").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
        assert "pxs3cret" not in proc.stderr
        through = [r for r in proxy.requests if r.target.startswith(moto.endpoint)]
        assert {r.method for r in through} >= {"GET", "HEAD"}
        assert all(r.proxy_authorization for r in through)
        show = run_cli(tmp_path / "h", "show", out["key"], "--json", env=env)
        assert json.loads(show.stdout)["source"]["source_checksum"] == "all"

        proxy.requests.clear()
        proc = run_cli(
            tmp_path / "h2", "pull", "s3://models/m/", "--json", env={**env, "NO_PROXY": "127.0.0.1"}
        )
        assert proc.returncode == 0, proc.stderr
        assert proxy.requests == []


def test_s3_over_https_ca_bundle_verify_off_and_connect_proxy(tmp_path: Path) -> None:
    """An https endpoint with a private CA: AWS_CA_BUNDLE (or S3_VERIFY_SSL=0) lets both obstore and
    the checksum HEADs in, through a CONNECT tunnel when HTTPS_PROXY is set; without either the pull
    fails on the certificate. `source_checksum == "all"` shows the HEADs got through each time."""
    ca = certs.make_ca("s3-test-ca")
    certs.issue(ca, "127.0.0.1", hosts=["127.0.0.1"], server=True).write(
        tmp_path / "tls.crt", tmp_path / "tls.key"
    )
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    body = write_random(tmp_path / "src.bin", 2 * MiB + 5)
    with MotoS3(tls=server_tls) as moto, ForwardProxy() as proxy:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="models")
        b64 = base64.b64encode(hashlib.sha256(body).digest()).decode()
        s3.put_object(
            Bucket="models", Key="m/w.bin", Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=b64
        )
        base = {
            **NO_ENV_PROXY,
            "AWS_ACCESS_KEY_ID": "setup",
            "AWS_SECRET_ACCESS_KEY": "setup",
            "AWS_ENDPOINT_URL": moto.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        cases = {
            "bundle": {"AWS_CA_BUNDLE": str(tmp_path / "ca.pem")},
            "verify-off": {"S3_VERIFY_SSL": "0"},
            "bundle+proxy": {"AWS_CA_BUNDLE": str(tmp_path / "ca.pem"), "HTTPS_PROXY": proxy.url},
        }
        for name, extra in cases.items():
            home = tmp_path / name
            proc = run_cli(home, "pull", "s3://models/m/", "--json", env={**base, **extra})
            assert proc.returncode == 0, (name, proc.stderr)
            out = json.loads(proc.stdout)
            assert (Path(out["path"]) / "w.bin").read_bytes() == body
            show = run_cli(home, "show", out["key"], "--json", env=base)
            assert json.loads(show.stdout)["source"]["source_checksum"] == "all", name
        assert {(r.method, r.target) for r in proxy.requests} == {
            ("CONNECT", moto.endpoint.removeprefix("https://"))
        }

        proc = run_cli(tmp_path / "untrusted", "pull", "s3://models/m/", "--json", env=base)
        assert proc.returncode != 0
        assert "certificate" in proc.stderr and "Traceback" not in proc.stderr


def test_no_proxy_rules() -> None:
    assert bypass_proxy("a.example.com", 443, "example.com")
    assert bypass_proxy("example.com", 443, ".example.com")
    assert not bypass_proxy("badexample.com", 443, "example.com")
    assert bypass_proxy("10.1.2.3", 80, "10.0.0.0/8")
    assert not bypass_proxy("11.1.2.3", 80, "10.0.0.0/8")
    assert bypass_proxy("::1", 80, "[::1]:80")
    assert not bypass_proxy("host", 80, "host:8080")
    assert bypass_proxy("anything", 1, " * ")
    env = {"HTTPS_PROXY": "http://p:3128", "https_proxy": "http://lower:3128", "NO_PROXY": "internal"}
    assert proxy_for("https://hub.example/x", env) == "http://lower:3128"  # lower case wins, as curl
    assert proxy_for("http://hub.example/x", env) is None  # no HTTP_PROXY for http
    assert proxy_for("https://internal/x", env) is None
    kw = proxy_kwargs("https://h/x", {"HTTPS_PROXY": "u:p%40ss@p:1"})
    assert kw["proxy"] == "http://p:1" and kw["proxy_auth"].encode() == "Basic dTpwQHNz"
