"""Two node agents fill each other through a real apiserver: peers found from LocalModelNode
statuses and Node InternalIPs (127.0.0.2 and 127.0.0.3, one peer port for both, as on real
nodes), under the agent's own RBAC from deploy/rbac/agent.yaml. No controller: the test writes the
LocalModelNodes and Nodes itself. The second agent must take the model from the first, not the origin.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client, codecs
from lightkube.generic_resource import create_global_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node
from lightkube.types import PatchType

from modelcache.dev import ControlPlaneInfo
from modelcache.uri import storage_key
from tests.support.origin import Origin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
USER = "modelcache-agent-peers-e2e"
NODES = {"peer-e2e-a": "127.0.0.2", "peer-e2e-b": "127.0.0.3"}
TOKEN = "e2e-peer-token"
MiB = 1 << 20
LMN = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNode", "localmodelnodes")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(control_plane: ControlPlaneInfo, kube: Client) -> Iterator[Path]:
    """The agent's RBAC bound to a minted user; two Nodes with InternalIPs on loopback."""
    for ns in ("default", "kserve", "kserve-localmodel-jobs"):
        kube.apply(Namespace(metadata=ObjectMeta(name=ns)), field_manager="e2e", force=True)
    for doc in yaml.safe_load_all((REPO / "deploy/rbac/agent.yaml").read_text()):
        if doc["kind"] == "ServiceAccount":
            continue
        if doc["kind"].endswith("Binding"):
            doc["subjects"] = [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}]
        doc["metadata"]["name"] = doc["metadata"]["name"] + "-peers-e2e"
        if doc["kind"].endswith("Binding"):
            doc["roleRef"]["name"] = doc["roleRef"]["name"] + "-peers-e2e"
        kube.apply(codecs.from_dict(doc), field_manager="e2e", force=True)
    for name, ip in NODES.items():
        kube.apply(Node(metadata=ObjectMeta(name=name)), field_manager="e2e", force=True)
        addresses = {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
        kube.patch(Node.Status, name, addresses, patch_type=PatchType.MERGE)
    yield control_plane.mint_user(USER)
    for name in NODES:
        with contextlib.suppress(ApiError):
            kube.delete(LMN, name)
        with contextlib.suppress(ApiError):
            kube.delete(Node, name)


def start_agent(
    kubeconfig: Path, node: str, root: Path, log: Path, peer_port: int
) -> subprocess.Popen[bytes]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_") and "proxy" not in k.lower()
    }
    env.update(
        NODE_NAME=node,
        MODELCACHE_HOME=str(root),
        KUBECONFIG=str(kubeconfig),
        PYTHONPATH=str(REPO / "src"),
        MODELCACHE_RETRIES="2",
        MODELCACHE_RETRY_BASE="0.05",
        MODELCACHE_CONNECTIONS="4",
        MODELCACHE_PEER_TOKEN=TOKEN,
        NO_PROXY="*",
    )
    argv = [sys.executable, "-m", "modelcache.cli.agent", "--metrics-host", "127.0.0.1"]
    argv += [
        "--metrics-port",
        str(free_port()),
        "--resync",
        "1",
        "--progress-interval",
        "0.5",
        "--reserve",
        "0",
    ]
    argv += ["--peer-port", str(peer_port), "--peer-host", NODES[node]]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)


def status_of(kube: Client, node: str, model: str) -> str | None:
    try:
        obj = kube.get(LMN, node)
    except ApiError:
        return None
    status: dict[str, Any] = getattr(obj, "status", None) or {}
    value = (status.get("modelStatus") or {}).get(model)
    return str(value) if value else None


def test_second_agent_fills_from_the_first(cluster: Path, kube: Client, tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    data = os.urandom(24 * MiB)
    (tmp_path / "origin" / "m.bin").write_bytes(data)
    peer_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with Origin(tmp_path / "origin") as origin:
        url = origin.url_for("/m.bin")
        entry = {"modelName": "peer-model", "sourceModelUri": url}
        try:
            for node in NODES:
                kube.apply(
                    LMN(metadata=ObjectMeta(name=node), spec={"localModels": [entry]}),
                    field_manager="e2e",
                    force=True,
                )
            a, b = list(NODES)
            procs.append(start_agent(cluster, a, tmp_path / "a", tmp_path / "a.log", peer_port))
            wait_for("node a downloaded", lambda: status_of(kube, a, "peer-model") == "ModelDownloaded")
            first = origin.bytes_sent_for("/m.bin")
            assert first >= len(data)
            procs.append(start_agent(cluster, b, tmp_path / "b", tmp_path / "b.log", peer_port))
            wait_for("node b downloaded", lambda: status_of(kube, b, "peer-model") == "ModelDownloaded")
            # B's bytes came from A: the origin sent only B's HEAD and no body beyond A's copy.
            assert origin.bytes_sent_for("/m.bin") - first < len(data) // 20
            key = storage_key(url)
            assert (tmp_path / "b" / "models" / key / "m.bin").read_bytes() == data
            log_b = (tmp_path / "b.log").read_text()
            assert "1 peer(s) hold or fetch it" in log_b
            assert TOKEN not in log_b and TOKEN not in (tmp_path / "a.log").read_text()
        finally:
            for p in procs:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=15)
                if p.poll() is None:
                    p.kill()
                    p.wait()
