"""Cold-pull and warm-lookup benchmark: modelcache vs aria2c vs curl against a rate-capped nginx.

Why this shape: real object stores and CDNs cap the throughput of each TCP connection, so a
single-stream client (curl) is stuck at the cap and only parallel ranged GETs get near the link.
We reproduce that on loopback with nginx `limit_rate` (a per-request cap), serve a generated
~2 GiB model from it, and time the tools on the same files, alternating round-robin so that
drift (page cache, thermal, noisy neighbours) hits every tool alike.

Everything talks to 127.0.0.1 only. Outputs: bench/results/pull.{md,json,png}.
Run: `.venv/bin/python bench/pull.py` (or `make bench`); `--quick` for a small smoke run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
# the project's venv (modelcache CLI, and the interpreter for the in-process lookup)
VENV_BIN = (
    REPO_DIR / ".venv" / "bin" if (REPO_DIR / ".venv" / "bin").is_dir() else Path(sys.executable).parent
)
MIB = 1024 * 1024
GEN_BLOCK = 4 * MIB
TOOLS = ("modelcache", "aria2c", "curl")
SCENARIOS = ("largest", "set", "archive")
DEFAULT_SCENARIOS = ("largest", "set", "archive")
LOOKUP_FILES = 100
LOOKUP_ARCHIVE = "model100.tar"
TARGET_RATIO = 0.9
TARGET_LOOKUP_MS = 50.0
TARGET_PATH_MS = 250.0
TARGET_RSS_MB = 256.0
POLL_S = 0.005
RSS_SAMPLE_S = 0.2
SETTLE_S = 1.0
QUIET_CORES = 0.25


# --------------------------------------------------------------------------------------------------
# small helpers


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes (K/M/G without 'i' are still binary, as nginx)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 2GiB, 512MiB)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def parse_rate(text: str) -> int:
    """nginx-style rate ('20m' = 20 MiB/s per connection; '0' = uncapped) -> bytes/s."""
    return parse_size(text)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for callers."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_version(argv: Sequence[str], pattern: str = r".+") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout + out.stderr).strip()
    m = re.search(pattern, text)
    return m.group(0).strip() if m else (text.splitlines() or ["?"])[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_busy_s() -> float:
    """Process-context CPU seconds of the whole machine (user+nice+system+steal, all cores).

    irq/softirq are left out: loopback TCP is processed there and belongs to no process, so it
    would show up as "other" work when it is the transfer itself.
    """
    with contextlib.suppress(OSError, ValueError):
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
        return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


def wait_quiet(max_wait: float, threshold: float = QUIET_CORES) -> float:
    """Wait (bounded) until the machine is nearly idle; returns the busy cores last measured.

    Other work on a 2-core box (test suites, builds) moves a CPU-bound client's numbers more than
    anything we measure, so each run starts in a quiet second when there is one. The first
    sample also lets the deletes and writeback of the previous run settle.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, p0 = system_busy_s(), time.process_time()
        time.sleep(SETTLE_S)
        busy = max(0.0, (system_busy_s() - b0) - (time.process_time() - p0)) / SETTLE_S
        if busy <= threshold or time.monotonic() >= deadline:
            if busy > threshold:
                log(f"machine still busy ({busy:.2f} cores) after {max_wait:.0f}s; running anyway")
            return busy


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(GEN_BLOCK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# model generation


@dataclass
class ModelFile:
    name: str
    size: int
    sha256: str


@dataclass
class Model:
    """The served model: files under www/<model_dir>/ plus the 100-file archive for the lookup."""

    www: Path
    model_dir: str
    files: list[ModelFile]
    lookup_archive: ModelFile
    archive: ModelFile | None = None  # the whole model as one tar (the "archive" scenario)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def largest(self) -> ModelFile:
        return max(self.files, key=lambda f: f.size)

    def path_of(self, f: ModelFile) -> str:
        """URL path: model files live under /<model_dir>/, the archives at the root."""
        return f"/{self.model_dir}/{f.name}" if f in self.files else f"/{f.name}"

    def served(self) -> list[ModelFile]:
        return [*self.files, self.lookup_archive, *([self.archive] if self.archive else [])]


def _json_files(n_large: int, large_size: int) -> dict[str, bytes]:
    """Small json files shaped like a HF checkpoint's (config, tokenizer, index)."""
    shards = [f"model-{i:05d}-of-{n_large:05d}.safetensors" for i in range(1, n_large + 1)]
    vocab = {f"tok{i:06d}": i for i in range(60_000)}  # ~1.3 MB tokenizer.json, like real ones
    weight_map = {f"model.layers.{i}.mlp.weight": shards[i % n_large] for i in range(400)}
    docs: dict[str, Any] = {
        "config.json": {
            "architectures": ["BenchForCausalLM"],
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "vocab_size": len(vocab),
            "torch_dtype": "bfloat16",
        },
        "generation_config.json": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        "tokenizer_config.json": {"model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": vocab}},
        "model.safetensors.index.json": {
            "metadata": {"total_size": n_large * large_size},
            "weight_map": weight_map,
        },
    }
    return {name: json.dumps(doc, indent=1).encode() for name, doc in docs.items()}


def _write_random_ish(path: Path, size: int) -> str:
    """Cheap incompressible-ish bytes: one urandom block per file, rotated differently per block.

    Repeats are 4 MiB apart, far outside gzip's 32 KiB window, and no two blocks are identical,
    so neither compression nor block dedup can make one tool look faster than another.
    """
    seed = os.urandom(GEN_BLOCK)
    h = hashlib.sha256()
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        written, i = 0, 0
        while written < size:
            k = (i * 1_048_573) % GEN_BLOCK
            block = seed[k:] + seed[:k]
            block = block[: size - written]
            f.write(block)
            h.update(block)
            written += len(block)
            i += 1
    tmp.replace(path)
    return h.hexdigest()


def _write_lookup_archive(path: Path) -> None:
    """A 100-file model (json + small binaries) as one tar: modelcache's http source takes one URL."""
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no bench/work yet
    with tarfile.open(tmp, "w") as tar:
        for i in range(LOOKUP_FILES):
            name = f"model100/file-{i:03d}.json" if i % 2 else f"model100/shard-{i:03d}.bin"
            data = json.dumps({"i": i}).encode() if i % 2 else os.urandom(4096 + 97 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, fileobj=io.BytesIO(data))
    tmp.replace(path)


def ensure_model(work: Path, total: int, n_large: int) -> Model:
    """Generate the model once; reuse it when the manifest matches the requested shape."""
    www = work / "www"
    model_dir = f"model-{fmt_bytes(total).replace(' ', '').replace('.', '_')}-x{n_large}"
    root = www / model_dir
    manifest_path = work / f"{model_dir}.manifest.json"
    archive = www / LOOKUP_ARCHIVE
    if not archive.exists():
        _write_lookup_archive(archive)
    # shared by every model size, so hashed on every start (it is half a megabyte)
    lookup = ModelFile(LOOKUP_ARCHIVE, archive.stat().st_size, sha256_file(archive))
    json_blobs = _json_files(n_large, 0)
    json_total = sum(len(b) for b in json_blobs.values())
    large_size = max(MIB, (total - json_total) // n_large)
    if manifest_path.exists():
        known = [ModelFile(**f) for f in json.loads(manifest_path.read_text())["files"]]
        if all((root / f.name).is_file() and (root / f.name).stat().st_size == f.size for f in known):
            log(f"reusing generated model {root} ({fmt_bytes(sum(f.size for f in known))})")
            return Model(www, model_dir, known, lookup)
    log(f"generating model in {root}: {n_large} x {fmt_bytes(large_size)} + {len(json_blobs)} json files")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    files: list[ModelFile] = []
    for i in range(1, n_large + 1):
        name = f"model-{i:05d}-of-{n_large:05d}.safetensors"
        files.append(ModelFile(name, large_size, _write_random_ish(root / name, large_size)))
    for name, blob in _json_files(n_large, large_size).items():
        (root / name).write_bytes(blob)
        files.append(ModelFile(name, len(blob), hashlib.sha256(blob).hexdigest()))
    manifest_path.write_text(json.dumps({"files": [asdict(f) for f in files]}))
    log(f"generated {fmt_bytes(sum(f.size for f in files))} in {time.perf_counter() - t0:.1f}s")
    return Model(www, model_dir, files, lookup)


def ensure_archive(work: Path, model: Model) -> None:
    """The whole model as one uncompressed tar next to its directory (made once, hashed once)."""
    path = model.www / f"{model.model_dir}.tar"
    meta = work / f"{model.model_dir}.tar.json"
    if path.exists() and meta.exists():
        f = ModelFile(**json.loads(meta.read_text()))
        if f.size == path.stat().st_size:
            model.archive = f
            return
    log(f"writing {path.name} (the model as one tar)")
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in model.files:
            tar.add(model.www / model.model_dir / f.name, arcname=f.name, recursive=False)
    tmp.replace(path)
    model.archive = ModelFile(path.name, path.stat().st_size, sha256_file(path))
    meta.write_text(json.dumps(asdict(model.archive)))


# --------------------------------------------------------------------------------------------------
# nginx


NGINX_CONF = """\
# generated by bench/pull.py -- not the system config
{user_line}
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    log_format bench '$connection $status $body_bytes_sent "$request" "$http_range"';
    access_log {work}/nginx-access.log bench;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    gzip off;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {www};
        limit_rate {rate};
        location / {{ }}
{digest_locations}    }}
}}
"""


class Nginx:
    """Our own nginx (own config, pid, logs under the work dir), started and stopped by us."""

    def __init__(self, work: Path, model: Model, rate: int, workers: int, digests: bool) -> None:
        self.work, self.www, self.rate, self.workers = work, model.www, rate, workers
        self.model, self.digests = model, digests
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_log = work / "nginx-access.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.work / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.access_log.unlink(missing_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                user_line="user root;" if os.geteuid() == 0 else "",
                workers=self.workers,
                work=self.work,
                www=self.www,
                port=self.port,
                rate=self.rate,
                digest_locations=self._digest_locations(),
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = [nginx, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "nginx-error.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.work / "nginx-error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(self.base_url + "/", timeout=1) as r:  # 127.0.0.1 only
                    r.read()
            except urllib.error.HTTPError:
                return  # 403/404 on the index is fine: it answers
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise RuntimeError("nginx did not answer within 10s")

    def _digest_locations(self) -> str:
        """`Repr-Digest` (RFC 9530) per file, as object stores publish checksums; modelcache checks it."""
        if not self.digests:
            return ""
        out = []
        for f in self.model.served():
            b64 = base64.b64encode(bytes.fromhex(f.sha256)).decode()
            loc = self.model.path_of(f)
            out.append(f'        location = {loc} {{ add_header Repr-Digest "sha-256=:{b64}:"; }}\n')
        return "".join(out)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish in-flight responses
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cpu_s(self) -> float:
        """user+sys of the nginx master and workers so far (the server's share of the 2 cores)."""
        import psutil

        if self.proc is None:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.proc.pid)
            for q in [p, *p.children()]:
                with contextlib.suppress(psutil.Error):
                    t = q.cpu_times()
                    total += t.user + t.system
        return total

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def connections_since(self, offset: int) -> tuple[int, int]:
        """(distinct TCP connections, requests) logged since `offset`: shows each tool's parallelism."""
        if not self.access_log.exists():
            return 0, 0
        with self.access_log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        conns = {ln.split(" ", 1)[0] for ln in lines if ln}
        return len(conns), len([ln for ln in lines if ln])


# --------------------------------------------------------------------------------------------------
# running a tool and measuring it


@dataclass
class ProcResult:
    wall_s: float
    returncodes: list[int]
    peak_rss_mb: float  # max over the processes of their own ru_maxrss (GNU time %M)
    peak_tree_rss_mb: float  # sampled sum over all live processes (for concurrent jobs)
    cpu_s: float  # user + sys of the tool processes (GNU time), all jobs summed
    stdouts: list[str]


def _tree_rss(pids: Sequence[int], hwm_kb: dict[int, int], cpu: dict[int, float]) -> int:
    """Sum of current RSS over the trees of `pids`; also records each process's VmHWM and CPU time
    (the fallback figures when GNU time is missing: VmHWM is a high-water mark, so sampling it late
    still catches the peak, except for the last interval before exit)."""
    import psutil  # lazy: only the pull phase needs it

    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            with contextlib.suppress(psutil.Error, OSError, ValueError, IndexError):
                total += q.memory_info().rss
                t = q.cpu_times()
                cpu[q.pid] = t.user + t.system
                for line in Path(f"/proc/{q.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm_kb[q.pid] = max(hwm_kb.get(q.pid, 0), int(line.split()[1]))
    return total


GNU_TIME = Path("/usr/bin/time")


def rss_method() -> str:
    if GNU_TIME.exists():
        return "GNU `time -f '%M %U %S'` (each tool process's own ru_maxrss and CPU)"
    return f"sampled /proc VmHWM and CPU every {RSS_SAMPLE_S}s (no /usr/bin/time: `apt-get install time`)"


def _read_time_file(path: Path) -> tuple[int, float]:
    """(max RSS KiB, user+sys CPU s) from GNU time's '%M %U %S', the last line of its -o file."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        rss, user, sys_s = path.read_text().strip().splitlines()[-1].split()
        return int(rss), float(user) + float(sys_s)
    return 0, 0.0


def run_jobs(
    commands: Sequence[Sequence[str]], jobs: int, env: dict[str, str], log_path: Path, timeout_s: float
) -> ProcResult:
    """Run commands with at most `jobs` at once and time the whole batch.

    Peak RSS comes from GNU time (`%M`, the child's own ru_maxrss): wait4 from this process would
    report the forked Python's RSS, which Linux carries over into the child's maxrss across exec.
    """
    pending = list(enumerate(commands))
    running: list[tuple[int, subprocess.Popen[bytes], Path, Path]] = []
    rcs = [0] * len(commands)
    outs = [""] * len(commands)
    peak_rss_kb, peak_tree, cpu_s = 0, 0, 0.0
    out_dir = log_path.parent
    next_sample = 0.0
    use_time = GNU_TIME.exists()
    hwm_kb: dict[int, int] = {}
    cpu_seen: dict[int, float] = {}
    with log_path.open("ab") as err:
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        while pending or running:
            while pending and len(running) < jobs:
                idx, argv = pending.pop(0)
                out_path = out_dir / f"{log_path.stem}.stdout.{idx}"
                rss_path = out_dir / f"{log_path.stem}.maxrss.{idx}"
                full = (
                    [str(GNU_TIME), "-f", "%M %U %S", "-o", str(rss_path), *argv] if use_time else list(argv)
                )
                with out_path.open("wb") as out:
                    proc = subprocess.Popen(
                        full,
                        stdout=out,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,
                    )
                running.append((idx, proc, out_path, rss_path))
            now = time.perf_counter()
            if now >= next_sample:
                peak_tree = max(peak_tree, _tree_rss([p.pid for _i, p, _o, _r in running], hwm_kb, cpu_seen))
                next_sample = now + RSS_SAMPLE_S
            for item in list(running):
                idx, proc, out_path, rss_path = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                rcs[idx] = proc.returncode
                outs[idx] = out_path.read_text(errors="replace")
                out_path.unlink(missing_ok=True)
                rss_kb, cpu = _read_time_file(rss_path)
                peak_rss_kb = max(peak_rss_kb, rss_kb)
                cpu_s += cpu
                rss_path.unlink(missing_ok=True)
            if time.perf_counter() > deadline:
                for _idx, proc, _o, _r in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the tool and its children
                    proc.wait()
                raise TimeoutError(f"run exceeded {timeout_s:.0f}s: {commands[0]}")
            if running:
                time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    if not use_time:  # sampled fallback (install Debian's `time` for exact figures)
        peak_rss_kb = max(hwm_kb.values(), default=0)
        cpu_s = sum(cpu_seen.values())
    return ProcResult(wall, rcs, peak_rss_kb * 1024 / 1e6, peak_tree / 1e6, cpu_s, outs)


@dataclass
class RunRecord:
    round: int
    tool: str
    scenario: str
    bytes: int
    files: int
    wall_s: float
    sync_s: float
    mb_s: float
    cpu_s: float
    nginx_cpu_s: float
    other_cpu_s: float  # busy CPU on the machine that was neither the tool, nginx nor this harness
    background_cores: float  # busy cores just before the run (after waiting for quiet)
    peak_rss_mb: float
    peak_tree_rss_mb: float
    connections: int
    requests: int
    ok: bool
    error: str = ""


@dataclass
class Ctx:
    args: argparse.Namespace
    model: Model
    nginx: Nginx
    work: Path
    mc_bin: Path | None
    env: dict[str, str] = field(default_factory=dict)

    def url(self, f: ModelFile) -> str:
        return self.nginx.base_url + self.model.path_of(f)

    def mc_pull(self, home: Path, url: str) -> list[str]:
        """`modelcache --home H --quiet pull URL` (connections also set via MODELCACHE_CONNECTIONS)."""
        assert self.mc_bin is not None
        conns = ["--connections", str(self.args.connections)]
        return [str(self.mc_bin), "--home", str(home), "--quiet", "pull", *conns, url]


def _targets(ctx: Ctx, scenario: str) -> list[ModelFile]:
    """What is downloaded in a scenario (its bytes are what throughput is computed from)."""
    if scenario == "largest":
        return [ctx.model.largest]
    if scenario == "archive":
        assert ctx.model.archive is not None
        return [ctx.model.archive]
    return list(ctx.model.files)


def _archive_commands(ctx: Ctx, tool: str, f: ModelFile, out: Path) -> list[list[str]]:
    """Whole model as one tar: modelcache pulls and unpacks; aria2c downloads then `tar -x`;
    curl streams into `tar -x` (what one would do by hand)."""
    dest = out / "dl" / "x"
    dest.mkdir(parents=True)
    if tool == "modelcache":
        return [ctx.mc_pull(out / "home", ctx.url(f))]
    if tool == "aria2c":
        aria = _aria2c_argv(ctx, out, ["-i", str(_aria2c_list(ctx, [f], out))])
        tar = ["tar", "-xf", str(out / "dl" / f.name), "-C", str(dest)]
        script = f"{shlex.join(aria)} && {shlex.join(tar)}"
    else:
        script = f"curl -sS -f {shlex.quote(ctx.url(f))} | tar -xf - -C {shlex.quote(str(dest))}"
    return [["bash", "-o", "pipefail", "-c", script]]


def _aria2c_list(ctx: Ctx, files: list[ModelFile], out: Path) -> Path:
    listing = out / "aria2-input.txt"
    listing.write_text("".join(f"{ctx.url(f)}\n" for f in files))
    return listing


def _aria2c_argv(ctx: Ctx, out: Path, rest: list[str]) -> list[str]:
    a = ctx.args
    return [
        "aria2c",
        f"-x{a.connections}",
        f"-s{a.connections}",
        "-k1M",
        f"-j{a.jobs}",
        "--file-allocation=none",
        "-d",
        str(out / "dl"),
        "--console-log-level=warn",
        "--summary-interval=0",
        "--download-result=hide",
        "--auto-file-renaming=false",
        *rest,
    ]


def _commands(
    ctx: Ctx, tool: str, scenario: str, files: list[ModelFile], out: Path
) -> tuple[list[list[str]], int]:
    """argv list and job concurrency for one tool on one file set."""
    a = ctx.args
    if scenario == "archive":
        return _archive_commands(ctx, tool, files[0], out), 1
    if tool == "aria2c":
        return [_aria2c_argv(ctx, out, ["-i", str(_aria2c_list(ctx, files, out))])], 1
    if tool == "curl":
        argv = ["curl", "-sS", "-f"]
        for f in files:
            argv += ["-o", str(out / "dl" / f.name), ctx.url(f)]
        return [argv], 1  # one process, one reused connection, files back to back
    assert ctx.mc_bin is not None
    home = out / "home"
    return [ctx.mc_pull(home, ctx.url(f)) for f in files], a.jobs


def _locate_outputs(
    tool: str, scenario: str, files: list[ModelFile], out: Path, res: ProcResult
) -> dict[str, Path]:
    """Where each tool put each file (modelcache: under the directories its pulls printed last)."""
    if tool != "modelcache":
        base = out / "dl" / "x" if scenario == "archive" else out / "dl"
        return {f.name: base / f.name for f in files}
    dirs = [Path(lines[-1].strip()) for lines in (o.strip().splitlines() for o in res.stdouts) if lines]
    found: dict[str, Path] = {}
    for f in files:
        for d in dirs:
            cand = d / f.name if d.is_dir() else d
            if cand.name == f.name and cand.is_file():
                found[f.name] = cand
                break
            hit = next((p for p in d.rglob(f.name) if p.is_file()), None) if d.is_dir() else None
            if hit is not None:
                found[f.name] = hit
                break
    return found


def _verify(files: list[ModelFile], where: dict[str, Path], deep: bool) -> str:
    """'' if every file is there with the right size (and sha256 when deep), else what is wrong."""
    for f in files:
        p = where.get(f.name)
        if p is None or not p.is_file():
            return f"missing {f.name}"
        if p.stat().st_size != f.size:
            return f"{f.name}: size {p.stat().st_size} != {f.size}"
        if deep and sha256_file(p) != f.sha256:
            return f"{f.name}: sha256 mismatch"
    return ""


def run_one(ctx: Ctx, rnd: int, tool: str, scenario: str) -> RunRecord:
    files = _targets(ctx, scenario)
    nbytes = sum(f.size for f in files)
    out = ctx.work / "runs" / f"{tool}-{scenario}-r{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "dl").mkdir(parents=True)
    commands, jobs = _commands(ctx, tool, scenario, files, out)
    expect = ctx.model.files if scenario == "archive" else files  # what must be on disk afterwards
    # generous bound: everything over a single capped connection, twice, plus a minute
    rate = ctx.args.rate or 50 * MIB
    timeout = 2 * nbytes / rate + 60 * len(commands)
    os.sync()  # start each run with no dirty pages left from the previous one
    background = wait_quiet(ctx.args.quiet_wait)  # and with the machine as idle as it gets
    offset = ctx.nginx.log_offset()
    error = ""
    cpu0 = (system_busy_s(), ctx.nginx.cpu_s(), time.process_time())
    try:
        res = run_jobs(commands, jobs, ctx.env, out / "stderr.log", timeout)
    except TimeoutError as exc:
        res, error = ProcResult(timeout, [124], 0.0, 0.0, 0.0, []), str(exc)
    busy, nginx_cpu, own_cpu = (
        a - b for a, b in zip((system_busy_s(), ctx.nginx.cpu_s(), time.process_time()), cpu0, strict=True)
    )
    other_cpu = max(0.0, busy - nginx_cpu - own_cpu - res.cpu_s)
    t_sync = time.perf_counter()
    os.sync()  # time to durability reported separately: modelcache may fsync, aria2c/curl do not
    sync_s = time.perf_counter() - t_sync
    time.sleep(0.2)  # nginx writes the access log line when the response completes
    conns, reqs = ctx.nginx.connections_since(offset)
    if not error and any(res.returncodes):
        tail = (out / "stderr.log").read_text(errors="replace")[-600:]
        error = f"exit codes {res.returncodes}: {tail}"
    if not error:
        error = _verify(expect, _locate_outputs(tool, scenario, expect, out, res), deep=ctx.args.verify)
    if not ctx.args.keep:
        shutil.rmtree(out, ignore_errors=True)
    rec = RunRecord(
        round=rnd,
        tool=tool,
        scenario=scenario,
        bytes=nbytes,
        files=len(files),
        wall_s=res.wall_s,
        sync_s=sync_s,
        mb_s=nbytes / 1e6 / res.wall_s,
        cpu_s=res.cpu_s,
        nginx_cpu_s=nginx_cpu,
        other_cpu_s=other_cpu,
        background_cores=background,
        peak_rss_mb=res.peak_rss_mb,
        peak_tree_rss_mb=res.peak_tree_rss_mb,
        connections=conns,
        requests=reqs,
        ok=not error,
        error=error,
    )
    status = "ok" if rec.ok else f"FAILED: {error}"
    log(
        f"r{rnd} {scenario:7s} {tool:10s} {rec.wall_s:7.2f}s {rec.mb_s:7.1f} MB/s "
        f"cpu {rec.cpu_s:5.1f}s nginx {nginx_cpu:4.1f}s other {other_cpu:4.1f}s "
        f"rss {rec.peak_rss_mb:6.1f} MB conns {conns:3d} sync {sync_s:.2f}s {status}"
    )
    return rec


# --------------------------------------------------------------------------------------------------
# warm lookup


LOOKUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from modelcache.store import Store
t_import = time.perf_counter() - t0
root, url, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
first = Store(root).lookup(url)
t_first = time.perf_counter() - t0
times = []
for _ in range(n):
    t0 = time.perf_counter()
    rec = Store(root).lookup(url)
    times.append(time.perf_counter() - t0)
    assert rec is not None, "lookup returned None for a cached model"
miss = Store(root).lookup(url + ".not-cached")
print(json.dumps({"import_s": t_import, "first_s": t_first, "times_s": times,
                  "found": first is not None,
                  "file_count": getattr(first, "file_count", None), "miss_is_none": miss is None,
                  "record": repr(first)[:300]}))
"""


def warm_lookup(ctx: Ctx) -> dict[str, Any]:
    """Warm pull the 100-file model, then time Store.lookup in-process and `modelcache path` as a process."""
    assert ctx.mc_bin is not None
    a = ctx.args
    home = ctx.work / "warm-home"
    shutil.rmtree(home, ignore_errors=True)
    url = f"{ctx.nginx.base_url}/{LOOKUP_ARCHIVE}"
    out: dict[str, Any] = {"url_files": LOOKUP_FILES, "archive_bytes": ctx.model.lookup_archive.size}
    pull = subprocess.run(
        ctx.mc_pull(home, url),
        capture_output=True,
        text=True,
        env=ctx.env,
        timeout=300,
        check=False,
    )
    if pull.returncode != 0:
        out["error"] = f"warm pull failed ({pull.returncode}): {pull.stderr[-600:]}"
        return out
    model_dir = Path(pull.stdout.strip().splitlines()[-1])
    out["model_dir_files"] = sum(1 for p in model_dir.rglob("*") if p.is_file()) if model_dir.is_dir() else 0
    py = VENV_BIN / "python"
    res = subprocess.run(
        [str(py), "-c", LOOKUP_SCRIPT, str(home), url, str(a.lookup_calls)],
        capture_output=True,
        text=True,
        env=ctx.env,
        timeout=300,
        check=False,
    )
    if res.returncode != 0:
        out["lookup_error"] = res.stderr[-800:]
    else:
        data = json.loads(res.stdout.strip().splitlines()[-1])
        times = data.pop("times_s")
        out["inproc"] = {
            **data,
            "n": len(times),
            "median_ms": statistics.median(times) * 1e3,
            "p95_ms": sorted(times)[int(0.95 * (len(times) - 1))] * 1e3,
            "max_ms": max(times) * 1e3,
        }
    # `modelcache path`: exit 0 when cached, 3 when not; then time the whole process
    miss = subprocess.run(
        [str(ctx.mc_bin), "--home", str(home), "path", url + ".not-cached"],
        capture_output=True,
        text=True,
        env=ctx.env,
        timeout=60,
        check=False,
    )
    hit = subprocess.run(
        [str(ctx.mc_bin), "--home", str(home), "path", url],
        capture_output=True,
        text=True,
        env=ctx.env,
        timeout=60,
        check=False,
    )
    out["path_hit_rc"], out["path_miss_rc"] = hit.returncode, miss.returncode
    out["path_prints_dir"] = hit.stdout.strip().splitlines()[-1:] == [str(model_dir)]
    out["path"] = _time_process([str(ctx.mc_bin), "--home", str(home), "path", url], a.path_runs, ctx)
    return out


def _time_process(argv: list[str], runs: int, ctx: Ctx) -> dict[str, Any]:
    """Whole-process latency: hyperfine (no shell) when present, else a subprocess loop."""
    export = ctx.work / "hyperfine-path.json"
    hf = shutil.which("hyperfine")
    if hf:
        cmd = " ".join(_shell_quote(x) for x in argv)
        r = subprocess.run(
            [
                hf,
                "-N",
                "--warmup",
                "3",
                "--runs",
                str(runs),
                "--export-json",
                str(export),
                "--style",
                "none",
                cmd,
            ],
            capture_output=True,
            text=True,
            env=ctx.env,
            timeout=600,
            check=False,
        )
        if r.returncode == 0:
            times = json.loads(export.read_text())["results"][0]["times"]
            return _latency_summary(times, "hyperfine -N")
    times = []
    for _ in range(runs + 3):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=ctx.env, timeout=60, check=False)
        times.append(time.perf_counter() - t0)
    return _latency_summary(times[3:], "subprocess loop")


def _latency_summary(times: list[float], method: str) -> dict[str, Any]:
    return {
        "method": method,
        "n": len(times),
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "times_s": times,
    }


def _shell_quote(s: str) -> str:
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------------
# summary, markdown, plot


def summarize(records: list[RunRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> tool -> medians over successful rounds, and the ratio to aria2c's throughput."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in SCENARIOS:
        for tool in TOOLS:
            recs = [r for r in records if r.scenario == sc and r.tool == tool]
            good = [r for r in recs if r.ok]
            if not recs:
                continue
            entry: dict[str, Any] = {"runs": len(recs), "ok_runs": len(good)}
            if good:
                wall = statistics.median(r.wall_s for r in good)
                entry.update(
                    median_s=wall,
                    min_s=min(r.wall_s for r in good),
                    max_s=max(r.wall_s for r in good),
                    median_mb_s=good[0].bytes / 1e6 / wall,
                    median_sync_s=statistics.median(r.sync_s for r in good),
                    median_cpu_s=statistics.median(r.cpu_s for r in good),
                    median_nginx_cpu_s=statistics.median(r.nginx_cpu_s for r in good),
                    median_other_cpu_s=statistics.median(r.other_cpu_s for r in good),
                    max_background_cores=max(r.background_cores for r in good),
                    peak_rss_mb=max(r.peak_rss_mb for r in good),
                    peak_tree_rss_mb=max(r.peak_tree_rss_mb for r in good),
                    connections=statistics.median(r.connections for r in good),
                    bytes=good[0].bytes,
                    files=good[0].files,
                )
            out.setdefault(sc, {})[tool] = entry
        base = out.get(sc, {}).get("aria2c", {}).get("median_s")
        for entry in out.get(sc, {}).values():
            if base and "median_s" in entry:
                entry["ratio_vs_aria2c"] = base / entry["median_s"]
    return out


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": cmd_version(["nginx", "-v"], r"nginx/\S+"),
        "aria2c": cmd_version(["aria2c", "--version"], r"aria2 version \S+"),
        "curl": cmd_version(["curl", "--version"], r"curl \S+"),
        "hyperfine": cmd_version(["hyperfine", "--version"]),
        "modelcache": _modelcache_version(),
        "modelcache_src": _source_digest(),
        "rate_cap_per_connection": f"{args.rate / MIB:g} MiB/s = {args.rate / 1e6:.1f} MB/s"
        if args.rate
        else "none",
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _source_digest() -> str:
    """sha256 over src/modelcache/**/*.py: ties a result to the code it measured (no commits yet)."""
    h = hashlib.sha256()
    for path in sorted((REPO_DIR / "src" / "modelcache").rglob("*.py")):
        h.update(path.relative_to(REPO_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _modelcache_version() -> str:
    r = subprocess.run(
        [str(VENV_BIN / "python"), "-c", "import modelcache; print(modelcache.__version__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return r.stdout.strip() or "unavailable"


def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    m, cfg, summ, warm = data["machine"], data["config"], data["summary"], data.get("warm")
    lines = [
        "# Cold pull and warm lookup benchmark",
        "",
        f"Generated by `bench/pull.py` on {m['date_utc']}"
        f"{' (**--quick run: small model, not the reference figures**)' if cfg['quick'] else ''}.",
        "Command: `" + cfg["command"] + "`",
        "",
        "## Machine and setup",
        "",
        f"- {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- {m['nginx']} (own config, loopback 127.0.0.1, `sendfile on`, keepalive), {m['aria2c']}, "
        f"{m['curl']}, {m['hyperfine']}, modelcache {m['modelcache']} (source digest {m['modelcache_src']})",
        f"- **per-connection rate cap: nginx `limit_rate {cfg['rate']}`** = {m['rate_cap_per_connection']}",
        f"- model: {cfg['large_files']} large files + {cfg['json_files']} json files, "
        f"{fmt_bytes(cfg['model_bytes'])} total; largest file {fmt_bytes(cfg['largest_bytes'])}",
        f"- {cfg['rounds']} round(s), tools alternate round-robin (start rotates every round), fresh output "
        f"directory / modelcache home for every run, deleted afterwards; before every run `sync`, then "
        f"wait up to {cfg['quiet_wait']:.0f}s for the machine to be idle (< {QUIET_CORES} busy cores; "
        f"measured before the runs: {_background_range(data['runs'])})",
        f"- modelcache: `--connections {cfg['connections']}` (and `MODELCACHE_CONNECTIONS`)"
        + (f", `MODELCACHE_CHUNK_SIZE={cfg['chunk_size']}`" if cfg["chunk_size"] else "")
        + f"; aria2c: `-x{cfg['connections']} -s{cfg['connections']} -k1M -j{cfg['jobs']} "
        "--file-allocation=none`; curl: one process, files back to back on one connection",
        "",
        "### What is compared, and why these scenarios",
        "",
        "modelcache's http source takes one URL per model (a single file or an archive), so a multi-file",
        "checkpoint is either served as loose files and pulled one URL per file, or served as one tar.",
        "We time (scenarios run here: " + ", ".join(cfg["scenarios"]) + "):",
        "",
        "- **largest**: the single largest file. Same URL, same bytes for every tool: the apples-to-apples",
        "  test of the ranged parallel engine against `aria2c -x16 -s16`.",
        f"- **set**: every file of the model. aria2c gets them all in one `-i` list (`-j{cfg['jobs']}` files",
        f"  at once); modelcache runs one `modelcache pull URL` per file, at most {cfg['jobs']} at a time",
        "  (what a launcher would do with `xargs -P`), so both tools have the same file-level concurrency.",
        "  curl fetches the files one after the other on one connection.",
        "- **archive**: the whole model as one uncompressed tar (one URL, KServe-style). modelcache pulls",
        "  it with ranged GETs, checks it and unpacks it into the model directory; aria2c downloads it",
        "  the same way, then `tar -x`; curl streams it into `tar -x`. Same end state: loose files on disk.",
        "",
        "Throughput is bytes / wall time of the tool process(es) (MB = 10^6 bytes). `+sync` is the extra",
        "time of an `os.sync()` right after the tool exits: aria2c and curl leave dirty pages behind,",
        "a cache that fsyncs before publishing pays that inside its own wall time.",
        "",
        "## Cold pull (median of rounds)",
        "",
        "| scenario | tool | median s | min-max s | MB/s | vs aria2c | +sync s | CPU s tool / nginx / other "
        "| peak RSS MB | conns | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc, tools in summ.items():
        for tool, e in tools.items():
            lines.append(
                f"| {sc} | {tool} | {_f(e.get('median_s'))} | {_f(e.get('min_s'))}-{_f(e.get('max_s'))} | "
                f"{_f(e.get('median_mb_s'), '.1f')} | {_f(e.get('ratio_vs_aria2c'), '.2f')}x | "
                f"{_f(e.get('median_sync_s'))} | {_f(e.get('median_cpu_s'), '.1f')} / "
                f"{_f(e.get('median_nginx_cpu_s'), '.1f')} / {_f(e.get('median_other_cpu_s'), '.1f')} | "
                f"{_f(e.get('peak_rss_mb'), '.1f')} | "
                f"{_f(e.get('connections'), '.0f')} | {e['ok_runs']}/{e['runs']} |"
            )
    lines += [
        "",
        "Peak RSS is the largest of any one tool process; CPU is user+sys summed over the tool's processes;",
        f"both from {cfg['rss_method']}. conns is the number of distinct TCP connections nginx saw.",
        '"other" CPU is the machine\'s busy time during the run in process context (irq/softirq left out)',
        "that was neither the tool, nginx nor this harness: other processes, kernel threads (writeback,",
        "journal) or VM steal. Values well above the tool's own CPU mean a disturbed run. The machine has",
        f"{data['machine']['nproc']} cores, so wall x {data['machine']['nproc']} is the CPU budget of a run.",
    ]
    lines += ["", *reading(summ, cfg, data["machine"]["nproc"])]
    failures = [r for r in data["runs"] if not r["ok"]]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- r{r['round']} {r['scenario']} {r['tool']}: {r['error'][:300]}" for r in failures]
    lines += ["", "## Warm lookup", ""]
    if not warm:
        lines.append(f"Not measured: {data.get('modelcache_skipped') or 'modelcache CLI unavailable'}.")
    elif "error" in warm:
        lines.append(f"Not measured: {warm['error']}")
    else:
        lines += [
            f"A {LOOKUP_FILES}-file model (one tar, {fmt_bytes(warm['archive_bytes'])}) is pulled once; "
            f"its model directory holds {warm.get('model_dir_files', '?')} files.",
            "",
            "| what | n | median ms | other |",
            "|---|---:|---:|---|",
        ]
        ip = warm.get("inproc")
        if ip:
            lines.append(
                f"| in-process `Store(root).lookup(url)` | {ip['n']} | {ip['median_ms']:.3f} | "
                f"p95 {ip['p95_ms']:.3f} ms, first call {ip['first_s'] * 1e3:.1f} ms, "
                f"`import modelcache.store` {ip['import_s'] * 1e3:.0f} ms |"
            )
        else:
            lines.append(f"| in-process lookup | - | - | failed: {warm.get('lookup_error', '')[-200:]} |")
        p = warm["path"]
        lines.append(
            f"| `modelcache path URL` whole process | {p['n']} | {p['median_ms']:.1f} | "
            f"min {p['min_ms']:.1f} ms, max {p['max_ms']:.1f} ms ({p['method']}); exit "
            f"{warm['path_hit_rc']} cached / {warm['path_miss_rc']} not cached |"
        )
    lines += ["", "## Targets", "", "| target | measured | met? |", "|---|---|---|"]
    for name, measured, met in data["targets"]:
        lines.append(f"| {name} | {measured} | {met} |")
    lines.append("")
    path.write_text("\n".join(lines))


def _background_range(runs: list[dict[str, Any]]) -> str:
    vals = [r["background_cores"] for r in runs]
    if not vals:
        return "-"
    busy = sum(v > QUIET_CORES for v in vals)
    med = statistics.median(vals)
    return f"median {med:.2f}, max {max(vals):.2f} cores; {busy}/{len(vals)} runs started busy"


def reading(summ: dict[str, Any], cfg: dict[str, Any], nproc: int) -> list[str]:
    """A few sentences derived from the numbers, so the table is read the same way every time."""
    out = ["### Reading the numbers", ""]
    for sc, tools in summ.items():
        curl, aria, mc = (tools.get(t, {}) for t in ("curl", "aria2c", "modelcache"))
        if "median_mb_s" in curl and cfg["rate_bytes"]:
            out.append(
                f"- {sc}: curl runs at {curl['median_mb_s']:.1f} MB/s, "
                f"{curl['median_mb_s'] / (cfg['rate_bytes'] / 1e6):.2f}x the per-connection cap"
                + (
                    f"; aria2c is {aria['median_mb_s'] / curl['median_mb_s']:.1f}x faster"
                    if "median_mb_s" in aria
                    else ""
                )
                + (
                    f", modelcache {mc['median_mb_s'] / curl['median_mb_s']:.1f}x"
                    if "median_mb_s" in mc
                    else ""
                )
                + "."
            )
        per_gb = []
        for tool in TOOLS:
            e = tools.get(tool, {})
            if "median_cpu_s" in e and e.get("bytes"):
                used = (e["median_cpu_s"] + e["median_nginx_cpu_s"]) / (e["median_s"] * nproc)
                per_gb.append(
                    f"{tool} {e['median_cpu_s'] / (e['bytes'] / 1e9):.2f} CPU-s/GB "
                    f"(tool + nginx = {used:.0%} of the {nproc} cores)"
                )
        if per_gb:
            out.append(f"- {sc}: " + "; ".join(per_gb) + ".")
    out += [
        "",
        "When tool + nginx use most of the cores, the client's CPU cost per byte, not the cap, sets the",
        f"pace: with {cfg['connections']} connections the cap alone would allow "
        + (
            f"{cfg['connections'] * cfg['rate_bytes'] / 1e6:.0f} MB/s per file."
            if cfg["rate_bytes"]
            else "any rate (no cap)."
        ),
    ]
    return out


def evaluate_targets(summ: dict[str, Any], warm: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**NOT met**")

    rows: list[tuple[str, str, str]] = []
    for sc in [sc for sc in SCENARIOS if sc in summ] or ["largest"]:
        ratio = summ.get(sc, {}).get("modelcache", {}).get("ratio_vs_aria2c")
        rows.append(
            (
                f"cold pull ({sc}) >= {TARGET_RATIO}x aria2c throughput",
                "-" if ratio is None else f"{ratio:.2f}x",
                verdict(None if ratio is None else ratio >= 0.9),
            )
        )
    ip = (warm or {}).get("inproc", {}).get("median_ms")
    rows.append(
        (
            f"warm lookup in-process <= {TARGET_LOOKUP_MS:.0f} ms (100-file model)",
            "-" if ip is None else f"{ip:.2f} ms",
            verdict(None if ip is None else ip <= TARGET_LOOKUP_MS),
        )
    )
    pp = (warm or {}).get("path", {}).get("median_ms")
    rows.append(
        (
            f"`modelcache path` whole process <= {TARGET_PATH_MS:.0f} ms",
            "-" if pp is None else f"{pp:.0f} ms",
            verdict(None if pp is None else pp <= TARGET_PATH_MS),
        )
    )
    rss = [e.get("peak_rss_mb") for sc in summ.values() for t, e in sc.items() if t == "modelcache"]
    rss = [r for r in rss if r is not None]
    peak = max(rss) if rss else None
    rows.append(
        (
            f"peak RSS of `modelcache pull` <= {TARGET_RSS_MB:.0f} MB",
            "-" if peak is None else f"{peak:.0f} MB",
            verdict(None if peak is None else peak <= TARGET_RSS_MB),
        )
    )
    return rows


def plot(path: Path, data: dict[str, Any]) -> None:
    """Throughput bars per tool and scenario (with the cap lines), and warm latency against targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, cfg, warm = data["summary"], data["config"], data.get("warm") or {}
    colors = {"modelcache": "#2a7ab9", "aria2c": "#e08a2c", "curl": "#8c8c8c"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    scen = [sc for sc in SCENARIOS if sc in summ]
    present = [t for t in TOOLS if any("median_mb_s" in summ[sc].get(t, {}) for sc in scen)]
    width = 0.8 / max(1, len(present))
    for j, tool in enumerate(present):
        xs, ys, lo, hi, notes = [], [], [], [], []
        for i, sc in enumerate(scen):
            e = summ[sc].get(tool, {})
            if "median_mb_s" in e:
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                ys.append(e["median_mb_s"])
                lo.append(e["median_mb_s"] - e["bytes"] / 1e6 / e["max_s"])  # slowest round
                hi.append(e["bytes"] / 1e6 / e["min_s"] - e["median_mb_s"])  # fastest round
                ratio = e.get("ratio_vs_aria2c")
                notes.append(
                    f"{e['median_mb_s']:.0f}" + (f"\n{ratio:.2f}x" if ratio and tool != "aria2c" else "")
                )
        bars = ax.bar(
            xs,
            ys,
            width,
            label=tool,
            color=colors[tool],
            yerr=[lo, hi],
            capsize=3,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
        )
        for b, y, up, note in zip(bars, ys, hi, notes, strict=True):
            ax.annotate(note, (b.get_x() + b.get_width() / 2, y + up), ha="center", va="bottom", fontsize=8)
    caps: list[tuple[float, str]] = []
    if cfg["rate_bytes"]:
        cap = cfg["rate_bytes"] / 1e6
        caps = [(cap, "cap x 1 conn"), (cap * cfg["connections"], f"cap x {cfg['connections']} conns")]
        for level, _text in caps:
            ax.axhline(level, color="black", ls=":", lw=0.8)
    ax.set_xticks(range(len(scen)))
    ax.set_xticklabels(
        [f"{sc}\n({fmt_bytes(summ[sc][next(iter(summ[sc]))].get('bytes', 0))})" for sc in scen]
    )
    ax.set_ylabel("median throughput, MB/s (higher is better)\nwhiskers: slowest and fastest round")
    ax.set_title(
        f"Cold pull from nginx, limit_rate {cfg['rate']} per connection, "
        f"{cfg['rounds']} round{'s' if cfg['rounds'] != 1 else ''}"
    )
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    if caps:  # labelled on a right-hand axis, where they cannot cover a bar's label
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks([lv for lv, _t in caps])
        right.set_yticklabels([f"{t}\n{lv:.0f} MB/s" for lv, t in caps], fontsize=7.5)
    ax.legend(loc="upper center", ncol=len(present), fontsize=9)
    ax.set_xlim(-0.5, len(scen) - 0.5)

    labels, vals, targets = [], [], []
    if warm.get("inproc"):
        labels.append("Store.lookup\nin-process")
        vals.append(warm["inproc"]["median_ms"])
        targets.append(TARGET_LOOKUP_MS)
    if warm.get("path"):
        labels.append("`modelcache path`\nwhole process")
        vals.append(warm["path"]["median_ms"])
        targets.append(TARGET_PATH_MS)
    if vals:
        bars = ax2.bar(range(len(vals)), vals, 0.5, color=colors["modelcache"])
        for i, (b, v, t) in enumerate(zip(bars, vals, targets, strict=True)):
            ax2.annotate(
                f"{v:.2f} ms" if v < 10 else f"{v:.0f} ms",
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=9,
            )
            ax2.hlines(t, i - 0.35, i + 0.35, colors="red", linestyles="--", lw=1.2)
            ax2.annotate(
                f"target {t:.0f} ms",
                (i, t),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
                color="red",
            )
        ax2.set_xticks(range(len(vals)))
        ax2.set_xticklabels(labels)
        ax2.set_ylim(0, max(max(vals), max(targets)) * 1.2)
    else:
        ax2.text(
            0.5,
            0.5,
            "warm lookup not measured\n(modelcache unavailable)",
            ha="center",
            va="center",
            transform=ax2.transAxes,
        )
        ax2.set_xticks([])
    ax2.set_ylabel("median latency, ms (lower is better)")
    ax2.set_title(f"Warm lookup, {LOOKUP_FILES}-file model")
    fig.suptitle(
        f"modelcache pull benchmark, {data['machine']['nproc']} cores, {data['machine']['date_utc']}"
        + ("  [--quick]" if cfg["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main


def find_modelcache() -> tuple[Path | None, str]:
    """The venv's modelcache CLI if it answers --help; else why not (the bench then runs without it)."""
    exe = VENV_BIN / "modelcache"
    if not exe.exists():
        return None, f"{exe} not found"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        return None, f"`modelcache --help` exited {r.returncode}: {(r.stderr or r.stdout).strip()[-200:]}"
    return exe, ""


def round_robin(tools: Sequence[str], rnd: int) -> list[str]:
    k = rnd % len(tools)
    return [*tools[k:], *tools[:k]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--size", type=parse_size, default=None, help="model size (default 2GiB, 256MiB with --quick)"
    )
    p.add_argument("--large-files", type=int, default=4, help="number of large files (default 4)")
    p.add_argument("--rate", default="20m", help="nginx limit_rate per connection, e.g. 20m; 0 = uncapped")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    p.add_argument(
        "--connections", type=int, default=16, help="connections per file for modelcache and aria2c"
    )
    p.add_argument(
        "--jobs", type=int, default=5, help="files at once in the 'set' scenario (aria2c's -j default)"
    )
    p.add_argument(
        "--chunk-size", default="", help="MODELCACHE_CHUNK_SIZE to pass (default: modelcache's own)"
    )
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of tools to time")
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma list of largest,set,archive (archive: the whole model as one tar, pulled and unpacked)",
    )
    p.add_argument("--lookup-calls", type=int, default=None, help="in-process lookups to time (default 200)")
    p.add_argument("--path-runs", type=int, default=None, help="`modelcache path` runs to time (default 20)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="seconds to wait for the machine to go idle (< 0.25 busy cores) before each run (default 20)",
    )
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip sha256 of outputs (size only)"
    )
    p.add_argument(
        "--no-digest", dest="digests", action="store_false", help="do not send Repr-Digest (sha-256) headers"
    )
    p.add_argument("--keep", action="store_true", help="keep downloaded outputs under bench/work/runs")
    p.add_argument("--report-only", action="store_true", help="re-render pull.md/png from pull.json only")
    p.add_argument("--quick", action="store_true", help="small smoke run: 256MiB, 1 round, fewer lookups")
    p.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work dir (generated model, nginx)")
    p.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where pull.{md,json,png} go")
    a = p.parse_args(argv)
    a.size = a.size or (256 * MIB if a.quick else 2 * 1024 * MIB)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.lookup_calls = a.lookup_calls or (50 if a.quick else 200)
    a.path_runs = a.path_runs or (5 if a.quick else 20)
    a.rate_text, a.rate = a.rate, parse_rate(a.rate)
    a.tools = [t for t in a.tools.split(",") if t]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    for t in a.tools:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    if not (1 <= a.rounds <= 50 and 1 <= a.connections <= 64 and 1 <= a.jobs <= 16):
        p.error("rounds 1..50, connections 1..64, jobs 1..16")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:  # re-render md and png from the last raw results, no measuring
        saved: dict[str, Any] = json.loads((args.results / "pull.json").read_text())
        write_markdown(args.results / "pull.md", saved)
        plot(args.results / "pull.png", saved)
        log(f"re-rendered {args.results / 'pull.md'} and pull.png from pull.json")
        return 0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    model = ensure_model(work, args.size, args.large_files)
    if "archive" in args.scenarios:
        ensure_archive(work, model)
    mc_bin, mc_why = find_modelcache() if "modelcache" in args.tools else (None, "not requested (--tools)")
    tools = [t for t in args.tools if t != "modelcache" or mc_bin is not None]
    if mc_why:
        log(f"modelcache skipped: {mc_why}")
    env = dict(os.environ)
    env["MODELCACHE_CONNECTIONS"] = str(args.connections)
    if args.chunk_size:
        env["MODELCACHE_CHUNK_SIZE"] = args.chunk_size
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)  # loopback only, never through a proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)  # urllib in this process too

    nginx = Nginx(work, model, args.rate, args.nginx_workers, args.digests)
    ctx = Ctx(args, model, nginx, work, mc_bin, env)
    records: list[RunRecord] = []
    warm: dict[str, Any] | None = None
    machine = machine_info(args)  # before the runs: the source digest is of the code measured
    nginx.start()
    log(f"nginx on {nginx.base_url}, limit_rate {args.rate_text}; model {fmt_bytes(model.total_bytes)}")
    try:
        for rnd in range(1, args.rounds + 1):
            for sc in args.scenarios:
                for tool in round_robin(tools, rnd - 1):
                    records.append(run_one(ctx, rnd, tool, sc))
        if mc_bin is not None:
            log("warm lookup")
            warm = warm_lookup(ctx)
            log(f"warm lookup: {json.dumps({k: v for k, v in warm.items() if k != 'path'})[:400]}")
    finally:
        nginx.stop()
        if not args.keep:
            shutil.rmtree(work / "runs", ignore_errors=True)

    summ = summarize(records)
    json_blobs = [f for f in model.files if f.name.endswith(".json")]
    data: dict[str, Any] = {
        "machine": machine,
        "config": {
            "command": " ".join(
                [".venv/bin/python bench/pull.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "quick": args.quick,
            "rss_method": rss_method(),
            "quiet_wait": args.quiet_wait,
            "rate": args.rate_text,
            "rate_bytes": args.rate,
            "rounds": args.rounds,
            "connections": args.connections,
            "jobs": args.jobs,
            "chunk_size": args.chunk_size,
            "large_files": args.large_files,
            "json_files": len(json_blobs),
            "model_bytes": model.total_bytes,
            "largest_bytes": model.largest.size,
            "tools": tools,
            "scenarios": args.scenarios,
            "files": [asdict(f) for f in model.files],
        },
        "modelcache_skipped": mc_why,
        "runs": [asdict(r) for r in records],
        "summary": summ,
        "warm": warm,
    }
    data["targets"] = evaluate_targets(summ, warm)
    res = args.results
    (res / "pull.json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(res / "pull.md", data)
    plot(res / "pull.png", data)
    log(f"wrote {res / 'pull.md'}, {res / 'pull.json'}, {res / 'pull.png'}")
    for name, measured, met in data["targets"]:
        log(f"target: {name}: {measured} {met}")
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
