"""Controller at scale: N Nodes x M LocalModelCaches on a real kube-apiserver.

Why this shape: the controller's cost grows with nodes x caches (one LocalModelNode entry and one
nodeStatus entry per pair), so the benchmark puts every cache on every node: 1,000 x 100 means
1,000 LocalModelNodes of 100 entries and 100 caches with 1,000-node statuses. It measures a cold
start (all objects exist, the controller starts) to steady state (a reconcile pass with nothing to
write, everything verified by listing), and, as a second phase, one new cache reaching every node.
Peak RSS of the controller process is sampled throughout.

Starts its own control plane (etcd + kube-apiserver via modelcache.dev) in a temp dir, 127.0.0.1
only. Writes bench/results/controller.md. Run: `.venv/bin/python bench/controller.py`
(`--nodes 200 --caches 20` for a smaller run). Targets: <= 60 s and <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from lightkube import AsyncClient, KubeConfig
from lightkube.generic_resource import create_global_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node
from lightkube.types import PatchType

from modelcache.dev import down, up

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "controller.md"
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 300.0
LMGroup = create_global_resource(
    "serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups"
)
LMCache = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
LMNode = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNode", "localmodelnodes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def gather_limited(coros: list[Any], limit: int = 32) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Any) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def make_node(client: AsyncClient, name: str) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await client.create(
        Node(metadata=ObjectMeta(name=name, labels={"kubernetes.io/hostname": name, "pool": "bench"}))
    )
    cond = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    await client.patch(Node.Status, name, {"status": {"conditions": [cond]}}, patch_type=PatchType.MERGE)


def cache_body(i: int) -> LMCache:
    return LMCache(
        {
            "metadata": {"name": f"model-{i:03d}"},
            "spec": {
                "sourceModelUri": f"s3://bench/models/model-{i:03d}",
                "modelSize": "1Gi",
                "nodeGroups": ["bench"],
            },
        }
    )


async def populate(kubeconfig: Path, nodes: int, caches: int) -> float:
    client = AsyncClient(KubeConfig.from_file(kubeconfig), field_manager="bench", trust_env=False)
    started = time.monotonic()
    # A KServe install has the download-job namespace; dev up creates only `default` and `kserve`.
    await client.create(Namespace(metadata=ObjectMeta(name="kserve-localmodel-jobs")))
    await gather_limited([make_node(client, f"node-{i:04d}") for i in range(nodes)])
    group = LMGroup(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "storageLimit": "100Ti",
                "persistentVolumeClaimSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Ti"}},
                },
                "persistentVolumeSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "capacity": {"storage": "1Ti"},
                    "local": {"path": "/models"},
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["bench"]}]}
                            ]
                        }
                    },
                },
            },
        }
    )
    await client.create(group)
    await gather_limited([client.create(cache_body(i)) for i in range(caches)])
    await client.close()
    return time.monotonic() - started


def readyz(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


async def verify(kubeconfig: Path, nodes: int, caches: int) -> tuple[bool, str]:
    """Every node has every cache; every cache reports every node."""
    client = AsyncClient(KubeConfig.from_file(kubeconfig), field_manager="bench", trust_env=False)
    try:
        lmns = [o async for o in client.list(LMNode)]
        full = sum(1 for o in lmns if len(o["spec"]["localModels"]) == caches)
        statuses = [o async for o in client.list(LMCache)]
        complete = sum(
            1
            for o in statuses
            if (o.get("status") or {}).get("copies", {}).get("total") == nodes
            and len((o.get("status") or {}).get("nodeStatus") or {}) == nodes
        )
    finally:
        await client.close()
    ok = len(lmns) == nodes and full == nodes and complete == len(statuses) == caches
    return (
        ok,
        f"{len(lmns)} LocalModelNodes, {full} with all {caches} entries; {complete}/{caches} caches complete",
    )


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.1)


def wait_converged(port: int, proc: subprocess.Popen[bytes], after_pass: int, timeout: float) -> float:
    """Seconds until /readyz reports a pass later than `after_pass` with nothing left to write."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"controller exited with {proc.returncode}")
        text = readyz(port)
        if "converged=True" in text:
            passes = int(text.split("passes=")[1].split()[0])
            if passes > after_pass:
                return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"not converged after {timeout:.0f}s")


def current_pass(port: int) -> int:
    text = readyz(port)
    return int(text.split("passes=")[1].split()[0]) if "passes=" in text else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--caches", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="modelcache-bench-controller-"))
    print(f"control plane in {home}", file=sys.stderr)
    info = up(home, nodes=0, progress=lambda m: print(m, file=sys.stderr))
    proc: subprocess.Popen[bytes] | None = None
    try:
        populate_s = asyncio.run(populate(info.kubeconfig, args.nodes, args.caches))
        print(
            f"created {args.nodes} nodes, 1 group, {args.caches} caches in {populate_s:.1f}s", file=sys.stderr
        )
        port = free_port()
        log = (home / "controller.log").open("wb")
        env = {**os.environ, "KUBECONFIG": str(info.kubeconfig), "NO_PROXY": "127.0.0.1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache.cli.controller", "--namespace", "kserve", "--health-port",
             str(port), "--health-host", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        sampler = RssSampler(proc.pid)
        sampler.start()
        cold_s = wait_converged(port, proc, 0, args.timeout)
        ok, detail = asyncio.run(verify(info.kubeconfig, args.nodes, args.caches))
        print(f"cold start to steady state: {cold_s:.1f}s ({detail})", file=sys.stderr)

        # Phase 2: one more cache must reach every node.
        before = current_pass(port)

        async def add_one() -> None:
            client = AsyncClient(
                KubeConfig.from_file(info.kubeconfig), field_manager="bench", trust_env=False
            )
            await client.create(cache_body(args.caches))
            await client.close()

        t0 = time.monotonic()
        asyncio.run(add_one())
        wait_converged(port, proc, before, args.timeout)
        add_s = time.monotonic() - t0
        ok2, detail2 = asyncio.run(verify(info.kubeconfig, args.nodes, args.caches + 1))
        print(f"one more cache to steady state: {add_s:.1f}s ({detail2})", file=sys.stderr)
        sampler.stopped.set()
        sampler.join()
        peak_mb = sampler.peak / 2**20
        cpu = psutil.Process(proc.pid).cpu_times()
        print(f"controller peak RSS {peak_mb:.0f} MB, CPU {cpu.user + cpu.system:.1f}s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        down(home)

    met_time = cold_s <= TARGET_SECONDS
    met_rss = peak_mb <= TARGET_RSS_MB
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        f"""# Controller at scale

`.venv/bin/python bench/controller.py --nodes {args.nodes} --caches {args.caches}` on {platform.node()}
({os.cpu_count()} cores, Python {platform.python_version()}), kube-apiserver 1.20.2 + etcd on 127.0.0.1,
{dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}.

Every cache is on every node (one node group selecting all {args.nodes} nodes): {args.nodes} LocalModelNodes
of {args.caches} entries, {args.caches} caches with {args.nodes}-node statuses, the PV/PVC pairs and the agent
DaemonSet. Steady state = a reconcile pass with nothing left to write, then verified by listing.

| measure | value | target | met |
|---|---|---|---|
| cold start to steady state | {cold_s:.1f} s | <= {TARGET_SECONDS:.0f} s | {"yes" if met_time else "no"} |
| one new cache onto all {args.nodes} nodes | {add_s:.1f} s | | |
| controller peak RSS | {peak_mb:.0f} MB | <= {TARGET_RSS_MB:.0f} MB | {"yes" if met_rss else "no"} |
| controller CPU time (whole run) | {cpu.user + cpu.system:.1f} s | | |
| creating the objects (not the controller) | {populate_s:.1f} s | | |

Verification: {detail} (after phase 2: {detail2}).
The machine is shared with other engineers' test runs, so wall times carry noise.
"""
    )
    print(f"wrote {args.output}", file=sys.stderr)
    if ok and ok2:
        shutil.rmtree(home, ignore_errors=True)  # kept on failure: controller.log and server logs
        return 0
    print(f"logs kept in {home}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
