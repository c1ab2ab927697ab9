"""Credentials never reach the disk or an output: plant them everywhere, then search everything.

Secrets go in through every door a user has (URL user-info, signed query parameters, the bearer
token env, KServe's `<host>-headers`), through finished, interrupted and exported pulls, in both log
formats and in --debug. Then every byte under the cache home, every bundle and every line printed
is searched for them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.conftest import popen_cli, run_cli
from tests.support.hostile import HostileOrigin
from tests.support.origin import Origin

SECRETS = {
    "password": "PW-s3cr#t-one",
    "signature": "SIG-secret-two",
    "token_query": "TOKQ-secret-three",
    "bearer": "BEARER-secret-four",
    "header": "HDR-secret-five",
    "client_secret": "CS-secret-six",
    "auth_token": "AUTHTOK-secret-seven",
    "private_token": "PRIVTOK-secret-eight",
    "bare": "BARE-secret-nine",
}
FAST = {"MODELCACHE_CHUNK_SIZE": str(1 << 20), "MODELCACHE_CONNECTIONS": "4", "MODELCACHE_RETRIES": "1"}


def _leaks(blob: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in blob]


def _tree_leaks(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if leaks := _leaks(path.read_bytes()):
                found[str(path.relative_to(root))] = leaks
    return found


def test_no_secret_at_rest_or_in_any_output(tmp_path: Path) -> None:
    home = tmp_path / "cache"
    printed: list[str] = []
    pw = SECRETS["password"].replace("#", "%23")
    with HostileOrigin("honest") as origin:
        base = f"http://127.0.0.1:{origin.port}"
        signed = (
            f"{base}/signed.bin?X-Amz-Signature={SECRETS['signature']}"
            f"&token={SECRETS['token_query']}&client_secret={SECRETS['client_secret']}"
            f"&auth_token={SECRETS['auth_token']}&private_token={SECRETS['private_token']}&{SECRETS['bare']}"
        )
        with_userinfo = f"http://alice:{pw}@127.0.0.1:{origin.port}/userinfo.bin"
        headers_env = {"127.0.0.1-headers": json.dumps({"X-Api-Key": SECRETS["header"]})}
        runs = [
            (with_userinfo, {}, ["--log-format", "json"]),
            (signed, {"MODELCACHE_HTTP_BEARER_TOKEN": SECRETS["bearer"]}, ["--debug"]),
            (f"{base}/headers.bin", headers_env, ["--log-format", "text"]),
        ]
        keys = []
        for uri, env, flags in runs:
            proc = run_cli(home, *flags, "pull", uri, "--json", **{**FAST, **env})
            printed += [proc.stdout, proc.stderr]
            assert proc.returncode == 0, proc.stderr
            keys.append(json.loads(proc.stdout)["key"])
        # An interrupted download leaves staging state behind: it must be clean too.
        (tmp_path / "origin").mkdir()
        (tmp_path / "origin" / "partial.bin").write_bytes(os.urandom(64 << 20))
        with Origin(tmp_path / "origin", rate_limit=1 << 20) as slow:
            uri = f"http://bob:{pw}@127.0.0.1:{slow.port}/partial.bin?sig={SECRETS['signature']}"
            proc_bg = popen_cli(home, "pull", uri, **FAST)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not list(home.glob(".modelcache/staging/*/state.json")):
                time.sleep(0.1)
            if not list(home.glob(".modelcache/staging/*/state.json")):
                proc_bg.kill()
                raise AssertionError(f"no staging state to inspect: {proc_bg.communicate(timeout=30)}")
            proc_bg.send_signal(signal.SIGKILL)
            out, err = proc_bg.communicate(timeout=30)
            printed += [out, err]
        # Everything a user can ask for afterwards.
        for args in (
            ["list", "--json"],
            ["list"],
            ["verify", "--full"],
            *(["show", k, "--json"] for k in keys),
        ):
            proc = run_cli(home, *args)
            printed += [proc.stdout, proc.stderr]
        bundle = tmp_path / "bundle.tar"
        proc = run_cli(home, "export", keys[1], "-o", str(bundle))
        assert proc.returncode == 0, proc.stderr
        printed += [proc.stdout, proc.stderr]
        # Errors that quote the URI: a 404 and a bad port.
        for uri in (f"http://alice:{pw}@127.0.0.1:{origin.port}/../missing?sig={SECRETS['signature']}",):
            proc = run_cli(home, "pull", uri, **FAST)
            printed += [proc.stdout, proc.stderr]
    raw_pw = f"http://alice:{SECRETS['password']}@127.0.0.1:1/x.bin"
    proc = run_cli(home, "pull", raw_pw)
    assert proc.returncode == 2
    printed += [proc.stdout, proc.stderr]

    assert _tree_leaks(home) == {}
    assert _leaks(bundle.read_bytes()) == []
    assert [(i, _leaks(text.encode())) for i, text in enumerate(printed) if _leaks(text.encode())] == []
    listing = json.loads(run_cli(home, "list", "--json").stdout)
    assert {m["key"] for m in listing} >= set(keys)  # stored under the exact URI's key all the same
    assert any("***" in m["uri"] for m in listing)
