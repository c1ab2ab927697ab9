"""oci:// end to end through the CLI against Debian's docker-registry on 127.0.0.1.

ORAS artifacts (one file per titled layer) and modelcar images (tar layers, `/models` kept, whiteouts
applied), by tag and by digest, with auth, corruption and kill -9 resume.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcache.errors import UsageError
from modelcache.sources.oci import DOCKER_HUB, host_arch, parse_reference
from tests.conftest import assert_one_line_error, popen_cli, run_cli, staging_done, write_random
from tests.support.registry import Link, Registry, available, tar_bytes

MiB = 1 << 20

needs_registry = pytest.mark.skipif(
    not available(), reason="needs /usr/bin/docker-registry: run scripts/deps/docker-registry.sh"
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not available():
        pytest.skip("needs /usr/bin/docker-registry: run scripts/deps/docker-registry.sh")
    with Registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="module")
def artifact(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """An ORAS artifact of three files, pushed once for the module: (manifest digest, files)."""
    src = tmp_path_factory.mktemp("artifact")
    files = {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors": write_random(src / "model.safetensors", 3 * MiB + 17, seed=3),
        "tokenizer.json": b'{"vocab": {}}',
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    digest = registry.push_oras("models/tiny", "v1", [src / n for n in files])
    return digest, files


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pull_json(home: Path, uri: str, *args: str, **env: str) -> dict[str, object]:
    proc = run_cli(home, "pull", uri, "--json", *args, **env)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_oras_artifact_by_tag_and_by_digest(
    home: Path, registry: Registry, artifact: tuple[str, dict[str, bytes]]
) -> None:
    digest, files = artifact
    by_tag = pull_json(home, registry.uri("models/tiny", "v1"))
    assert tree(Path(str(by_tag["path"]))) == files
    assert by_tag["revision"] == digest
    show = json.loads(run_cli(home, "show", str(by_tag["key"]), "--json").stdout)
    shas = {f["path"]: f["sha256"] for f in show["files"]}
    assert shas == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}

    by_digest = pull_json(home, registry.uri("models/tiny", digest))
    assert by_digest["key"] != by_tag["key"]  # another URI string, another key (KServe's rule)
    assert tree(Path(str(by_digest["path"]))) == files
    listing = {m["uri"]: m for m in json.loads(run_cli(home, "list", "--json").stdout)}
    assert listing[registry.uri("models/tiny", digest)]["revision"] == digest

    only = pull_json(home / "b", registry.uri("models/tiny", "v1"), "--include", "*.json")
    assert set(tree(Path(str(only["path"])))) == {"config.json", "tokenizer.json"}


def test_modelcar_image_keeps_models_and_applies_whiteouts(home: Path, registry: Registry) -> None:
    weights = write_random(home.parent / "w.bin", 2 * MiB + 5, seed=7)
    base = {  # a base image's filesystem, and a model that a later layer deletes
        "bin/": None,
        "bin/sh": b"#!not really a shell",
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
        "models/": None,
        "models/old.bin": b"stale",
        "models/sub/": None,
        "models/sub/lower.txt": b"hidden by an opaque whiteout",
    }
    top = {
        "models/": None,
        "models/config.json": b'{"arch": "tiny"}',
        "models/weights.bin": weights,
        "models/.wh.old.bin": b"",
        "models/sub/.wh..wh..opq": b"",
        "models/sub/upper.txt": b"kept",
        "models/latest.bin": Link("weights.bin"),  # symbolic links become copies of their target
        "models/abs.json": Link("/models/config.json"),
        "models/hard.bin": Link("models/weights.bin", hard=True),
    }
    mine, _ = registry.push_modelcar("modelcars/tiny", "amd", [base, top], arch=host_arch())
    other, _ = registry.push_modelcar("modelcars/tiny", "other", [{"models/wrong.bin": b"x"}], arch="s390x")
    index = registry.push_index("modelcars/tiny", "1.0", {f"linux/{host_arch()}": mine, "linux/s390x": other})

    out = pull_json(home, registry.uri("modelcars/tiny", "1.0"))
    assert tree(Path(str(out["path"]))) == {
        "config.json": b'{"arch": "tiny"}',
        "weights.bin": weights,
        "sub/upper.txt": b"kept",
        "latest.bin": weights,
        "abs.json": b'{"arch": "tiny"}',
        "hard.bin": weights,
    }
    assert out["revision"] == index
    show = json.loads(run_cli(home, "show", str(out["key"]), "--json").stdout)
    assert show["files"] and all(len(f["sha256"]) == 64 for f in show["files"])
    assert run_cli(home, "verify", "--full").returncode == 0
    assert not list((home / ".modelcache" / "staging").iterdir())

    # Docker's own manifest and layer media types (what `docker push` of a modelcar produces)
    pushed, _ = registry.push_modelcar("modelcars/docker", "1", [{"models/a.txt": b"a"}], docker=True)
    out = pull_json(home, registry.uri("modelcars/docker", "1"))
    assert tree(Path(str(out["path"]))) == {"a.txt": b"a"} and out["revision"] == pushed

    # an image without /models is not a modelcar: say what it holds instead
    registry.push_modelcar("modelcars/empty", "1", [{"app/main.py": b"print()"}], arch=host_arch())
    line = assert_one_line_error(run_cli(home, "pull", registry.uri("modelcars/empty", "1")), 3)
    assert "/models" in line and "app" in line

    # a link out of /models is refused, as KServe's initializer (tarfile filter="data") does
    registry.push_modelcar("modelcars/evil", "1", [{"models/x": Link("/etc/passwd")}], arch=host_arch())
    line = assert_one_line_error(run_cli(home, "pull", registry.uri("modelcars/evil", "1")), 4)
    assert "outside /models" in line


def test_oras_directory_layer_is_unpacked(home: Path, registry: Registry) -> None:
    """`oras push dir/` stores the directory as a titled tar.gz marked io.deis.oras.content.unpack."""
    packed = gzip.compress(tar_bytes({"tok/": None, "tok/vocab.json": b"{}", "tok/sub/merges.txt": b"a b"}))
    registry.push_files(
        "models/withdir",
        "v1",
        {"tok": packed, "model.bin": b"weights"},
        tok={"io.deis.oras.content.unpack": "true"},
    )
    out = pull_json(home, registry.uri("models/withdir", "v1"))
    assert tree(Path(str(out["path"]))) == {
        "tok/vocab.json": b"{}",
        "tok/sub/merges.txt": b"a b",
        "model.bin": b"weights",
    }


def test_reference_parsing() -> None:
    env: dict[str, str] = {}
    r = parse_reference("127.0.0.1:5000", "/team/llama:v1", env)
    assert (r.registry, r.repo, r.ref, r.plain_http) == ("127.0.0.1:5000", "team/llama", "v1", True)
    assert r.base == "http://127.0.0.1:5000/v2/team/llama"
    digest = "sha256:" + "a" * 64
    r = parse_reference("ghcr.io", f"/org/model@{digest}", env)
    assert (r.repo, r.ref, r.plain_http) == ("org/model", digest, False)
    assert parse_reference("ghcr.io", "/org/model", env).ref == "latest"
    assert parse_reference("ghcr.io", "/org/model", env, revision="v2").ref == "v2"
    assert parse_reference("quay.io", "/a/b", {"OCI_INSECURE": "1"}).plain_http
    assert parse_reference("quay.io", "/a/b", {"KSERVE_OCI_INSECURE_REGISTRY": "true"}).plain_http
    hub = parse_reference("docker.io", "/ubuntu:22.04", env)
    assert (hub.registry, hub.repo, hub.ref) == (DOCKER_HUB, "library/ubuntu", "22.04")
    assert parse_reference("kserve", "/modelcar:1", env).repo == "kserve/modelcar"
    for host, path in [
        ("ghcr.io", "/Org/Model"),
        ("ghcr.io", "/a@sha256:zz"),
        ("ghcr.io", "/a:bad!tag"),
        ("ghcr.io", "/"),
    ]:
        with pytest.raises(UsageError):
            parse_reference(host, path, env)
    with pytest.raises(UsageError):
        parse_reference("ghcr.io", "/a:v1", env, revision="v2")


def test_missing_repo_tag_and_digest_exit_3(
    home: Path, registry: Registry, artifact: tuple[str, dict[str, bytes]]
) -> None:
    for uri in (
        registry.uri("no/such-repo", "v1"),
        registry.uri("models/tiny", "no-such-tag"),
        registry.uri("models/tiny", "sha256:" + "0" * 64),
    ):
        line = assert_one_line_error(run_cli(home, "pull", uri), 3)
        assert "not found" in line or "no such" in line, line
    assert "malformed" in assert_one_line_error(run_cli(home, "pull", f"oci://{registry.host}/Bad_Repo:x"), 2)


@needs_registry
@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_credentials(home: Path, tmp_path: Path, auth: str) -> None:
    secret = "s3cret-Pa55word-xyz"
    with Registry(tmp_path / "reg", users={"alice": secret}, auth=auth) as reg:
        reg.push_files("private/model", "v1", {"model.bin": b"private weights"})
        uri = reg.uri("private/model", "v1")

        wrong = run_cli(home, "pull", uri, OCI_USERNAME="alice", OCI_PASSWORD="not-" + secret)
        line = assert_one_line_error(wrong, 6)
        assert "OCI_USERNAME" in line and secret not in wrong.stderr and "not-" + secret not in wrong.stderr

        anonymous = run_cli(home, "pull", uri, HOME=str(tmp_path), DOCKER_CONFIG=str(tmp_path / "none"))
        assert "credentials" in assert_one_line_error(anonymous, 6)

        ok = pull_json(home, uri, OCI_USERNAME="alice", OCI_PASSWORD=secret)
        assert tree(Path(str(ok["path"]))) == {"model.bin": b"private weights"}
        if reg.tokens is not None:  # really went through the Bearer challenge -> token flow
            assert "alice" in reg.tokens.subjects

        # a docker config.json works too (what `docker login` / KServe's pull secret provide)
        cfg = tmp_path / "docker"
        cfg.mkdir()
        auth = base64.b64encode(f"alice:{secret}".encode()).decode()
        (cfg / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        ok2 = pull_json(home / "other", uri, DOCKER_CONFIG=str(cfg))
        assert ok2["revision"] == ok["revision"]


def test_corrupt_layer_is_an_integrity_error(home: Path, registry: Registry, tmp_path: Path) -> None:
    data = write_random(tmp_path / "w.bin", MiB, seed=11)
    registry.push_oras("models/corrupt", "v1", [tmp_path / "w.bin"])
    blob = registry.blob_path("sha256:" + hashlib.sha256(data).hexdigest())
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF  # same size, one flipped byte: only the digest can tell
    blob.write_bytes(bytes(flipped))
    proc = run_cli(home, "pull", registry.uri("models/corrupt", "v1"))
    assert "sha256" in assert_one_line_error(proc, 4)
    assert run_cli(home, "path", registry.uri("models/corrupt", "v1")).returncode == 3


def test_resume_after_kill_minus_9(home: Path, registry: Registry, tmp_path: Path) -> None:
    size = 64 * MiB
    data = write_random(tmp_path / "big.bin", size, seed=5)
    digest = registry.push_oras("models/big", "v1", [tmp_path / "big.bin"])
    uri = registry.uri("models/big", "v1")
    # the registry is fast: a rate cap leaves time to see ~30% land before the kill
    proc = popen_cli(home, "pull", uri, "--limit-rate", "16Mi", MODELCACHE_CONNECTIONS="4")
    deadline = time.monotonic() + 60
    while staging_done(home) < size * 0.3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = staging_done(home)
    assert [m["state"] for m in json.loads(run_cli(home, "list", "--json").stdout)] == ["partial"]
    again = run_cli(home, "pull", uri, "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert (Path(result["path"]) / "big.bin").read_bytes() == data
    assert result["revision"] == digest
    refetched = result["bytes_fetched"] - (size - done_before)
    assert refetched <= 0.10 * done_before, (result["bytes_fetched"], done_before)
    assert "resuming" in again.stderr
