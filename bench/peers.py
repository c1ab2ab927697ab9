"""Node-to-node fill on a simulated network: N agents want one model at once.

    sudo .venv/bin/python bench/peers.py            # default run, ~5 min
    sudo .venv/bin/python bench/peers.py --quick    # peers only, N = 1, 2, 4

The benchmark builds its own network and removes it at the end (also on error or Ctrl-C):
a bridge `mcpeer0`, one network namespace per agent plus one for the origin (`mcpeer-*`), veth
pairs `mcpv*` on the bridge, addresses in 10.213.0.0/24 only, no default route, and `tc tbf`
shaping: the origin's uplink at ~40 MB/s (a WAN link or a per-client origin cap) and every node
link at ~200 MB/s each way. The processes talk to each other only on that bridge; the controller
drives them through pipes, so the host needs no address on it.

Each agent is the engine in its own process (`agent` subcommand): a PeerServer on its address, and
`engine.pull` with the other agents as peers (or none, for the baseline). Scenarios:
* peers and baseline for N = 1, 2, 4, 8: origin bytes sent (from the origin's own counter) and the
  time from "go" until every agent has published the model;
* kill -9 of agent 1 when it has half the model: the others still finish;
* agent 1 serves corrupted bytes (a relay that flips one byte per response, honest manifests):
  every other agent still publishes exactly the origin's bytes.
Results: bench/results/peers.md, peers.json, peers.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1 << 20
BRIDGE = "mcpeer0"
NS_PREFIX = "mcpeer-"
VETH_PREFIX = "mcpv"
SUBNET = "10.213.0"
ORIGIN_IP = f"{SUBNET}.2"
ORIGIN_PORT = 8000
PEER_PORT = 8477
TOKEN = "bench-peer-token"  # a throwaway secret for a throwaway network
ORIGIN_RATE = "320mbit"  # ~40 MB/s
NODE_RATE = "1600mbit"  # ~200 MB/s
SCENARIO_TIMEOUT = 240.0


def agent_ip(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


# ------------------------------------------------------------------------------------------------
# Network (root only; every name carries our prefix, every address is in 10.213.0.0/24)
# ------------------------------------------------------------------------------------------------
def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns_sh(ns: str, *args: str) -> None:
    sh("ip", "netns", "exec", ns, *args)


class Network:
    def __init__(self, agents: int) -> None:
        self.agents = agents
        self.namespaces: list[str] = []

    def __enter__(self) -> Network:
        teardown()  # leftovers of an interrupted run, by our names only
        try:
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "link", "set", BRIDGE, "up")
            self._node("origin", 0, ORIGIN_IP, up=ORIGIN_RATE, down=NODE_RATE)
            for i in range(1, self.agents + 1):
                self._node(f"n{i}", i, agent_ip(i), up=NODE_RATE, down=NODE_RATE)
        except BaseException:
            teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        teardown()

    def _node(self, name: str, idx: int, ip: str, *, up: str, down: str) -> None:
        ns = NS_PREFIX + name
        host, inner = f"{VETH_PREFIX}{idx}", f"{VETH_PREFIX}{idx}i"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        ns_sh(ns, "ip", "link", "set", inner, "name", "eth0")
        ns_sh(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns_sh(ns, "ip", "link", "set", "eth0", "up")
        ns_sh(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "set", host, "master", BRIDGE, "up")
        # Egress shaping both ways: in the namespace (its upload), on the host end (its download).
        ns_sh(
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            up,
            "burst",
            "1mb",
            "latency",
            "200ms",
        )
        sh("tc", "qdisc", "add", "dev", host, "root", "tbf", "rate", down, "burst", "1mb", "latency", "200ms")


def teardown() -> None:
    """Remove everything this benchmark creates (and nothing else: only our prefixes)."""
    for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ", 1)[0].strip()
        if name.startswith(NS_PREFIX):
            sh("ip", "netns", "pids", name, check=False)
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        dev = line.split(":", 2)[1].strip().split("@", 1)[0] if ":" in line else ""
        if dev.startswith(VETH_PREFIX):
            sh("ip", "link", "del", dev, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


# ------------------------------------------------------------------------------------------------
# Origin process: a Range-capable static file server that counts body bytes sent
# ------------------------------------------------------------------------------------------------
async def origin_main(root: Path) -> None:
    from aiohttp import web

    sent = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        path = root / request.match_info["name"]
        if not path.is_file() or "/" in request.match_info["name"]:
            return web.Response(status=404)
        size = path.stat().st_size
        etag = f'"{size:x}-{int(path.stat().st_mtime_ns):x}"'
        start, stop, status = 0, size, 200
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, stop, status = int(a), min(size, int(b) + 1) if b else size, 206
        resp = web.StreamResponse(status=status)
        resp.headers.update({"ETag": etag, "Accept-Ranges": "bytes"})
        resp.content_length = stop - start
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        with open(path, "rb") as fh:
            pos = start
            while pos < stop:
                data = os.pread(fh.fileno(), min(256 * 1024, stop - pos), pos)
                await resp.write(data)
                pos += len(data)
                sent += len(data)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ORIGIN_IP, ORIGIN_PORT).start()
    print("READY", flush=True)
    reader = await _stdin_reader()
    while line := (await reader.readline()).decode().strip():
        if line == "stats":
            print(json.dumps({"bytes": sent}), flush=True)
        elif line == "reset":
            sent = 0
    await runner.cleanup()


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# ------------------------------------------------------------------------------------------------
# Agent process: the engine with peers, plus a peer server
# ------------------------------------------------------------------------------------------------
async def agent_main(args: argparse.Namespace) -> None:
    from tests.support.corrupting_relay import CorruptingRelay

    from modelcache import engine
    from modelcache.peer.server import PeerServer
    from modelcache.peer.source import swarm
    from modelcache.store import Store
    from modelcache.transfer import ProgressEvent, TransferConfig
    from modelcache.uri import parse_uri

    store = Store(args.home)
    store.ensure()
    ip = args.me.rsplit(":", 1)[0]
    if args.corrupt:  # the real server inside, a byte-flipping relay on the address peers use
        server = PeerServer(store, TOKEN, host="127.0.0.1", port=PEER_PORT)
        await server.start()
        relay = CorruptingRelay(("127.0.0.1", PEER_PORT), (ip, PEER_PORT))
        await relay.start()
    else:
        server = PeerServer(store, TOKEN, host=ip, port=PEER_PORT)
        await server.start()
    print("READY", flush=True)
    reader = await _stdin_reader()
    if (await reader.readline()).decode().strip() != "go":
        return
    key = parse_uri(args.url).key
    peers = [(p, TOKEN) for p in args.peer]
    sw = swarm(key, peers, args.me) if peers else None
    config = TransferConfig(piece_hashes=True, peers=sw)
    done = 0

    def on_event(ev: ProgressEvent) -> None:
        nonlocal done
        if ev.kind == "advance":
            done += ev.nbytes

    async def report() -> None:
        while True:
            print(f"P {done}", flush=True)
            await asyncio.sleep(0.25)

    reporter = asyncio.create_task(report())
    t0 = time.monotonic()
    try:
        result = await engine.pull(store, args.url, config=config, on_event=on_event)
        seconds = time.monotonic() - t0
        m = store.manifest(result.record.key)
        out = {
            "seconds": seconds,
            "sha256": m.files[0].sha256,
            "peer_bytes": sw.peer_bytes if sw else 0,
            "origin_bytes": sw.origin_bytes if sw else result.bytes_fetched,
            "path": str(result.record.path),
        }
        print("DONE " + json.dumps(out), flush=True)
    except Exception as exc:
        print("FAIL " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    finally:
        reporter.cancel()
    while await reader.readline():  # keep serving peers until the controller says stop (EOF)
        pass
    await server.stop()


# ------------------------------------------------------------------------------------------------
# Controller
# ------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    scenario: str
    n: int
    model_bytes: int
    origin_bytes: int
    all_ready_s: float | None
    per_agent_s: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    published_ok: bool = True
    note: str = ""


class Proc:
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.progress = 0
        self.result: dict[str, Any] | None = None
        self.failure: str | None = None
        self.done = asyncio.Event()

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.proc.stdin.write((line + "\n").encode())
            await self.proc.stdin.drain()

    async def expect(self, word: str, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"{self.name} exited before {word}")
                if line.startswith(word):
                    return line[len(word) :].strip()

    async def follow(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            if line.startswith("P "):
                self.progress = int(line[2:])
            elif line.startswith("DONE "):
                self.result = json.loads(line[5:])
                self.done.set()
            elif line.startswith("FAIL "):
                self.failure = json.loads(line[5:])["error"]
                self.done.set()
        self.done.set()


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "*"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    return env


async def spawn(ns: str, name: str, *args: str) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    return Proc(name, proc)


async def run_scenario(
    scenario: str,
    n: int,
    *,
    peers: bool,
    model: Path,
    work: Path,
    kill_first: bool = False,
    corrupt_first: bool = False,
) -> Outcome:
    url = f"http://{ORIGIN_IP}:{ORIGIN_PORT}/{model.name}"
    size = model.stat().st_size
    origin = await spawn(NS_PREFIX + "origin", "origin", "origin", "--root", str(model.parent))
    agents: list[Proc] = []
    try:
        await origin.expect("READY")
        for i in range(1, n + 1):
            home = work / f"{scenario}-{n}-n{i}"
            others = [f"{agent_ip(j)}:{PEER_PORT}" for j in range(1, n + 1) if j != i] if peers else []
            args = ["agent", "--home", str(home), "--url", url, "--me", f"{agent_ip(i)}:{PEER_PORT}"]
            args += [a for p in others for a in ("--peer", p)]
            if corrupt_first and i == 1:
                args.append("--corrupt")
            agents.append(await spawn(NS_PREFIX + f"n{i}", f"n{i}", *args))
        for a in agents:
            await a.expect("READY")
        followers = [asyncio.create_task(a.follow()) for a in agents]
        t0 = time.monotonic()
        for a in agents:
            await a.send("go")
        killed = ""
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            if kill_first:
                while agents[0].progress < size // 2 and not agents[0].done.is_set():
                    await asyncio.sleep(0.05)
                if not agents[0].done.is_set():
                    agents[0].proc.send_signal(signal.SIGKILL)
                    killed = f"n1 killed at {agents[0].progress / MiB:.0f} MiB"
            waiting = agents[1:] if kill_first else agents
            await asyncio.gather(*(a.done.wait() for a in waiting))
        all_ready = time.monotonic() - t0
        await origin.send("stats")
        sent = await _origin_bytes(origin)
        want = hashlib.sha256()
        with open(model, "rb") as fh:
            while block := fh.read(16 * MiB):
                want.update(block)
        ok = True
        for a in waiting:
            if a.result is None:
                ok = False
                continue
            on_disk = hashlib.sha256(Path(a.result["path"], model.name).read_bytes()).hexdigest()
            ok = ok and a.result["sha256"] == want.hexdigest() == on_disk
        for a in agents:
            await a.send("")
            if a.proc.stdin is not None:
                a.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await asyncio.gather(*followers, return_exceptions=True)
        return Outcome(
            scenario=scenario,
            n=n,
            model_bytes=size,
            origin_bytes=sent,
            all_ready_s=round(all_ready, 2),
            per_agent_s=[round(a.result["seconds"], 2) for a in waiting if a.result],
            failed=[f"{a.name}: {a.failure}" for a in waiting if a.failure],
            published_ok=ok,
            note=killed,
        )
    finally:
        for p in [*agents, origin]:
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            with contextlib.suppress(Exception):
                await p.proc.wait()
        for home in work.glob(f"{scenario}-{n}-*"):
            shutil.rmtree(home, ignore_errors=True)


async def _origin_bytes(origin: Proc) -> int:
    assert origin.proc.stdout is not None
    async with asyncio.timeout(10):
        while True:
            line = (await origin.proc.stdout.readline()).decode().strip()
            if line.startswith("{"):
                return int(json.loads(line)["bytes"])
            if not line:
                raise RuntimeError("origin exited")


def write_model(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(16 * MiB, left)
            fh.write(os.urandom(n))
            left -= n


def report(outcomes: list[Outcome], out_dir: Path, model_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    single = next((o.all_ready_s for o in outcomes if o.scenario == "peers" and o.n == 1), None)
    lines = [
        "# Node-to-node fill (bench/peers.py)",
        "",
        f"Model {model_size / MiB:.0f} MiB, one file, no source checksum (so the peer attest path runs);",
        "origin uplink tbf 320 Mbit/s (~40 MB/s), node links tbf 1600 Mbit/s (~200 MB/s) each way; one",
        "network namespace per agent + origin on a private bridge (10.213.0.0/24, no default route).",
        "Each agent is `engine.pull` in its own process with a PeerServer; 2 shared CPU cores.",
        "",
        "| scenario | N | origin bytes / model | all ready (s) | vs peers N=1 | per-agent (s) | published ok "
        "| note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        ratio = o.origin_bytes / o.model_bytes
        rel = f"{o.all_ready_s / single:.2f}x" if single and o.all_ready_s else "-"
        agents = ", ".join(f"{s:.1f}" for s in o.per_agent_s)
        note = "; ".join([o.note, *o.failed]).strip("; ")
        lines.append(
            f"| {o.scenario} | {o.n} | {ratio:.3f} | {o.all_ready_s} | {rel} | {agents} | "
            f"{'yes' if o.published_ok else 'NO'} | {note} |"
        )
    (out_dir / "peers.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for scenario, style in (("peers", "o-"), ("baseline", "s--")):
        pts = sorted((o.n, o) for o in outcomes if o.scenario == scenario)
        if not pts:
            continue
        ns = [n for n, _ in pts]
        ax1.plot(ns, [o.origin_bytes / o.model_bytes for _, o in pts], style, label=scenario)
        ax2.plot(ns, [o.all_ready_s or 0 for _, o in pts], style, label=scenario)
    ax1.set_xlabel("agents wanting the model at once (N)")
    ax1.set_ylabel("origin bytes sent / model size")
    ax1.axhline(1.05, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("N")
    ax2.set_ylabel("seconds until all N are ready")
    if single:
        ax2.axhline(1.5 * single, color="grey", lw=0.8, ls=":")
    for ax in (ax1, ax2):
        ax.set_xticks([1, 2, 4, 8])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Node-to-node fill, {model_size / MiB:.0f} MiB model, origin ~40 MB/s, links ~200 MB/s")
    fig.tight_layout()
    fig.savefig(out_dir / "peers.png", dpi=100)


async def controller(args: argparse.Namespace) -> list[Outcome]:
    sizes = args.n or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    every = ["peers", "baseline", "kill-first", "corrupt-first"]
    wanted = set(args.scenario or (["peers"] if args.quick else every))
    work = Path(
        tempfile.mkdtemp(prefix="mcpeer-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    outcomes: list[Outcome] = []
    try:
        model = work / "origin" / "model.bin"
        model.parent.mkdir()
        write_model(model, args.size_mib * MiB)
        with Network(max([*sizes, 4])):
            for scenario in ("peers", "baseline"):
                for n in sizes if scenario in wanted else []:
                    peers = scenario == "peers"
                    outcomes.append(await run_scenario(scenario, n, peers=peers, model=model, work=work))
                    print(outcomes[-1], flush=True)
            for scenario in ("kill-first", "corrupt-first"):
                if scenario in wanted:
                    flag = "kill_first" if scenario == "kill-first" else "corrupt_first"
                    run = run_scenario(scenario, 4, peers=True, model=model, work=work, **{flag: True})
                    outcomes.append(await run)
                    print(outcomes[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd")
    o = sub.add_parser("origin")
    o.add_argument("--root", type=Path, required=True)
    a = sub.add_parser("agent")
    a.add_argument("--home", type=Path, required=True)
    a.add_argument("--url", required=True)
    a.add_argument("--me", required=True)
    a.add_argument("--peer", action="append", default=[])
    a.add_argument("--corrupt", action="store_true")
    parser.add_argument("--quick", action="store_true", help="peers only, N = 1, 2, 4")
    parser.add_argument("--n", type=int, action="append", help="agents at once (repeatable)")
    parser.add_argument(
        "--scenario", action="append", choices=["peers", "baseline", "kill-first", "corrupt-first"]
    )
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.cmd == "origin":
        asyncio.run(origin_main(args.root))
        return 0
    if args.cmd == "agent":
        asyncio.run(agent_main(args))
        return 0
    if os.geteuid() != 0:
        print("bench/peers.py needs root (network namespaces, veths, tc)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            print(f"bench/peers.py needs `{tool}` (iproute2)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        outcomes = asyncio.run(controller(args))
    finally:
        teardown()
    report(outcomes, args.out, args.size_mib * MiB)
    print((args.out / "peers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
