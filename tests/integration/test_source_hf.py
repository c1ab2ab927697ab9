"""hf:// end to end through the CLI, against our HF-protocol endpoint on 127.0.0.1.

The endpoint is checked against huggingface_hub.snapshot_download (the real client) so these tests
exercise the protocol the Hub speaks; HF_ENDPOINT always points at it, nothing goes to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, popen_cli, run_cli, staging_done, write_random
from tests.support.hf_endpoint import HfEndpoint

MiB = 1 << 20
TOKEN = "hf_TestSecretToken0123456789abcdef"
REPO = "org/model"
LFS_FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def _write_repo(root: Path, config_version: int, seed: int, lfs_size: int = 3 * MiB) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "version": config_version}))
    (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(2000)}}))
    (root / "generation_config.json").write_text('{"do_sample": false}')
    (root / "sub" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    (root / "README.md").write_text("# test model\n")
    for i, name in enumerate(LFS_FILES):
        write_random(root / name, lfs_size + 4321 * i, seed=seed + i)
    return root


@dataclass(frozen=True)
class Hub:
    endpoint: HfEndpoint
    v1: str  # commit sha tagged v1.0
    v2: str  # commit sha on main
    v1_dir: Path
    v2_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {"HF_ENDPOINT": self.endpoint.url, "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": ""}
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    base = tmp_path_factory.mktemp("hub")
    v1_dir = _write_repo(base / "v1", 1, seed=10)
    v2_dir = _write_repo(base / "v2", 2, seed=10)  # same weights, new config
    with HfEndpoint(token=TOKEN, tree_page_size=4) as ep:
        v1 = ep.commit(REPO, v1_dir, branches=("main", "dev"), tags=("v1.0",))
        v2 = ep.commit(REPO, v2_dir, branches=("main",))
        ep.commit("org/gated", v1_dir)
        ep.gated.add("org/gated")
        yield Hub(ep, v1, v2, v1_dir, v2_dir)


def _show(home: Path, key: str) -> dict[str, object]:
    proc = run_cli(home, "show", key, "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def _pull(home: Path, hub: Hub, *args: str, **env: str) -> dict[str, object]:
    proc = run_cli(home, "pull", *args, "--json", **hub.env(**env))
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_pull_main_bytes_equal_and_commit_recorded(home: Path, hub: Hub) -> None:
    ep = hub.endpoint
    ep.reset_stats()
    rec = _pull(home, hub, f"hf://{REPO}", MODELCACHE_CHUNK_SIZE=str(MiB))
    out = Path(str(rec["path"]))
    assert out == home / "models" / hashlib.sha256(f"hf://{REPO}".encode()).hexdigest()[:16]
    assert tree_digest(out) == tree_digest(hub.v2_dir)
    assert rec["revision"] == hub.v2
    show = _show(home, str(rec["key"]))
    assert show["revision"] == hub.v2
    listing = json.loads(run_cli(home, "list", "--json").stdout)
    assert [m["revision"] for m in listing] == [hub.v2]
    requests = ep.requests
    assert sum("/tree/" in r.path for r in requests) > 1  # the listing was paginated and followed
    cdn = [r for r in requests if r.server == "cdn"]
    assert len([r for r in cdn if r.range]) >= 6  # LFS files fetched in parallel ranges...
    assert not any(r.authorization for r in cdn)  # ...from the CDN, which never saw the token
    assert all(r.authorization for r in requests if r.server == "hub")
    assert all(f"/{hub.v2}" in r.path for r in requests if "/resolve/" in r.path)  # pinned to the sha
    for name in LFS_FILES:  # each byte once
        assert ep.bytes_sent_for(name) == (hub.v2_dir / name).stat().st_size
    ep.reset_stats()
    again = _pull(home, hub, f"hf://{REPO}")
    assert again["hit"] is True and ep.bytes_sent == 0


@pytest.mark.parametrize(
    ("suffix", "expected"), [(":v1.0", "v1"), (":dev", "v1"), (":main", "v2"), (":SHA1", "v1")]
)
def test_revision_in_uri_records_commit_sha(home: Path, hub: Hub, suffix: str, expected: str) -> None:
    sha = getattr(hub, expected)
    uri = f"hf://{REPO}" + suffix.replace("SHA1", hub.v1)
    rec = _pull(home, hub, uri, "--include", "*.json")
    assert rec["revision"] == sha
    src = hub.v1_dir if expected == "v1" else hub.v2_dir
    assert tree_digest(Path(str(rec["path"]))) == {
        k: v for k, v in tree_digest(src).items() if k.endswith(".json")
    }
    assert (Path(str(rec["path"])) / "sub" / "special_tokens_map.json").exists()  # '*' spans '/'


def test_revision_flag_overrides_uri(tmp_path: Path, hub: Hub) -> None:
    rec = _pull(tmp_path / "a", hub, f"hf://{REPO}", "--revision", "v1.0", "--include", "config.json")
    assert rec["revision"] == hub.v1
    assert json.loads((Path(str(rec["path"])) / "config.json").read_text())["version"] == 1
    rec = _pull(tmp_path / "b", hub, f"hf://{REPO}:main", "--revision", hub.v1, "--include", "config.json")
    assert rec["revision"] == hub.v1
    assert sorted(p.name for p in Path(str(rec["path"])).iterdir()) == ["config.json"]
    # the key is the URI alone (KServe's): a hit holding another revision is refused, not served
    again = run_cli(tmp_path / "a", "pull", f"hf://{REPO}", "--revision", "v1.0", **hub.env())
    assert again.returncode == 0, again.stderr
    other = run_cli(tmp_path / "a", "pull", f"hf://{REPO}", "--revision", "dev", **hub.env())
    assert "cached at revision v1.0, not dev" in assert_one_line_error(other, 7)


def test_include_exclude(home: Path, hub: Hub) -> None:
    hub.endpoint.reset_stats()
    rec = _pull(home, hub, f"hf://{REPO}", "--include", "*.json", "--exclude", "sub/*")
    got = set(tree_digest(Path(str(rec["path"]))))
    assert got == {"config.json", "tokenizer.json", "generation_config.json"}
    assert not any(r.server == "cdn" for r in hub.endpoint.requests)  # no LFS byte was fetched


def test_huggingface_hub_agrees_with_our_endpoint(tmp_path: Path, hub: Hub) -> None:
    """The real client downloads the same bytes from our endpoint: it speaks the Hub's protocol."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    dead_proxy = "http://127.0.0.1:9"  # anything not for 127.0.0.1 fails instead of leaving the box
    env.update(
        HF_ENDPOINT=hub.endpoint.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HTTP_PROXY=dead_proxy,
        HTTPS_PROXY=dead_proxy,
        NO_PROXY="127.0.0.1,localhost",
    )
    code = (
        "import sys\n"
        "from huggingface_hub import snapshot_download\n"
        "print(snapshot_download(sys.argv[1], revision=sys.argv[2], endpoint=sys.argv[3], token=sys.argv[4],"
        " local_dir=sys.argv[5]))\n"
    )
    for rev, src in (("v1.0", hub.v1_dir), ("main", hub.v2_dir)):
        out = tmp_path / f"out-{rev}"
        proc = subprocess.run(
            [sys.executable, "-c", code, REPO, rev, hub.endpoint.url, TOKEN, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert tree_digest(out) == tree_digest(src)


def test_credentials(home: Path, hub: Hub) -> None:
    uri = f"hf://{REPO}"
    wrong = "hf_WrongSecretValue9876543210"
    for token_env, code in (({"HF_TOKEN": wrong}, 6), ({"HF_TOKEN": ""}, 6), ({"HF_TOKEN": wrong + "\n"}, 6)):
        proc = run_cli(home, "pull", uri, **hub.env(**token_env))
        line = assert_one_line_error(proc, code)
        assert "HF_TOKEN" in line
        assert wrong not in proc.stderr and TOKEN not in proc.stderr and wrong not in proc.stdout
    # HUGGING_FACE_HUB_TOKEN is the fallback when HF_TOKEN is unset
    proc = run_cli(
        home, "pull", uri, "--include", "config.json", **hub.env(HF_TOKEN="", HUGGING_FACE_HUB_TOKEN=TOKEN)
    )
    assert proc.returncode == 0, proc.stderr
    gated = run_cli(home, "pull", "hf://org/gated", **hub.env())
    line = assert_one_line_error(gated, 6)
    assert "gated" in line and TOKEN not in gated.stderr


def test_missing_repo_revision_or_files_exit_3(home: Path, hub: Hub) -> None:
    offline = {"HF_HUB_OFFLINE": "1"}
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["hf://org/nope"], {}, "repository not found"),
        ([f"hf://{REPO}:no-such-branch"], {}, "revision 'no-such-branch' not found"),
        ([f"hf://{REPO}", "--revision", "0" * 40], {}, "not found"),
        ([f"hf://{REPO}", "--include", "*.gguf"], {}, "no file matches"),
        ([f"hf://{REPO}"], offline, "HF_HUB_OFFLINE"),  # not cached and not allowed to download
    ]
    for args, env, fragment in cases:
        proc = run_cli(home, "pull", *args, **hub.env(**env))
        line = assert_one_line_error(proc, 3)
        assert fragment in line, (args, line)
        assert TOKEN not in proc.stderr


def test_a_listing_past_the_file_cap_is_exit_6(home: Path, hub: Hub) -> None:
    """The tree is paginated (4 entries a page here): the cap is checked page by page."""
    proc = run_cli(home, "pull", f"hf://{REPO}", **hub.env(MODELCACHE_MAX_FILES="3"))
    assert "more than 3 files" in assert_one_line_error(proc, 6)
    assert _pull(home, hub, f"hf://{REPO}", MODELCACHE_MAX_FILES="100")["hit"] is False


def test_hub_5xx_is_retried_then_gives_up(home: Path, hub: Hub) -> None:
    ep = hub.endpoint
    ep.fail_next(3)  # revision lookup twice, then the listing once
    try:
        proc = run_cli(home, "pull", f"hf://{REPO}", "--include", "config.json", **hub.env())
        assert proc.returncode == 0, proc.stderr
        assert "retry" in proc.stderr
        ep.fail_next(50)
        proc = run_cli(home, "pull", f"hf://{REPO}:v1.0", **hub.env())
        assert "gave up" in assert_one_line_error(proc, 6)
    finally:
        ep.heal()


def test_malformed_hf_uris_exit_2(home: Path, hub: Hub) -> None:
    for uri in ("hf://model", "hf://org/model/extra", "hf://org/model/", "hf:///model", "hf://org/:v1"):
        proc = run_cli(home, "pull", uri, **hub.env())
        assert "hf://owner/model[:revision]" in assert_one_line_error(proc, 2), uri
    for endpoint in ("ftp://example", hub.endpoint.url.replace("//", "//user:hunter2@")):
        proc = run_cli(home, "pull", f"hf://{REPO}", **hub.env(HF_ENDPOINT=endpoint))
        assert "HF_ENDPOINT" in assert_one_line_error(proc, 2)
        assert "hunter2" not in proc.stderr


def test_corrupt_lfs_file_is_an_integrity_error(home: Path, tmp_path: Path) -> None:
    src = _write_repo(tmp_path / "c", 1, seed=99, lfs_size=MiB)
    with HfEndpoint() as ep:
        ep.commit("org/corrupt", src)
        ep.corrupt("org/corrupt", LFS_FILES[1])
        proc = run_cli(home, "pull", "hf://org/corrupt", HF_ENDPOINT=ep.url, HF_TOKEN="")
    line = assert_one_line_error(proc, 4)
    assert "sha256" in line and LFS_FILES[1] in line
    assert run_cli(home, "path", "hf://org/corrupt").returncode == 3
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_resume_after_kill_minus_9_refetches_little(home: Path, tmp_path: Path) -> None:
    src = _write_repo(tmp_path / "r", 1, seed=7, lfs_size=6 * MiB)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    uri = "hf://org/big"
    with HfEndpoint(rate_limit=MiB) as ep:  # 4 connections x 1 MiB/s: ~1.2 s to pass 40%
        sha = ep.commit("org/big", src)
        env = {"HF_ENDPOINT": ep.url, "HF_TOKEN": ""}
        proc = popen_cli(home, "pull", uri, MODELCACHE_CONNECTIONS="4", MODELCACHE_CHUNK_SIZE=str(MiB), **env)
        deadline = time.monotonic() + 60
        while staging_done(home) < size * 0.4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
        done_before = staging_done(home)
        listing = json.loads(run_cli(home, "list", "--json").stdout)
        assert [m["state"] for m in listing] == ["partial"]
        ep.reset_stats()
        ep.rate_limit = None
        again = run_cli(home, "pull", uri, "--json", **env)
        assert again.returncode == 0, again.stderr
        fetched = ep.bytes_sent
    rec = json.loads(again.stdout)
    assert rec["revision"] == sha
    assert tree_digest(Path(rec["path"])) == tree_digest(src)
    refetched = fetched - (size - done_before)
    assert refetched <= 0.10 * done_before, (fetched, done_before, size)
    assert "resuming" in again.stderr


def test_waiting_for_another_pull_still_checks_the_revision(home: Path, hub: Hub) -> None:
    """Two pulls of one URI at once, asking for other revisions: the one that waited for the other's
    lock must not return what the other downloaded (run one after the other it is exit 7 too)."""
    hub.endpoint.rate_limit = 4 * MiB  # the first pull holds the lock for a while
    try:
        first = popen_cli(home, "pull", f"hf://{REPO}", "--revision", "v1.0", "--json", **hub.env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(home.glob(".modelcache/locks/*")):
            time.sleep(0.05)
        second = run_cli(home, "pull", f"hf://{REPO}", "--revision", "dev-does-not-matter", **hub.env())
        _out, err = first.communicate(timeout=120)
    finally:
        hub.endpoint.rate_limit = None
    assert first.returncode == 0, err
    assert "cached at revision v1.0, not dev-does-not-matter" in assert_one_line_error(second, 7)
    assert "another process is downloading" in second.stderr  # it really took the waiting path
