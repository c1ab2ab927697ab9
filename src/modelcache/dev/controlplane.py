"""A local Kubernetes control plane (etcd + kube-apiserver) for e2e tests and `modelcache dev up`.

No kubelet, scheduler or controller-manager: our node agents run as local processes, so the apiserver
is all we need. (`up(real_node=...)` adds a real worker and the controllers pods need, with the
apiserver on the node bridge instead of loopback: see `realnode`.) Everything lives under `<home>/dev/`:

    pki/           CA, serving cert, admin client cert, service-account key pair
    etcd/          etcd data (wiped on every fresh start)
    logs/          etcd.log, kube-apiserver.log (kept after `down`, for post-mortems)
    users/         kubeconfigs minted for other users (RBAC tests)
    kubeconfig     admin (system:masters) kubeconfig
    state.json     pids, process groups, ports: lets `down`/`status` work from any process
    node/          the real node's containerd, kubelet, CNI and helm files (only with a real node)

Consequences of having no controller-manager, worth knowing when writing tests: namespaces never
finish terminating, ownerReferences are not garbage-collected, Jobs never run, service-account
tokens are not created. The ServiceAccount and StorageObjectInUseProtection admission plugins are
off, so pods need no token and PV/PVC deletion is not blocked by finalizers nobody would remove.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from lightkube import ApiError, Client, KubeConfig

from modelcache.errors import ConflictError, ModelcacheError, NotFoundError, UsageError

from . import bootstrap as boot
from . import components, realnode
from .pki import CertKey, Pki
from .processes import ProcessRecord, free_port, is_alive, log_tail, spawn, stop

STATE_VERSION = 1
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
MAX_NODES = 100
DEFAULT_TIMEOUT = 120.0
#: kube-apiserver admission plugins that only work together with kube-controller-manager.
DISABLED_ADMISSION_PLUGINS = ("ServiceAccount", "StorageObjectInUseProtection")
CONTEXT_NAME = "modelcache-dev"

Progress = Callable[[str], None]


class ControlPlaneError(ModelcacheError):
    """The control plane could not be started, reached or stopped (exit 1).

    `message` is one line for humans; `detail` carries the server log's tail for tests and --debug.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class BinaryMissingError(ControlPlaneError):
    """kube-apiserver or etcd is not installed where we look."""


class NotRunningError(NotFoundError):
    """No control plane is recorded under this home (exit 3)."""


# --- locations ------------------------------------------------------------------------------------


def default_home() -> Path:
    """`$MODELCACHE_HOME`, else `~/.cache/modelcache` (DESIGN.md)."""
    env = os.environ.get("MODELCACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelcache"


def k8s_dir() -> Path:
    """Where scripts/build-kube-apiserver.sh caches the binary."""
    env = os.environ.get("MODELCACHE_K8S_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelcache" / "k8s"


BUILD_HINT = "run scripts/build-kube-apiserver.sh (builds it from Debian's kubernetes source, ~5 min)"


def find_kube_apiserver() -> Path:
    """`$MODELCACHE_KUBE_APISERVER`, else the build script's cache, else PATH."""
    env = os.environ.get("MODELCACHE_KUBE_APISERVER")
    candidates = [Path(env)] if env else [k8s_dir() / "kube-apiserver"]
    if not env and (on_path := shutil.which("kube-apiserver")):
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BinaryMissingError(f"kube-apiserver not found at {candidates[0]}: {BUILD_HINT}")


def find_etcd() -> Path:
    """`$MODELCACHE_ETCD`, else Debian's /usr/bin/etcd (package etcd-server), else PATH."""
    env = os.environ.get("MODELCACHE_ETCD")
    candidates = [Path(env)] if env else [Path("/usr/bin/etcd")]
    if not env and (on_path := shutil.which("etcd")):
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BinaryMissingError(
        f"etcd not found at {candidates[0]}: apt-get install etcd-server (or {BUILD_HINT})"
    )


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "modelcache").is_dir():
            return parent
    return None


def reference_dir() -> Path | None:
    """`$MODELCACHE_REFERENCE_DIR`, else `<repo>/../shared/reference` (tests' seed documents only)."""
    env = os.environ.get("MODELCACHE_REFERENCE_DIR")
    if env:
        return Path(env).expanduser()
    root = repo_root()
    if root is not None and (root.parent / "shared" / "reference").is_dir():
        return root.parent / "shared" / "reference"
    return None


def default_manifest_dirs() -> list[Path]:
    """KServe-side CRDs, then ours, both shipped in the package (no source tree or `../shared` needed).

    `$MODELCACHE_REFERENCE_DIR` adds `<dir>/kserve-crds` after the shipped KServe copies (so a newer
    KServe copy can be tried); ours still come last and replace same-named ones.
    """
    from modelcache import data

    dirs = [data.kserve_crds_dir()]
    env = os.environ.get("MODELCACHE_REFERENCE_DIR")
    if env and (Path(env).expanduser() / "kserve-crds").is_dir():
        dirs.append(Path(env).expanduser() / "kserve-crds")
    return [*dirs, data.crds_dir()]


@dataclass(frozen=True)
class Layout:
    """Paths of one control plane under `<home>/dev/`."""

    home: Path

    @property
    def dir(self) -> Path:
        return self.home / "dev"

    @property
    def pki(self) -> Pki:
        return Pki(self.dir / "pki")

    @property
    def etcd_data(self) -> Path:
        return self.dir / "etcd"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def users(self) -> Path:
        return self.dir / "users"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def node_dir(self) -> Path:
        return self.dir / "node"


# --- kubeconfig -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, cred: CertKey, user: str) -> Path:
    """A self-contained kubeconfig (certificates embedded), readable by the owner only."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT_NAME, "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(cred.cert_pem),
                    "client-key-data": _b64(cred.key_pem),
                },
            }
        ],
        "contexts": [{"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": user}}],
        "current-context": CONTEXT_NAME,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def client_for(kubeconfig: Path, field_manager: str = boot.FIELD_MANAGER) -> Client:
    """A lightkube client for a kubeconfig, ignoring proxy variables (the server is on loopback)."""
    return Client(
        KubeConfig.from_file(kubeconfig),
        field_manager=field_manager,
        trust_env=False,
    )


# --- state ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlPlaneInfo:
    """A running control plane, as recorded in `<home>/dev/state.json`."""

    home: Path
    server: str
    kubeconfig: Path
    apiserver_port: int
    etcd_url: str
    apiserver: ProcessRecord
    etcd: ProcessRecord
    nodes: tuple[str, ...] = ()
    crds: tuple[str, ...] = ()
    started_at: str = ""
    ready: bool = False
    real_node: Mapping[str, Any] | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    @property
    def logs(self) -> Path:
        return self.layout.logs

    def client(self, kubeconfig: Path | None = None) -> Client:
        """A lightkube client: admin by default, or for a kubeconfig from `mint_user`."""
        return client_for(kubeconfig or self.kubeconfig)

    def mint_client_cert(self, user: str, groups: Sequence[str] = ()) -> CertKey:
        """A client certificate (CN=user, O=groups) this apiserver trusts."""
        return self.layout.pki.mint_client(user, groups)

    def mint_user(self, user: str, groups: Sequence[str] = (), path: Path | None = None) -> Path:
        """Write a kubeconfig for `user` in `groups` and return its path.

        The user has no rights until RBAC grants some, which is what controller tests need.
        """
        if not user:
            raise UsageError("user name must not be empty")
        cred = self.mint_client_cert(user, groups)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", user)
        target = path or self.layout.users / f"{safe}.kubeconfig"
        return write_kubeconfig(target, self.server, self.layout.pki.ca_cert.read_bytes(), cred, user)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "home": str(self.home),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "apiserver_port": self.apiserver_port,
            "etcd_url": self.etcd_url,
            "apiserver": self.apiserver.to_json(),
            "etcd": self.etcd.to_json(),
            "nodes": list(self.nodes),
            "crds": list(self.crds),
            "started_at": self.started_at,
            "ready": self.ready,
            **({"real_node": dict(self.real_node)} if self.real_node is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControlPlaneInfo:
        return cls(
            home=Path(data["home"]),
            server=str(data["server"]),
            kubeconfig=Path(data["kubeconfig"]),
            apiserver_port=int(data["apiserver_port"]),
            etcd_url=str(data["etcd_url"]),
            apiserver=ProcessRecord.from_json(data["apiserver"]),
            etcd=ProcessRecord.from_json(data["etcd"]),
            nodes=tuple(data.get("nodes", ())),
            crds=tuple(data.get("crds", ())),
            started_at=str(data.get("started_at", "")),
            ready=bool(data.get("ready", False)),
            real_node=data.get("real_node") if isinstance(data.get("real_node"), dict) else None,
        )


def _write_state(layout: Layout, data: Mapping[str, Any]) -> None:
    layout.dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.state.with_name(".state.json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, layout.state)


def _read_state(layout: Layout) -> dict[str, Any] | None:
    try:
        data = json.loads(layout.state.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ControlPlaneError(f"{layout.state}: unreadable ({exc}); remove it and retry") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ControlPlaneError(f"{layout.state}: unknown format; remove it and retry")
    return data


def _recorded_processes(data: Mapping[str, Any]) -> list[ProcessRecord]:
    """Every process a (possibly half-written) state records: our components, the real node's, then
    apiserver, etcd."""
    servers = [
        ProcessRecord.from_json(data[k]) for k in ("apiserver", "etcd") if isinstance(data.get(k), dict)
    ]
    node = realnode.processes(data["real_node"]) if isinstance(data.get("real_node"), dict) else []
    return [*components.records_from_state(data), *node, *servers]


def _start_components(
    layout: Layout, info: ControlPlaneInfo, before: Mapping[str, Any], say: Progress
) -> None:
    """Start (or keep) the controller, webhook and one agent per simulated node; record them for `down`.

    With a real node the chart runs the controller and webhook as pods; only the simulated nodes'
    agents run as local processes.
    """
    running = {r.name: r for r in components.records_from_state(before)}
    simulated = [n for n in info.nodes if n != realnode.NODE_NAME]
    with info.client() as client:
        records = components.start(
            client,
            info.kubeconfig,
            simulated,
            lambda node: layout.dir / "nodes" / node,
            layout.logs,
            running,
            say,
            operator=info.real_node is None,
        )
    state = info.to_json()
    state["components"] = [r.to_json() for r in records]
    _write_state(layout, state)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit while we start, so the failure path undoes what is half done.

    Python's default is to die on the spot, which would leave a real node's host changes in place
    (`dev down` still undoes them from the record). Main thread only (signals need it).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """One `up`/`down` at a time per home (local dev directory, so flock is fine here)."""
    layout.dir.mkdir(parents=True, exist_ok=True)
    with layout.lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- health ---------------------------------------------------------------------------------------

_NO_PROXY = urllib.request.ProxyHandler({})


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, str]:
    handlers: list[urllib.request.BaseHandler] = [_NO_PROXY]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _admin_ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return ctx


def etcd_healthy(url: str) -> bool:
    try:
        code, body = _get(f"{url}/health")
    except (OSError, urllib.error.URLError):
        return False
    return code == 200 and '"health":"true"' in body.replace(" ", "")


def apiserver_ready(server: str, pki: Pki) -> bool:
    """GET /readyz as admin: ok once etcd, RBAC bootstrap roles and the CRD informers are up."""
    try:
        code, body = _get(f"{server}/readyz", _admin_ssl_context(pki))
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False
    return code == 200 and body.strip() == "ok"


class _StartFailed(ControlPlaneError):
    def __init__(self, message: str, detail: str, port_in_use: bool) -> None:
        super().__init__(message, detail)
        self.port_in_use = port_in_use


def _wait(
    what: str, proc: subprocess.Popen[bytes], record: ProcessRecord, check: Callable[[], bool], timeout: float
) -> None:
    """Wait for `check()`; fail fast, with the log's tail, if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc.poll() is not None:
            tail = log_tail(record.log)
            raise _StartFailed(
                f"{what} exited with code {proc.returncode} during start; see {record.log}",
                tail,
                port_in_use="address already in use" in tail,
            )
        if time.monotonic() > deadline:
            raise _StartFailed(
                f"{what} not ready after {timeout:.0f}s; see {record.log}",
                log_tail(record.log),
                port_in_use=False,
            )
        time.sleep(0.2)


# --- up / down / status ---------------------------------------------------------------------------


def _etcd_argv(etcd: Path, layout: Layout, client_port: int, peer_port: int) -> list[str]:
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"http://127.0.0.1:{client_port}"
    return [
        str(etcd),
        "--name=modelcache-dev",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=modelcache-dev={peer}",
        "--initial-cluster-state=new",
        "--logger=zap",
        "--log-outputs=stderr",
    ]


def _apiserver_argv(
    apiserver: Path, layout: Layout, port: int, etcd_url: str, real: bool = False
) -> list[str]:
    """Loopback-only flags for the quick playground; with `real`, what pods on a real node need."""
    pki = layout.pki
    host = realnode.NODE_IP if real else "127.0.0.1"
    common = [
        str(apiserver),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={host}",
        f"--secure-port={port}",
        "--insecure-port=0",
        f"--advertise-address={host}",
        f"--cert-dir={pki.dir}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
        "--profiling=false",
    ]
    if real:
        # Default endpoint reconciler (the bridge IP is a valid endpoint), all default admission
        # plugins (the controller-manager runs), kubelets reached by IP, never by resolving names.
        return [*common, "--authorization-mode=Node,RBAC", "--kubelet-preferred-address-types=InternalIP"]
    return [
        *common,
        "--authorization-mode=RBAC",
        f"--disable-admission-plugins={','.join(DISABLED_ADMISSION_PLUGINS)}",
        # The default "lease" reconciler would publish 127.0.0.1 as the kubernetes service endpoint,
        # which Endpoints validation rejects (loopback) and logs forever.
        "--endpoint-reconciler-type=none",
    ]


def _child_env(drop_prefix: str) -> dict[str, str]:
    """Our environment minus variables that would silently reconfigure the server (e.g. ETCD_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefix)}
    if drop_prefix == "ETCD_" and platform.machine().lower() in {"aarch64", "arm64"}:
        env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
    return env


def _clean_runtime(layout: Layout, keep_logs: bool = True) -> None:
    """Remove what belongs to one run: state, kubeconfigs, PKI, etcd data (logs stay)."""
    for path in (layout.state, layout.kubeconfig):
        path.unlink(missing_ok=True)
    for directory in (layout.etcd_data, layout.pki.dir, layout.users):
        shutil.rmtree(directory, ignore_errors=True)
    if not keep_logs:
        shutil.rmtree(layout.logs, ignore_errors=True)


def _stop_all(records: Sequence[ProcessRecord], timeout: float = 15.0) -> list[str]:
    stopped = []
    for record in records:
        if is_alive(record):
            stopped.append(record.name)
        stop(record, timeout)
    return stopped


def _start_servers(
    layout: Layout,
    apiserver_bin: Path,
    etcd_bin: Path,
    timeout: float,
    progress: Progress,
    extra_state: Callable[[], Mapping[str, Any]] = dict,
) -> ControlPlaneInfo:
    """Start etcd then kube-apiserver on fresh free ports; retry when a port was taken meanwhile."""
    last_error: ControlPlaneError | None = None
    for _attempt in range(3):
        shutil.rmtree(layout.etcd_data, ignore_errors=True)
        extra = dict(extra_state())
        real = "real_node" in extra
        host = realnode.NODE_IP if real else "127.0.0.1"
        client_port, peer_port, api_port = free_port(), free_port(), free_port(host)
        while len({client_port, peer_port, api_port}) < 3:
            peer_port, api_port = free_port(), free_port(host)
        etcd_url = f"http://127.0.0.1:{client_port}"
        server = f"https://{host}:{api_port}"
        state: dict[str, Any] = {
            **extra,
            "version": STATE_VERSION,
            "home": str(layout.home),
            "server": server,
            "kubeconfig": str(layout.kubeconfig),
            "apiserver_port": api_port,
            "etcd_url": etcd_url,
            "ready": False,
        }
        records: list[ProcessRecord] = []
        try:
            etcd_proc, etcd_rec = spawn(
                "etcd",
                _etcd_argv(etcd_bin, layout, client_port, peer_port),
                layout.logs / "etcd.log",
                _child_env("ETCD_"),
            )
            records.append(etcd_rec)
            state["etcd"] = etcd_rec.to_json()
            _write_state(layout, state)  # recorded at once: `down` can clean up even if we die now
            _wait("etcd", etcd_proc, etcd_rec, functools.partial(etcd_healthy, etcd_url), timeout)
            progress(f"etcd ready on {etcd_url} (pid {etcd_rec.pid})")

            api_proc, api_rec = spawn(
                "kube-apiserver",
                _apiserver_argv(apiserver_bin, layout, api_port, etcd_url, real),
                layout.logs / "kube-apiserver.log",
                _child_env("KUBE_"),
            )
            records.insert(0, api_rec)
            state["apiserver"] = api_rec.to_json()
            _write_state(layout, state)
            _wait(
                "kube-apiserver",
                api_proc,
                api_rec,
                functools.partial(apiserver_ready, server, layout.pki),
                timeout,
            )
            progress(f"kube-apiserver ready on {server} (pid {api_rec.pid})")
            return ControlPlaneInfo.from_json(state)
        except _StartFailed as exc:
            _stop_all(records)
            last_error = exc
            if not exc.port_in_use:
                break
            progress("a port was taken meanwhile; retrying on other ports")
        except BaseException:
            _stop_all(records)
            raise
    assert last_error is not None
    raise ControlPlaneError(last_error.message, last_error.detail)


def _bootstrap(
    info: ControlPlaneInfo, nodes: int, manifest_dirs: Sequence[Path], timeout: float
) -> ControlPlaneInfo:
    with info.client() as client:
        try:
            crds, names = boot.bootstrap(client, manifest_dirs, nodes, timeout)
        except ApiError as exc:
            raise ControlPlaneError(f"bootstrapping the apiserver failed: {exc.status.message}") from exc
    all_nodes = tuple(sorted(set(info.nodes) | set(names), key=lambda n: (len(n), n)))
    all_crds = tuple(sorted(set(info.crds) | set(crds)))
    return dataclasses.replace(info, nodes=all_nodes, crds=all_crds, ready=True)


def up(
    home: Path | None = None,
    nodes: int = 1,
    *,
    manifest_dirs: Sequence[Path] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Progress | None = None,
    with_components: bool = False,
    real_node: realnode.Options | None = None,
) -> ControlPlaneInfo:
    """Start (or reuse) the control plane under `home` and return once it is ready and seeded.

    With `real_node`, the apiserver serves on the node bridge and a real worker (kubelet, containerd,
    kube-proxy, DNS, controller-manager, scheduler) joins, with the chart installed on it
    (see `realnode`). Root only; one per machine.

    With `with_components`, also run our controller, webhook and one agent per node as local
    processes (what `modelcache dev up` does; tests start their own under RBAC instead).

    Ready means: /readyz ok, CRDs Established, `kserve/inferenceservice-config` present, nodes
    `dev-node-1..nodes` Ready. If one is already running under `home` it is reused (missing nodes
    and CRDs are added); a stale record (crashed processes) is cleaned up and a fresh one started.
    On failure everything started here is stopped again.
    """
    if not 0 <= nodes <= MAX_NODES:
        raise UsageError(f"nodes must be between 0 and {MAX_NODES}, got {nodes}")
    layout = Layout((home or default_home()).expanduser().resolve())
    say: Progress = progress or (lambda _msg: None)
    dirs = list(default_manifest_dirs() if manifest_dirs is None else manifest_dirs)
    with _locked(layout), _sigterm_unwinds():
        existing = _read_state(layout)
        if existing is not None:
            current = _status_unlocked(layout, existing)
            if current.phase == "running" and current.info is not None:
                if real_node is not None and current.info.real_node is None:
                    raise ConflictError(
                        f"a control plane without a real node runs under {layout.home}: "
                        "run `modelcache dev down` first"
                    )
                say(f"already running at {current.info.server}; reconciling CRDs and nodes")
                info = _bootstrap(current.info, nodes, dirs, timeout)
                _write_state(layout, {**existing, **info.to_json()})
                if with_components:
                    _start_components(layout, info, existing, say)
                return info
            say(f"cleaning up a stale control plane ({current.detail})")
            _teardown(layout, existing)

        apiserver_bin, etcd_bin = find_kube_apiserver(), find_etcd()
        binaries = None
        if real_node is not None:
            binaries = realnode.preflight(k8s_dir(), real_node, layout.node_dir)
        _clean_runtime(layout, keep_logs=False)
        layout.logs.mkdir(parents=True, exist_ok=True)
        node_record: dict[str, Any] | None = None

        def save_node(record: dict[str, Any]) -> None:
            data = _read_state(layout) or {"version": STATE_VERSION, "home": str(layout.home)}
            _write_state(layout, {**data, "real_node": record})

        if real_node is not None:
            node_record = realnode.record_host()
            try:
                save_node(node_record)
                realnode.create_bridge(node_record, save_node)
            except BaseException:
                _teardown(layout, _read_state(layout) or {})
                raise
            say(f"bridge {realnode.BRIDGE} up at {realnode.NODE_IP}")
        sans = [realnode.NODE_IP, realnode.KUBERNETES_SERVICE_IP, "kubernetes.default.svc.cluster.local"]
        layout.pki.generate(extra_sans=sans if real_node is not None else ())
        try:
            info = _start_servers(
                layout,
                apiserver_bin,
                etcd_bin,
                timeout,
                say,
                lambda: {} if node_record is None else {"real_node": node_record},
            )
        except BaseException:
            _teardown(layout, _read_state(layout) or {})  # its server processes are already stopped
            raise
        try:
            write_kubeconfig(
                layout.kubeconfig,
                info.server,
                layout.pki.ca_cert.read_bytes(),
                layout.pki.admin(),
                "modelcache-dev-admin",
            )
            if not dirs:
                say("no CRD directories given; applying none")
            info = _bootstrap(info, nodes, dirs, timeout)
            say(f"{len(info.crds)} CRDs established, {len(info.nodes)} nodes Ready")
            info = dataclasses.replace(info, started_at=_now(), real_node=node_record)
            _write_state(layout, info.to_json())
            if real_node is not None and node_record is not None and binaries is not None:
                with info.client() as client:
                    realnode.start(
                        paths=realnode.Paths(layout.node_dir),
                        binaries=binaries,
                        options=real_node,
                        record=node_record,
                        save=save_node,
                        say=say,
                        client=client,
                        kubeconfig=info.kubeconfig,
                        pki=layout.pki,
                        server=info.server,
                        timeout=max(timeout, 300.0),
                    )
                info = dataclasses.replace(info, nodes=(*info.nodes, realnode.NODE_NAME))
                _write_state(layout, {**(_read_state(layout) or {}), **info.to_json()})
            if with_components:
                _start_components(layout, info, {}, say)
        except BaseException:
            _teardown(layout, {**(_read_state(layout) or {}), "apiserver": info.apiserver.to_json(),
                               "etcd": info.etcd.to_json()})  # fmt: skip
            raise
        return info


def _teardown(layout: Layout, data: Mapping[str, Any]) -> list[str]:
    """Undo a (possibly half-written) recorded state: the real node, every process, runtime files."""
    stopped: list[str] = []
    timeout = 15.0
    if isinstance(data.get("real_node"), dict):
        stopped += realnode.teardown(data["real_node"], layout.node_dir)
        # Its apiserver lingers ~15 s after SIGTERM (endpoint lease removal); its state is discarded.
        timeout = 3.0
    stopped += _stop_all(_recorded_processes(data), timeout)
    _clean_runtime(layout)
    return stopped


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def down(home: Path | None = None) -> list[str]:
    """Stop everything `up` started under `home` (whole process groups) and remove its runtime files.

    Returns the names of the processes that were still running. Idempotent: nothing recorded, nothing
    to do. Logs are kept.
    """
    layout = Layout((home or default_home()).expanduser().resolve())
    if not layout.dir.is_dir():
        return []
    with _locked(layout):
        data = _read_state(layout)
        if data is None:
            return []
        return _teardown(layout, data)


Phase = Literal["running", "degraded", "stopped"]


@dataclass(frozen=True)
class ControlPlaneStatus:
    """What `status` found: `running` (all up and /readyz ok), `degraded`, or `stopped`."""

    home: Path
    phase: Phase
    detail: str
    info: ControlPlaneInfo | None = None
    processes: dict[str, bool] = field(default_factory=dict)


def _status_unlocked(layout: Layout, data: Mapping[str, Any] | None) -> ControlPlaneStatus:
    if data is None:
        return ControlPlaneStatus(layout.home, "stopped", "no control plane recorded")
    alive = {rec.name: is_alive(rec) for rec in _recorded_processes(data)}
    if not alive or not any(alive.values()):
        return ControlPlaneStatus(layout.home, "stopped", "recorded processes are gone", processes=alive)
    try:
        info = ControlPlaneInfo.from_json(data)
    except (KeyError, TypeError, ValueError):
        return ControlPlaneStatus(layout.home, "degraded", "start did not complete", processes=alive)
    dead = [name for name, ok in alive.items() if not ok]
    if dead:
        return ControlPlaneStatus(layout.home, "degraded", f"not running: {', '.join(dead)}", info, alive)
    if not info.ready:
        return ControlPlaneStatus(layout.home, "degraded", "start did not complete", info, alive)
    if not apiserver_ready(info.server, layout.pki):
        return ControlPlaneStatus(layout.home, "degraded", "/readyz is not ok", info, alive)
    return ControlPlaneStatus(layout.home, "running", f"ready at {info.server}", info, alive)


def status(home: Path | None = None) -> ControlPlaneStatus:
    """Inspect the control plane recorded under `home`, from any process."""
    layout = Layout((home or default_home()).expanduser().resolve())
    return _status_unlocked(layout, _read_state(layout) if layout.dir.is_dir() else None)


def load(home: Path | None = None) -> ControlPlaneInfo:
    """The running control plane under `home`, for processes that did not start it."""
    current = status(home)
    if current.phase != "running" or current.info is None:
        raise NotRunningError(f"no running control plane under {current.home}: {current.detail}")
    return current.info


@contextlib.contextmanager
def running(
    home: Path,
    nodes: int = 1,
    *,
    manifest_dirs: Sequence[Path] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[ControlPlaneInfo]:
    """`with running(tmp_path) as cp:` — up on entry, down on exit (pytest fixtures)."""
    info = up(home, nodes, manifest_dirs=manifest_dirs, timeout=timeout)
    try:
        yield info
    finally:
        down(home)


class ControlPlane:
    """Namespace for the public API: `ControlPlane.up(home, nodes)`, `.down(home)`, `.status(home)`."""

    up = staticmethod(up)
    down = staticmethod(down)
    status = staticmethod(status)
    load = staticmethod(load)
    running = staticmethod(running)
