"""The node agent against a real apiserver: a subprocess under its own RBAC, origins on 127.0.0.1.

No controller: each test writes the LocalModelNode itself, as the controller would.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client
from lightkube.generic_resource import create_global_resource
from lightkube.models.core_v1 import Container, PersistentVolumeClaimVolumeSource, PodSpec, Volume
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret
from lightkube.types import PatchType

from modelcache.dev import ControlPlaneInfo
from modelcache.transfer import read_staging_summary
from modelcache.uri import storage_key
from tests.support.origin import Origin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NODE = "dev-node-1"
GROUP = "agent-e2e-workers"  # not "workers": the seed manifests create that one in the same cluster
JOB_NS = "kserve-localmodel-jobs"
USER = "modelcache-agent-e2e"
MiB = 1 << 20

LMN = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNode", "localmodelnodes")
LMNG = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelNodeGroup", "localmodelnodegroups")
CSC = create_global_resource(
    "serving.kserve.io", "v1alpha1", "ClusterStorageContainer", "clusterstoragecontainers"
)


# -- helpers -------------------------------------------------------------------------------------
def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def random_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def make_tar(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def entry(name: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"modelName": name, "sourceModelUri": uri, "nodeGroup": GROUP, **extra}


class AgentProc:
    """`modelcache agent` as a process; its log file is kept for secret-leak checks."""

    def __init__(
        self, kubeconfig: Path, root: Path, log: Path, *args: str, env: dict[str, str] | None = None
    ):
        self.kubeconfig, self.root, self.log, self.args = kubeconfig, root, log, list(args)
        self.port = free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        for k in list(env):
            if k.startswith(("MODELCACHE_", "AWS_", "HF_")) or k in (
                "KUBECONFIG",
                "http_proxy",
                "https_proxy",
            ):
                env.pop(k)
        env.update(
            NODE_NAME=NODE,
            MODELCACHE_HOME=str(self.root),
            KUBECONFIG=str(self.kubeconfig),
            PYTHONPATH=str(REPO / "src"),
            MODELCACHE_RETRIES="1",
            MODELCACHE_RETRY_BASE="0.05",
            MODELCACHE_READ_TIMEOUT="3",
            MODELCACHE_CONNECT_TIMEOUT="2",
            MODELCACHE_CONNECTIONS="2",
            NO_PROXY="127.0.0.1",
        )
        env.update(self.extra_env)
        argv = [
            sys.executable,
            "-m",
            "modelcache.cli.agent",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.port),
            "--resync",
            "1",
            "--progress-interval",
            "0.5",
            "--retry-base",
            "0.5",
            "--retry-cap",
            "2",
            "--reserve",
            "0",
            *self.args,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def reconciles(self) -> float:
        _status, text = self.http("/metrics")
        for line in text.splitlines():
            if line.startswith("modelcache_agent_reconciles_total "):
                return float(line.split()[1])
        return 0.0

    def settle(self, passes: int = 2, timeout: float = 20.0) -> None:
        """Wait until the agent has run `passes` more full reconciles (a positive signal, not a sleep)."""
        start = self.reconciles()
        wait_for(f"{passes} reconcile passes", lambda: self.reconciles() >= start + passes, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlaneInfo, kube: Client) -> Path:
    """The agent's RBAC from deploy/rbac/agent.yaml, bound to a minted user instead of the SA."""
    for ns in (JOB_NS, "default", "kserve"):
        kube.apply(Namespace(metadata=ObjectMeta(name=ns)), field_manager="e2e", force=True)
    from lightkube import codecs

    credentials = (REPO / "deploy/rbac/job-namespace/agent-credentials.yaml").read_text()
    job_docs = [
        {**d, "metadata": {**d["metadata"], "namespace": JOB_NS}} for d in yaml.safe_load_all(credentials)
    ]
    for doc in [*yaml.safe_load_all((REPO / "deploy/rbac/agent.yaml").read_text()), *job_docs]:
        if doc["kind"] == "ServiceAccount":
            continue
        if doc["kind"].endswith("Binding"):
            doc["subjects"] = [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}]
        kube.apply(codecs.from_dict(doc), field_manager="e2e", force=True)
    kube.apply(
        LMNG(
            metadata=ObjectMeta(name=GROUP),
            spec={
                "storageLimit": "10Mi",
                "persistentVolumeSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "capacity": {"storage": "10Mi"},
                    "local": {"path": "/models"},
                    "storageClassName": "local-storage",
                },
                "persistentVolumeClaimSpec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "10Mi"}},
                    "storageClassName": "local-storage",
                },
            },
        ),
        field_manager="e2e",
        force=True,
    )
    kubeconfig: Path = control_plane.mint_user(USER)
    return kubeconfig


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    (tmp_path / "origin").mkdir()
    with Origin(tmp_path / "origin") as o:
        yield o


@pytest.fixture
def lmn(kube: Client) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """Set this node's LocalModelNode entries (created on first use, deleted afterwards)."""

    def put(models: list[dict[str, Any]]) -> None:
        kube.apply(
            LMN(metadata=ObjectMeta(name=NODE), spec={"localModels": models}),
            field_manager="e2e-controller",
            force=True,
        )

    yield put
    with contextlib.suppress(ApiError):
        kube.delete(LMN, NODE)


@pytest.fixture
def agents(agent_kubeconfig: Path, tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[AgentProc] = []

    def start(root: Path | None = None, *args: str, env: dict[str, str] | None = None) -> AgentProc:
        a = AgentProc(agent_kubeconfig, root or tmp_path / "cache", tmp_path / "agent.log", *args, env=env)
        a.start()
        started.append(a)
        return a

    start.started = started  # type: ignore[attr-defined]
    yield start
    for a in started:
        a.stop()


def started_agents(agents: Any) -> list[AgentProc]:
    result: list[AgentProc] = agents.started
    return result


def node_status(kube: Client) -> dict[str, Any]:
    try:
        obj = kube.get(LMN, NODE)
    except ApiError:
        return {}
    return dict(obj.get("status") or {})


def model_state(kube: Client, name: str) -> tuple[str | None, dict[str, Any]]:
    st = node_status(kube)
    return (st.get("modelStatus") or {}).get(name), (st.get("models") or {}).get(name) or {}


def wait_phase(kube: Client, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        got, detail = model_state(kube, name)
        return detail if got == phase else None

    try:
        result: dict[str, Any] = wait_for(f"{name} -> {phase}", check, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status now: {node_status(kube)}") from None
    return result


# -- tests ---------------------------------------------------------------------------------------
def test_download_refetch_and_verify(
    kube: Client, origin: Origin, lmn: Any, agents: Any, tmp_path: Path
) -> None:
    """Seed flow for one node, entries sharing a URI, then a deleted and a corrupted model heal."""
    files = {"config.json": b'{"a": 1}', "weights/model.bin": random_bytes(3 * MiB, 1)}
    make_tar(origin.root / "llm.tar", files)
    (origin.root / "single.bin").write_bytes(random_bytes(MiB, 2))
    tar_uri, single_uri = origin.url_for("llm.tar"), origin.url_for("single.bin")
    root = tmp_path / "cache"
    agent = agents(root, "--verify-interval", "2", "--verify-gap", "0")
    lmn(
        [
            entry("llm", tar_uri),
            {**entry("llm", tar_uri), "namespace": "team-a"},
            entry("single", single_uri),
        ]
    )
    for name in ("llm", "team-a/llm", "single"):
        detail = wait_phase(kube, name, "ModelDownloaded")
        assert detail["bytesDone"] == detail["bytesTotal"] > 0
        assert detail["storageKey"] and detail.get("finishedAt") and "lastError" not in detail
    key = storage_key(tar_uri)
    model = root / "models" / key
    assert (model / "weights" / "model.bin").read_bytes() == files["weights/model.bin"]
    assert (root / "models" / storage_key(single_uri) / "single.bin").stat().st_size == MiB
    assert origin.request_count("GET", "/llm.tar") >= 1
    tar_bytes = origin.bytes_sent_for("/llm.tar")
    assert tar_bytes <= (origin.root / "llm.tar").stat().st_size * 1.1  # one download for both entries

    status, text = agent.http("/metrics")
    assert status == 200 and 'modelcache_agent_downloaded_bytes_total{scheme="http"}' in text
    assert 'modelcache_agent_downloads_total{outcome="success"} 2.0' in text
    assert agent.http("/healthz")[0] == 200 and agent.http("/readyz")[0] == 200

    # Deleted by hand -> fetched again.
    import shutil

    shutil.rmtree(model)
    wait_for("re-fetch after rm -rf", lambda: (model / "weights" / "model.bin").exists(), 30)
    wait_phase(kube, "llm", "ModelDownloaded")

    # Corrupted in place (same size: only the scheduled sha256 verify can tell) -> fetched again.
    target = model / "weights" / "model.bin"
    before = origin.request_count("GET", "/llm.tar")
    with target.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    wait_for(
        "re-fetch after corruption",
        lambda: (
            origin.request_count("GET", "/llm.tar") > before
            and target.exists()
            and target.read_bytes() == files["weights/model.bin"]
        ),
        40,
    )
    _, text = agent.http("/metrics")
    assert 'modelcache_agent_verify_failures_total{kind="full"}' in text


def test_origin_down_then_up(kube: Client, origin: Origin, lmn: Any, agents: Any) -> None:
    (origin.root / "m.bin").write_bytes(random_bytes(2 * MiB, 3))
    uri = origin.url_for("m.bin")
    origin.stop()
    agents()
    lmn([entry("flaky", uri)])
    detail = wait_phase(kube, "flaky", "ModelDownloadError")
    assert detail["attempts"] >= 1 and detail["lastError"]
    origin.start()
    detail = wait_phase(kube, "flaky", "ModelDownloaded", timeout=40)
    assert detail["attempts"] >= 2 and "lastError" not in detail


def test_budget_too_small_is_reported_without_thrashing(
    kube: Client, origin: Origin, lmn: Any, agents: Any
) -> None:
    (origin.root / "big.bin").write_bytes(random_bytes(12 * MiB, 4))  # the group allows 10Mi
    agent = agents()
    lmn([entry("big", origin.url_for("big.bin"))])
    detail = wait_phase(kube, "big", "ModelDownloadError")
    assert "storageLimit" in detail["lastError"] and "12.0 MiB" in detail["lastError"], detail
    agent.settle(3)  # resyncs: the decision must hold, not loop into downloads
    assert model_state(kube, "big")[0] == "ModelDownloadError"
    assert origin.request_count("GET", "/big.bin") == 0


def test_killed_mid_download_resumes(kube: Client, tmp_path: Path, lmn: Any, agents: Any) -> None:
    size = 6 * MiB
    (tmp_path / "slow").mkdir()
    with Origin(tmp_path / "slow", rate_limit=700 * 1024) as slow:
        (slow.root / "w.bin").write_bytes(random_bytes(size, 5))
        uri = slow.url_for("w.bin")
        root = tmp_path / "cache"
        first = agents(root)
        lmn([entry("resume", uri)])
        staging = root / ".modelcache" / "staging" / storage_key(uri)

        def durable() -> int:
            summary = read_staging_summary(staging)
            return summary.done_bytes if summary else 0

        def in_progress() -> dict[str, Any] | None:
            phase, detail = model_state(kube, "resume")
            return detail if phase == "ModelDownloading" and detail.get("bytesDone") else None

        detail = wait_for("progress in status", in_progress, 30)
        assert detail["bytesTotal"] == size and detail["attempts"] == 1 and detail["startedAt"]
        wait_for("a third downloaded", lambda: durable() >= size // 3, 30)
        first.kill()
        done = durable()
        sent_before = slow.bytes_sent_for("/w.bin")
        agents(root)
        wait_phase(kube, "resume", "ModelDownloaded", timeout=40)
        sent_after = slow.bytes_sent_for("/w.bin") - sent_before
        assert sent_after <= size - done + MiB, (sent_after, done)
        assert (root / "models" / storage_key(uri) / "w.bin").read_bytes() == random_bytes(size, 5)
        # Restarted again with the model complete: adopted from disk, nothing fetched.
        gets = slow.request_count("GET", "/w.bin")
        for a in started_agents(agents):
            a.stop()
        agents(root).settle(2)
        assert model_state(kube, "resume")[0] == "ModelDownloaded"
        assert slow.request_count("GET", "/w.bin") == gets


def test_eviction_only_when_needed_and_never_mounted_or_referenced(
    kube: Client, origin: Origin, lmn: Any, agents: Any, tmp_path: Path
) -> None:
    for i, name in enumerate("abcd"):
        (origin.root / f"{name}.bin").write_bytes(random_bytes(3 * MiB, 10 + i))
    uris = {n: origin.url_for(f"{n}.bin") for n in "abcd"}
    root = tmp_path / "cache"
    agent = agents(root)
    lmn([entry(f"m-{n}", uris[n]) for n in "abc"])
    for n in "abc":
        wait_phase(kube, f"m-{n}", "ModelDownloaded")
    # A pod on this node mounts m-a through KServe's PVC name <cache>-<group>; it never runs.
    kube.create(
        Pod(
            metadata=ObjectMeta(name="uses-m-a", namespace="default"),
            spec=PodSpec(
                nodeName=NODE,
                containers=[Container(name="c", image="busybox")],
                volumes=[
                    Volume(
                        name="model",
                        persistentVolumeClaim=PersistentVolumeClaimVolumeSource(claimName=f"m-a-{GROUP}"),
                    )
                ],
            ),
        )
    )
    try:
        lmn([entry("m-c", uris["c"])])  # a and b are no longer wanted...
        agent.settle(3)  # ...and stay on disk through resyncs: nothing needs the space
        assert all((root / "models" / storage_key(uris[n])).is_dir() for n in "abc")
        assert set(node_status(kube).get("modelStatus") or {}) == {"m-c"}
        lmn([entry("m-c", uris["c"]), entry("m-d", uris["d"])])  # 12 MiB wanted+cached > 10Mi
        wait_phase(kube, "m-d", "ModelDownloaded")
        assert not (root / "models" / storage_key(uris["b"])).exists()  # unreferenced, unmounted: evicted
        assert (root / "models" / storage_key(uris["a"])).is_dir()  # mounted by a pod: kept
        assert (root / "models" / storage_key(uris["c"])).is_dir()  # referenced: kept
    finally:
        kube.delete(Pod, "uses-m-a", namespace="default", grace_period=0)


def test_credentials_from_cluster_storage_container(
    kube: Client, tmp_path: Path, lmn: Any, agents: Any
) -> None:
    token = "tok-" + os.urandom(12).hex()
    (tmp_path / "private").mkdir()
    with Origin(tmp_path / "private", token=token) as private:
        (private.root / "p.bin").write_bytes(random_bytes(MiB, 6))
        uri = private.url_for("p.bin")
        kube.apply(
            Secret(
                metadata=ObjectMeta(name="origin-token", namespace=JOB_NS),
                data={"token": base64.b64encode(token.encode()).decode()},
            ),
            field_manager="e2e",
            force=True,
        )
        kube.apply(
            CSC(
                metadata=ObjectMeta(name="local-origin"),
                spec={
                    "container": {
                        "name": "storage-initializer",
                        "image": "kserve/storage-initializer:latest",
                        "env": [
                            {
                                "name": "MODELCACHE_HTTP_BEARER_TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": "origin-token", "key": "token"}},
                            }
                        ],
                    },
                    "supportedUriFormats": [{"prefix": f"{private.url}/"}],
                    "workloadType": "localModelDownloadJob",
                },
            ),
            field_manager="e2e",
            force=True,
        )
        try:
            agents()
            lmn([entry("private", uri)])
            wait_phase(kube, "private", "ModelDownloaded")
            # Now a wrong token: the failure is reported, and the token still appears nowhere.
            kube.patch(
                Secret,
                "origin-token",
                {"data": {"token": base64.b64encode(b"wrong-" + token.encode()).decode()}},
                namespace=JOB_NS,
                patch_type=PatchType.MERGE,
            )
            (private.root / "q.bin").write_bytes(random_bytes(MiB, 7))
            lmn([entry("private", uri), entry("denied", private.url_for("q.bin"))])
            detail = wait_phase(kube, "denied", "ModelDownloadError")
            assert "denied" in detail["lastError"] or "401" in detail["lastError"]
        finally:
            kube.delete(CSC, "local-origin")
        status_text = json.dumps(node_status(kube))
        events = " ".join(
            f"{e.reason} {e.message}"
            for e in kube.list(Event, namespace="default")
            if e.involvedObject.name == NODE
        )
        log_text = (tmp_path / "agent.log").read_text(errors="replace")
        assert "Downloaded" in events
        for text in (status_text, events, log_text):
            assert token not in text


def test_service_account_secret_and_delete_unreferenced(
    kube: Client, tmp_path: Path, lmn: Any, agents: Any
) -> None:
    """KServe's service-account path (an https-host/headers secret), and --delete-unreferenced."""
    from lightkube.models.core_v1 import ObjectReference
    from lightkube.resources.core_v1 import ServiceAccount

    token = "sa-" + os.urandom(12).hex()
    (tmp_path / "sa").mkdir()
    with Origin(tmp_path / "sa", token=token) as private:
        for n in ("x", "y"):
            (private.root / f"{n}.bin").write_bytes(random_bytes(MiB, 20 + ord(n)))
        headers = json.dumps({"Authorization": f"Bearer {token}"})
        kube.apply(
            Secret(
                metadata=ObjectMeta(name="origin-headers", namespace=JOB_NS),
                stringData={"https-host": "127.0.0.1", "headers": headers},
            ),
            field_manager="e2e",
            force=True,
        )
        kube.apply(
            ServiceAccount(
                metadata=ObjectMeta(name="model-reader", namespace=JOB_NS),
                secrets=[ObjectReference(name="origin-headers")],
            ),
            field_manager="e2e",
            force=True,
        )
        root = tmp_path / "cache"
        agents(root, "--delete-unreferenced")
        uris = {n: private.url_for(f"{n}.bin") for n in ("x", "y")}
        lmn([entry(f"sa-{n}", uris[n], serviceAccountName="model-reader") for n in ("x", "y")])
        for n in ("x", "y"):
            wait_phase(kube, f"sa-{n}", "ModelDownloaded")
        lmn([entry("sa-y", uris["y"], serviceAccountName="model-reader")])
        gone = root / "models" / storage_key(uris["x"])
        wait_for("the unreferenced model deleted at once", lambda: not gone.exists(), 20)
        assert (root / "models" / storage_key(uris["y"])).is_dir()
    log_text = (tmp_path / "agent.log").read_text(errors="replace")
    assert token not in log_text and token not in json.dumps(node_status(kube))
