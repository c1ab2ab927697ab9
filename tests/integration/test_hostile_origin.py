"""Origins that lie: no lie becomes a published model, and every outcome is one line + an exit code.

Each case runs the real CLI against `tests.support.hostile.HostileOrigin` in one lying mode. The
promise checked every time: either the pull succeeds with exactly one version's bytes (and
`verify --full` agrees), or it fails with the documented exit code, a one-line error, no traceback,
and nothing visible as a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.hostile import MODES, HostileOrigin

MiB = 1 << 20

# mode -> (expected exit code, version published on success, extra env)
WHOLE_FILE = {"MODELCACHE_CHUNK_SIZE": str(64 * MiB)}  # one request without a Range header
EXPECT: dict[str, tuple[int, int | None, dict[str, str]]] = {
    "honest": (0, 1, {}),
    "wrong-range": (6, None, {}),
    "range-without-request": (6, None, WHOLE_FILE),
    "unparseable-range": (6, None, {}),
    "total-lies": (6, None, {}),
    "ignore-range": (6, None, {}),
    "get-bigger": (6, None, WHOLE_FILE),
    "get-smaller": (6, None, {}),
    "etag-after-head": (6, None, {}),
    "etag-midway": (0, 2, {}),  # restarted once from the fresh snapshot: all v2, revision v2
    "etag-midway-persistent": (6, None, {}),
    "same-etag-other-bytes": (6, None, {}),  # caught by the overlap cross-check
    "modified-midway": (0, 2, {}),
    "overlong-chunked": (6, None, {}),
    "wrong-digest": (4, None, {}),
    "trickle": (6, None, {"MODELCACHE_STALL_WINDOW": "1"}),
    "trickle-headers": (6, None, {"MODELCACHE_RESOLVE_TIMEOUT": "2"}),
    "no-headers": (6, None, {}),
    "redirect-other-host": (0, 1, {}),
    "redirect-file": (6, None, {}),
    "redirect-loop": (6, None, {}),
    "endless": (5, None, {}),  # room for 24 MiB (see test_lying_origin), not the whole disk
}
FAST = {
    "MODELCACHE_CHUNK_SIZE": str(MiB),
    "MODELCACHE_CONNECTIONS": "4",
    "MODELCACHE_RETRIES": "2",
    "MODELCACHE_RETRY_BASE": "0.02",
}


def test_every_mode_has_an_expectation() -> None:
    assert set(EXPECT) == set(MODES) and len(MODES) >= 15


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert "\n" not in errors[0]


def assert_nothing_published(home: Path) -> None:
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())
    listing = json.loads(run_cli(home, "list", "--json").stdout or "[]")
    assert all(m["state"] != "complete" for m in listing), listing


@pytest.mark.parametrize("mode", MODES)
def test_lying_origin(mode: str, tmp_path: Path) -> None:
    code, version, env = EXPECT[mode]
    home = tmp_path / "cache"
    if mode == "endless":  # leave 24 MiB of room on this filesystem, whatever its size
        st = os.statvfs(tmp_path)
        env = {**env, "MODELCACHE_RESERVE": str(st.f_bavail * st.f_frsize - 24 * MiB)}
    with HostileOrigin(mode) as origin:
        proc = run_cli(home, "pull", origin.url(), "--json", timeout=120, **{**FAST, **env})
        gets = len([r for r in origin.seen() if r.method == "GET"])
        sent = origin.body_bytes
    assert proc.returncode == code, (mode, proc.returncode, proc.stderr[-2000:])
    if mode == "endless":
        assert "gave no size" in proc.stderr and sent < 64 * MiB, (sent, proc.stderr)
        assert not any((home / ".modelcache" / "staging").glob("*/*")), "the partial file is removed"
        with HostileOrigin(mode) as origin:
            bad = run_cli(home, "pull", origin.url(), **{**FAST, "MODELCACHE_RESERVE": "lots"})
        assert bad.returncode == 2 and "MODELCACHE_RESERVE: invalid size" in bad.stderr, bad.stderr
        assert_one_line_error(bad.stderr)
    if code != 0:
        assert_one_line_error(proc.stderr)
        assert_nothing_published(home)
        return
    result = json.loads(proc.stdout)
    data = (Path(result["path"]) / "model.bin").read_bytes()
    assert data == (origin.v1 if version == 1 else origin.v2), mode
    shown = json.loads(run_cli(home, "show", result["key"], "--json").stdout)
    assert shown["revision"] == f'"v{version}"' or mode == "modified-midway", shown
    assert shown["source"]["source_checksum"] == "none"
    assert run_cli(home, "verify", result["key"], "--full").returncode == 0
    assert gets >= 1


def test_origin_change_is_detected_by_overlap_even_without_validators(tmp_path: Path) -> None:
    """Same ETag, other bytes: only the overlapping bytes between requests can tell."""
    home = tmp_path / "cache"
    with HostileOrigin("same-etag-other-bytes") as origin:
        proc = run_cli(home, "pull", origin.url(), **FAST)
    assert proc.returncode == 6
    assert "different bytes" in proc.stderr or "changed" in proc.stderr


def test_credentials_stay_on_the_first_host(tmp_path: Path) -> None:
    """User-info (Basic) and KServe's <host>-headers go to 127.0.0.1 only, not where it redirects."""
    home = tmp_path / "cache"
    with HostileOrigin("redirect-other-host") as origin:
        url = origin.url().replace("http://", "http://alice:s3cr%23t@")
        env = {**FAST, "127.0.0.1-headers": json.dumps({"X-Api-Key": "hdr-secret"})}
        proc = run_cli(home, "pull", url, **env)
        first, other = origin.seen(origin.host), origin.seen(origin.other_host)
    assert proc.returncode == 0, proc.stderr
    assert first and other
    assert all("authorization" in r.headers and r.headers.get("x-api-key") == "hdr-secret" for r in first)
    assert all("authorization" not in r.headers and "x-api-key" not in r.headers for r in other)
    assert "s3cr" not in proc.stderr + proc.stdout


def test_bearer_token_and_userinfo_together_is_bad_input(tmp_path: Path) -> None:
    with HostileOrigin("honest") as origin:
        url = origin.url().replace("http://", "http://alice:pw@")
        proc = run_cli(tmp_path / "c", "pull", url, MODELCACHE_HTTP_BEARER_TOKEN="tok-123")
        asked = origin.seen()
    assert proc.returncode == 2, proc.stderr
    assert "credentials given twice" in proc.stderr and "tok-123" not in proc.stderr
    assert "pw@" not in proc.stderr and not asked


@pytest.mark.parametrize(
    "path",
    [
        "good/..%2F..%2F..%2Ftmp%2Fx.bin",
        "good/%2Ftmp%2Fabs.bin",
        "good/x%00.bin",
        "good/%2E%2E",
        "good/" + "a" * 300 + ".bin",
        "good/%0D%0Ax.bin",
        "good/%FF%FE.bin",
    ],
)
def test_url_names_that_are_not_file_names(path: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with HostileOrigin("honest") as origin:
        proc = run_cli(tmp_path / "c", "pull", f"http://127.0.0.1:{origin.port}/{path}", **FAST)
        asked = origin.seen()
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr)
    assert not asked  # refused before any request
    assert (
        not any(outside.iterdir()) and not Path("/tmp/x.bin").exists() and not Path("/tmp/abs.bin").exists()
    )


def test_published_bytes_hash_to_what_the_manifest_says(tmp_path: Path) -> None:
    home = tmp_path / "cache"
    with HostileOrigin("honest") as origin:
        proc = run_cli(home, "pull", origin.url(), "--json", **FAST)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    shown = json.loads(run_cli(home, "show", result["key"], "--json").stdout)
    (entry,) = shown["files"]
    assert entry["sha256"] == hashlib.sha256(origin.v1).hexdigest()
