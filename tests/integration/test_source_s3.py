"""s3:// through the CLI against moto on 127.0.0.1 with IAM auth enforced: KServe's prefix/exact-key
semantics, KServe's endpoint env forms, revisions from ETags, error exit codes, resume after kill -9."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, cli_env, popen_cli, run_cli, staging_done
from tests.support.moto_server import MotoS3

MiB = 1 << 20
BUCKET = "models"
BIG_KEY = "big/huge.bin"
BIG_SIZE = 64 * MiB + 4321


def _rand(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@dataclass
class World:
    moto: MotoS3
    key_id: str
    secret: str
    objects: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.moto.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SESSION_TOKEN": "",
            "AWS_PROFILE": "",
        }
        base.update(extra)
        return base


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

    with MotoS3() as moto:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        objects = {
            "llama/config.json": b'{"model_type": "llama"}\n',
            "llama/weights/model-00001-of-00002.safetensors": _rand(9 * MiB + 17, 1),  # multipart
            "llama/weights/model-00002-of-00002.safetensors": _rand(3 * MiB + 5, 2),
            "llama/tokenizer/tokenizer.json": _rand(70_000, 3),
            "llama-v2/other.bin": _rand(1000, 4),  # a sibling that only the slash-less prefix takes
            "single/model.bin": _rand(1 * MiB + 7, 5),
            "single/model.bin.extra": _rand(100, 6),  # exact key wins over longer keys
            BIG_KEY: _rand(BIG_SIZE, 7),
        }
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            inner = _rand(5000, 8)
            info = tarfile.TarInfo("packed/weights.bin")
            info.size = len(inner)
            tf.addfile(info, io.BytesIO(inner))
        objects["archives/model.tar.gz"] = buf.getvalue()
        multipart = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=5 * MiB)
        for key, data in objects.items():
            s3.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=multipart)
        for key, body, checksum in [
            ("sums/good.bin", _rand(300_000, 9), None),
            ("sums/bad.bin", _rand(300_000, 10), hashlib.sha256(b"something else").digest()),
        ]:
            objects[key] = body
            b64 = base64.b64encode(checksum or hashlib.sha256(body).digest()).decode()
            s3.put_object(  # single part: the checksum is of the full object
                Bucket=BUCKET, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=b64
            )
        s3.put_object(Bucket=BUCKET, Key="llama/", Body=b"")  # folder marker: skipped
        s3.put_object(Bucket=BUCKET, Key="llama/empty.txt", Body=b"")  # empty: KServe skips it
        etags = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
        assert "-" in etags["llama/weights/model-00001-of-00002.safetensors"]  # really multipart
        key_id, secret = moto.create_user()
        moto.enforce_auth()
        yield World(moto, key_id, secret, objects, etags)


def _pull(home: Path, uri: str, env: dict[str, str], *args: str) -> dict[str, object]:
    proc = run_cli(home, "pull", uri, "--json", *args, **env)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _show(home: Path, key: object) -> dict[str, object]:
    proc = run_cli(home, "show", str(key), "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def _expected_revision(world: World, keys: list[str]) -> str:
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(f"{k}\t{len(world.objects[k])}\t{world.etags[k]}\n".encode())
    return "sha256:" + h.hexdigest()


def test_a_listing_past_the_file_cap_is_exit_6(home: Path, world: World) -> None:
    proc = run_cli(home, "pull", f"s3://{BUCKET}/llama/", **world.env(MODELCACHE_MAX_FILES="2"))
    assert proc.returncode == 6 and "more than 2 files" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_prefix_with_slash_is_a_directory(home: Path, world: World) -> None:
    res = _pull(home, f"s3://{BUCKET}/llama/", world.env())
    want = {k.removeprefix("llama/"): v for k, v in world.objects.items() if k.startswith("llama/")}
    assert _tree(Path(str(res["path"]))) == want  # nested dirs kept; marker and empty object skipped
    show = _show(home, res["key"])
    assert show["revision"] == _expected_revision(world, [f"llama/{k}" for k in want])  # ETags in it
    assert show["source"] == {
        "scheme": "s3",
        "bucket": BUCKET,
        "prefix": "llama/",
        "endpoint": world.moto.endpoint,
        "source_checksum": "none",  # uploaded without x-amz-checksum-sha256: our own sha256 only
    }
    again = run_cli(home, "pull", f"s3://{BUCKET}/llama/", "--json", **world.env())
    assert json.loads(again.stdout)["hit"] is True


def test_prefix_without_slash_matches_raw_key_prefix_like_kserve(home: Path, world: World) -> None:
    res = _pull(home, f"s3://{BUCKET}/llama", world.env(), "--include", "*.json", "--include", "-v2/*")
    assert _tree(Path(str(res["path"]))) == {
        "config.json": world.objects["llama/config.json"],
        "tokenizer/tokenizer.json": world.objects["llama/tokenizer/tokenizer.json"],
        "-v2/other.bin": world.objects["llama-v2/other.bin"],  # KServe: key minus prefix, "/" stripped
    }


def test_exact_key_keeps_basename_via_kserve_s3_endpoint_form(home: Path, world: World) -> None:
    host = world.moto.endpoint.removeprefix("http://")
    env = world.env(AWS_ENDPOINT_URL="", S3_ENDPOINT=host, S3_USE_HTTPS="0")
    res = _pull(home, f"s3://{BUCKET}/single/model.bin", env)
    assert _tree(Path(str(res["path"]))) == {"model.bin": world.objects["single/model.bin"]}
    assert _show(home, res["key"])["revision"] == world.etags["single/model.bin"].strip('"')


def test_lone_archive_is_unpacked(home: Path, world: World) -> None:
    res = _pull(home, f"s3://{BUCKET}/archives/model.tar.gz", world.env())
    files = _tree(Path(str(res["path"])))
    assert list(files) == ["packed/weights.bin"] and len(files["packed/weights.bin"]) == 5000


def test_published_full_object_sha256_is_checked(home: Path, world: World) -> None:
    good = _pull(home, f"s3://{BUCKET}/sums/good.bin", world.env())
    assert _tree(Path(str(good["path"]))) == {"good.bin": world.objects["sums/good.bin"]}
    # moto keeps whatever checksum the uploader claimed: a wrong one must fail the pull (exit 4)
    bad = run_cli(home, "pull", f"s3://{BUCKET}/sums/bad.bin", **world.env())
    assert_one_line_error(bad, 4)


@pytest.mark.parametrize("uri", [f"s3://no-such-bucket-{BUCKET}/llama/", f"s3://{BUCKET}/nothing/here/"])
def test_missing_bucket_or_prefix_is_exit_3(home: Path, world: World, uri: str) -> None:
    line = assert_one_line_error(run_cli(home, "pull", uri, **world.env()), 3)
    assert uri in line


@pytest.mark.parametrize("bad", ["secret", "key_id", "missing_secret"])
def test_wrong_credentials_are_exit_6_without_the_secret(home: Path, world: World, bad: str) -> None:
    wrong = "wrongSecretValue/DoNotLeak+1234567890abcdef"
    env = {
        "secret": world.env(AWS_SECRET_ACCESS_KEY=wrong),
        "key_id": world.env(AWS_ACCESS_KEY_ID="AKIANOTAREALKEY00000", AWS_SECRET_ACCESS_KEY=wrong),
        "missing_secret": world.env(AWS_SECRET_ACCESS_KEY=""),
    }[bad]
    proc = run_cli(home, "pull", f"s3://{BUCKET}/llama/", **env)
    line = assert_one_line_error(proc, 6)
    assert "AWS_SECRET_ACCESS_KEY" in line
    assert wrong not in proc.stderr + proc.stdout
    assert world.secret not in proc.stderr + proc.stdout


def test_resume_after_kill_minus_9_refetches_little(home: Path, world: World) -> None:
    moto = world.moto
    uri = f"s3://{BUCKET}/{BIG_KEY}"
    moto.set_rate(2 * MiB)  # per response: 8 connections ~16 MiB/s, so 30% takes a second or two
    try:
        proc = popen_cli(
            home, "pull", uri, MODELCACHE_CONNECTIONS="8", MODELCACHE_CHUNK_SIZE=str(4 * MiB), **world.env()
        )
        deadline = time.monotonic() + 60
        while staging_done(home) < BIG_SIZE * 0.3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        moto.set_rate(None)
    done_before = staging_done(home)
    assert done_before < BIG_SIZE
    moto.wait_idle()  # the killed pull's responses have stopped: count only the resumed one
    moto.reset_stats()
    again = run_cli(home, "pull", uri, "--json", **world.env())
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    fetched = moto.bytes_sent(BUCKET, BIG_KEY)
    assert (Path(json.loads(again.stdout)["path"]) / "huge.bin").read_bytes() == world.objects[BIG_KEY]
    refetched = fetched - (BIG_SIZE - done_before)
    assert refetched <= 0.10 * done_before, (fetched, done_before)


def test_anonymous_credential_sends_unsigned_requests(home: Path, world: World) -> None:
    moto = world.moto
    moto.enforce_auth(False)  # moto cannot model a public-read bucket: let anything in for a moment
    try:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="public")
        body = _rand(200_000, 11)
        s3.put_object(Bucket="public", Key="m/w.bin", Body=body, ACL="public-read")
        env = world.env(awsAnonymousCredential="true", AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
        res = _pull(home, "s3://public/m/", env)
    finally:
        moto.enforce_auth()
    assert _tree(Path(str(res["path"]))) == {"w.bin": body}  # (moto answers 500 to unsigned
    # requests while auth is on, so "anonymous but refused" cannot be shown here)


def test_no_credentials_at_all_is_exit_6(home: Path, world: World) -> None:
    from tests.support.nginx import free_port

    # No keys anywhere: the AWS default chain asks instance metadata, here a closed port on 127.0.0.1.
    env = cli_env(home, **world.env(AWS_METADATA_ENDPOINT=f"http://127.0.0.1:{free_port()}"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(name)
    proc = subprocess.run(
        [sys.executable, "-m", "modelcache.cli.main", "pull", f"s3://{BUCKET}/llama/"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    line = assert_one_line_error(proc, 6)
    assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_unreachable_endpoint_is_exit_6(home: Path, world: World) -> None:
    from tests.support.nginx import free_port

    env = world.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    line = assert_one_line_error(run_cli(home, "pull", f"s3://{BUCKET}/llama/", **env), 6)
    assert "cannot connect" in line


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({"AWS_ENDPOINT_URL": "http://minio:9000/"}, "http://minio:9000"),
        ({"S3_ENDPOINT": "minio:9000", "S3_USE_HTTPS": "0"}, "http://minio:9000"),
        ({"S3_ENDPOINT": "minio:9000"}, "https://minio:9000"),  # KServe: https unless "0"
        ({"S3_ENDPOINT": "http://minio:9000", "S3_USE_HTTPS": "1"}, "http://minio:9000"),  # scheme wins
        ({"AWS_ENDPOINT_URL": "https://a:1", "S3_ENDPOINT": "b:2"}, "https://a:1"),
        ({"AWS_ENDPOINT_URL": "https://s3.amazonaws.com"}, None),  # global AWS: regional addressing
        ({}, None),
    ],
)
def test_endpoint_env_forms(env: dict[str, str], endpoint: str | None) -> None:
    from modelcache.sources.base import SourceOptions
    from modelcache.sources.s3 import S3Source
    from modelcache.uri import parse_uri

    assert S3Source(parse_uri("s3://b/p"), SourceOptions(env=env)).endpoint() == endpoint
