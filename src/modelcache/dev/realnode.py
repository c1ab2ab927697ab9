"""A real worker node for the dev playground: kubelet, containerd + runc + CNI, kube-proxy, cluster DNS,
and the kube-controller-manager and kube-scheduler that real pods need. Linux, root, one per machine.

Why it looks like this (the recipe and its blockers: ../shared/reference/real-node/README.md):

- **Nothing leaves the machine.** The node, the apiserver, DNS and the pods' gateway share one
  address, the bridge IP. The kubelet runs with AWS_EC2_METADATA_DISABLED (its AWS credential
  provider probes 169.254.169.254) and, like containerd, with a proxy on a closed loopback port so
  any pull fails locally; images are only imported (`ctr images import`) under fixed tags. The
  apiserver reaches kubelets by InternalIP only; dnsmasq answers from static entries with no
  upstream; the CNI bridge does no masquerading and gives pods routes to the pod and service ranges
  only; the service range is routed onto the bridge so an unmapped service IP never takes the
  host's default route.
- **Everything it changes on the host is recorded before it is changed**, in `state.json`, so
  `teardown` can undo it from any process: processes by recorded pid, containers through
  containerd, mounts, the bridge, the iptables rules kube-proxy and CNI added (only those), the
  cgroups the kubelet created, the host paths kubelet/containerd/CNI hard-code, and sysctls.
- The node-lifecycle controller is off: simulated nodes (no kubelet) must stay Ready beside the real
  one, so we lift the real node's `not-ready` taint ourselves once its kubelet reports Ready, as
  bootstrap does for simulated nodes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, Client
from lightkube.resources.admissionregistration_v1 import MutatingWebhookConfiguration
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace, Node
from lightkube.types import PatchType

from modelcache.errors import ConflictError, ModelcacheError, NotFoundError, UsageError

from . import images
from .pki import Pki
from .processes import ProcessRecord, is_alive, log_tail, spawn, stop

BRIDGE = "mcdev0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
NODE_NAME = "dev-real-node"
PAUSE_TAG = "localhost/modelcache-pause:1.20.2"
HELM_RELEASE = "modelcache"
#: Where nothing listens: any accidental registry/cloud request fails here, on this machine.
DEAD_PROXY = "http://127.0.0.1:9"
NO_PROXY = f"127.0.0.1,localhost,{CLUSTER_CIDR},{SERVICE_RANGE}"
#: Fixed ports (kubelet, its healthz, kube-proxy health/metrics, DNS): one real node per machine.
FIXED_PORTS = (
    (NODE_IP, 10250),
    ("127.0.0.1", 10248),
    ("127.0.0.1", 10249),
    ("127.0.0.1", 10256),
    (NODE_IP, 53),
)
#: Sysctls the kubelet (protectKernelDefaults off), kube-proxy and the bridge plugin set.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
)
#: Host paths the kubelet, containerd and CNI use whatever we configure; removed if we created them.
HOST_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/usr/libexec/kubernetes",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNTIME_PACKAGES = "containerd runc containernetworking-plugins iptables conntrack dnsmasq-base"
#: Stop order: the kubelet first (it would restart containers), containerd last.
STOP_ORDER = ("kubelet", "kube-proxy", "dnsmasq", "kube-scheduler", "kube-controller-manager", "containerd")

Progress = Callable[[str], None]
Save = Callable[[dict[str, Any]], None]


class RealNodeError(ModelcacheError):
    """The real node could not be set up or torn down (exit 1)."""


@dataclass(frozen=True)
class Options:
    """What `dev up --real-node` installs: the application image archive, the chart and helm."""

    image: Path
    image_tag: str
    chart: Path
    helm: Path
    helm_values: tuple[str, ...] = ()


def image_tag(archive: Path) -> str:
    """The tag a `docker save` archive carries (manifest.json), which pods must name exactly."""
    import tarfile

    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.loads(member.read()) if member is not None else None
    except (OSError, KeyError, tarfile.TarError, ValueError) as exc:
        raise UsageError(f"{archive}: not a docker-archive image ({exc})") from exc
    tags = manifest[0].get("RepoTags") if isinstance(manifest, list) and manifest else None
    if not tags or not isinstance(tags[0], str) or ":" not in tags[0]:
        raise UsageError(f"{archive}: the image has no tag")
    if tags[0].endswith(":latest"):
        raise UsageError(f"{archive}: tag {tags[0]} would always be pulled; build it with a fixed tag")
    return tags[0]


def options(
    image: Path | None = None,
    chart: Path | None = None,
    helm: Path | None = None,
    helm_values: Sequence[str] = (),
) -> Options:
    """Defaults from the source checkout (`make image`, charts/modelcache) and `make helm`'s cache."""
    from .controlplane import repo_root

    root = repo_root()
    image = image or Path(
        os.environ.get("MODELCACHE_IMAGE") or (root or Path.cwd()) / "dist/modelcache-image.tar"
    )
    chart = chart or (root or Path.cwd()) / "charts" / "modelcache"
    helm = helm or Path(
        os.environ.get("MODELCACHE_HELM") or Path.home() / ".cache" / "modelcache" / "bin" / "helm"
    )
    if not image.is_file():
        raise NotFoundError(f"image archive not found at {image}: run `make image` or pass --image")
    return Options(image, image_tag(image), chart, helm, tuple(helm_values))


@dataclass(frozen=True)
class Paths:
    """Everything of the node under `<home>/dev/node/` (removed on teardown)."""

    dir: Path

    @property
    def containerd(self) -> Path:
        return self.dir / "containerd"

    @property
    def sock(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def kubelet(self) -> Path:
        return self.dir / "kubelet"

    @property
    def cni(self) -> Path:
        return self.dir / "cni"

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def logs(self) -> Path:
        return self.dir.parent / "logs"


# --- binaries and preflight -----------------------------------------------------------------------


def _which(name: str, *extra: str) -> Path | None:
    for candidate in (*extra, shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@dataclass(frozen=True)
class Binaries:
    kubelet: Path
    kube_proxy: Path
    kube_scheduler: Path
    kube_controller_manager: Path
    pause: Path
    containerd: Path
    ctr: Path
    runc: Path
    dnsmasq: Path
    iptables: Path
    ip: Path


def find_binaries(k8s_dir: Path) -> Binaries:
    """Our built Kubernetes binaries and Debian's runtime; a missing one is exit 3 with the fix."""
    build_hint = "run scripts/build-k8s.sh (builds the node binaries from Debian's kubernetes source)"
    found: dict[str, Path] = {}
    for name in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "pause"):
        path = k8s_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise NotFoundError(f"{name} not found at {path}: {build_hint}")
        found[name.replace("-", "_")] = path
    for name in ("containerd", "ctr", "runc", "dnsmasq", "iptables", "ip"):
        path_or_none = _which(name)
        if path_or_none is None:
            raise NotFoundError(f"{name} not found: apt-get install {RUNTIME_PACKAGES}")
        found[name] = path_or_none
    if not Path("/usr/lib/cni/bridge").is_file():
        raise NotFoundError(f"CNI plugins not found in /usr/lib/cni: apt-get install {RUNTIME_PACKAGES}")
    return Binaries(**found)


def preflight(k8s_dir: Path, options: Options, node_dir: Path) -> Binaries:
    """Fail early (before touching the host) on what we can check: root, binaries, inputs, conflicts."""
    if os.geteuid() != 0:
        raise UsageError("--real-node needs root (bridge, iptables, mounts, cgroups)")
    binaries = find_binaries(k8s_dir)
    for what, path in (("image archive", options.image), ("chart", options.chart), ("helm", options.helm)):
        if not path.exists():
            hint = {"image archive": "run `make image`", "chart": "pass --chart", "helm": "run `make helm`"}
            raise NotFoundError(f"{what} not found at {path}: {hint[what]}")
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        raise ConflictError(f"a real node already runs on this machine (bridge {BRIDGE} exists)")
    for host, port in FIXED_PORTS:
        if host == NODE_IP:
            continue  # the bridge does not exist yet; checked again once it does
        _check_port(host, port)
    sock = Paths(node_dir).sock
    if len(str(sock)) > 100:
        raise UsageError(f"--home is too deep for a unix socket ({sock}); use a shorter --home")
    return binaries


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConflictError(f"port {host}:{port} is in use: a real node runs here already?") from exc
            raise


# --- host changes, recorded first -----------------------------------------------------------------


def _run(argv: Sequence[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
        raise RealNodeError(f"{shlex.join(argv)} failed ({result.returncode}): {last[0]}")
    return result


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS if _sysctl_path(n).exists()}


def _kubepods_cgroups() -> list[str]:
    found = [CGROUP_ROOT / "kubepods"] + [d / "kubepods" for d in CGROUP_ROOT.iterdir() if d.is_dir()]
    return sorted(str(p) for p in found if p.is_dir())


def _iptables_save(binary: str) -> str | None:
    path = _which(f"{binary}-save")
    if path is None:
        return None
    result = _run([str(path)], check=False)
    return result.stdout if result.returncode == 0 else None


def record_host() -> dict[str, Any]:
    """What the node will change, as found before it does (the basis of `teardown`)."""
    return {
        "sysctls": read_sysctls(),
        "iptables": {b: _iptables_save(b) for b in ("iptables", "ip6tables")},
        "existing_paths": [p for p in HOST_PATHS if os.path.lexists(p)],
        "existing_cgroups": _kubepods_cgroups(),
        "bridge_created": False,
        "processes": [],
    }


def create_bridge(record: dict[str, Any], save: Save) -> None:
    """The bridge is the node: its IP is the node IP, the API/DNS/origin address and pods' gateway."""
    record["bridge_created"] = True
    save(record)  # recorded before it exists: teardown deletes it even if we die half-way
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    # Service IPs kube-proxy has not mapped (yet) stay on the bridge instead of the default route.
    _run(["ip", "route", "add", SERVICE_RANGE, "dev", BRIDGE])
    for host, port in FIXED_PORTS:
        if host == NODE_IP:
            _check_port(host, port)


# --- configuration files --------------------------------------------------------------------------


def _containerd_config(paths: Paths, runc: Path) -> str:
    c = paths.containerd
    return f"""version = 2
root = "{c / "root"}"
state = "{c / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{paths.sock}"
[ttrpc]
  address = "{paths.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_TAG}"
  enable_selinux = false
  # Without CAP_SYS_RESOURCE (VMs, CI) runc cannot lower oom_score_adj and every pod fails to start.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
        Root = "{c / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{paths.cni / "net.d"}"
    max_conf_num = 1
"""


def _cni_config(paths: Paths) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "modelcache-dev",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing is NATed towards the outside
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni / "ipam"),
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "routes": [{"dst": CLUSTER_CIDR}, {"dst": SERVICE_RANGE}],  # no default route
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _kubelet_config(paths: Paths) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "protectKernelDefaults": False,
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_IP],
        "resolvConf": str(paths.kubelet / "resolv.conf"),
        "serializeImagePulls": False,
        # Imported images can never be pulled again: never garbage-collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "maxPods": 50,
        "volumePluginDir": str(paths.kubelet / "volume-plugins"),
    }


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env["PATH"] = f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{env.get('PATH', '')}"
    return {**env, **extra}


def _guarded_env() -> dict[str, str]:
    """For anything that might fetch: every proxy points to a closed loopback port."""
    return _child_env(
        HTTP_PROXY=DEAD_PROXY,
        HTTPS_PROXY=DEAD_PROXY,
        http_proxy=DEAD_PROXY,
        https_proxy=DEAD_PROXY,
        NO_PROXY=NO_PROXY,
        no_proxy=NO_PROXY,
        AWS_EC2_METADATA_DISABLED="true",
    )


# --- bring-up -------------------------------------------------------------------------------------


@dataclass
class _Starter:
    paths: Paths
    record: dict[str, Any]
    save: Save
    say: Progress

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> ProcessRecord:
        _proc, rec = spawn(name, argv, self.paths.logs / f"{name}.log", env)
        self.record["processes"].append(rec.to_json())
        self.save(self.record)
        return rec

    def wait(self, what: str, rec: ProcessRecord | None, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if rec is not None and not is_alive(rec):
                tail = (log_tail(rec.log, 1) or "").strip()
                raise RealNodeError(f"{rec.name} exited while waiting for {what}: {tail} (log {rec.log})")
            if time.monotonic() > deadline:
                where = f"; see {rec.log}" if rec is not None else ""
                raise RealNodeError(f"{what}: not after {timeout:.0f} s{where}")
            time.sleep(0.25)


def _node_ready(client: Client) -> bool:
    try:
        node = client.get(Node, NODE_NAME)
    except ApiError:
        return False
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _lift_not_ready_taint(client: Client) -> None:
    node = client.get(Node, NODE_NAME)
    taints = (node.spec.taints if node.spec else None) or []
    kept = [t.to_dict() for t in taints if t.key != "node.kubernetes.io/not-ready"]
    if len(kept) != len(taints):
        client.patch(Node, NODE_NAME, {"spec": {"taints": kept or None}}, patch_type=PatchType.MERGE)


def _label_namespaces(client: Client) -> None:
    """Label namespaces as apiservers >= 1.21 do, so the pod webhook's namespaceSelector works on 1.20."""
    for ns in client.list(Namespace):
        if ns.metadata is None or not ns.metadata.name:
            continue
        name = ns.metadata.name
        if (ns.metadata.labels or {}).get("kubernetes.io/metadata.name") != name:
            patch = {"metadata": {"labels": {"kubernetes.io/metadata.name": name}}}
            client.patch(Namespace, name, patch, patch_type=PatchType.MERGE)


def _webhook_ca_set(client: Client) -> bool:
    try:
        cfg = client.get(MutatingWebhookConfiguration, "modelcache-webhook")
    except ApiError:
        return False
    return bool(cfg.webhooks) and all(w.clientConfig.caBundle for w in cfg.webhooks or [])


def _deployments_ready(client: Client, namespace: str) -> bool:
    deployments = list(client.list(Deployment, namespace=namespace))
    return bool(deployments) and all(
        (d.status.readyReplicas or 0) >= (d.spec.replicas or 1) for d in deployments if d.spec and d.status
    )


def start(
    *,
    paths: Paths,
    binaries: Binaries,
    options: Options,
    record: dict[str, Any],
    save: Save,
    say: Progress,
    client: Client,
    kubeconfig: Path,
    pki: Pki,
    server: str,
    timeout: float,
) -> None:
    """Start the node on a running real-node apiserver and install the chart; `record` grows as we go."""
    from .controlplane import write_kubeconfig

    run = _Starter(paths, record, save, say)
    t0 = time.monotonic()
    for d in (paths.containerd, paths.kubelet, paths.cni / "net.d", paths.images):
        d.mkdir(parents=True, exist_ok=True)

    # control-plane controllers real pods need: GC, DaemonSets, PV binding, SA tokens, scheduling
    cm = run.spawn(
        "kube-controller-manager",
        [
            str(binaries.kube_controller_manager),
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            "--use-service-account-credentials=false",
            "--controllers=*,-nodelifecycle,-csrsigning,-bootstrapsigner,-tokencleaner",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--port=0",
            f"--cluster-cidr={CLUSTER_CIDR}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
        ],
        _guarded_env(),
    )
    sched = run.spawn(
        "kube-scheduler",
        [
            str(binaries.kube_scheduler),
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--port=0",
        ],
        _guarded_env(),
    )

    # containerd + images
    config = paths.containerd / "config.toml"
    config.write_text(_containerd_config(paths, binaries.runc))
    (paths.cni / "net.d" / "10-modelcache.conflist").write_text(json.dumps(_cni_config(paths), indent=2))
    containerd = run.spawn("containerd", [str(binaries.containerd), "--config", str(config)], _guarded_env())
    ctr = [str(binaries.ctr), "--address", str(paths.sock), "--namespace", "k8s.io"]
    run.wait("containerd", containerd, lambda: _run([*ctr, "version"], check=False).returncode == 0, 60)
    pause = images.pause_image(binaries.pause, paths.images / "pause.tar", PAUSE_TAG)
    for tar in (pause, options.image):
        _run([*ctr, "images", "import", str(tar)], timeout=600)
    say(
        f"containerd ready, images {options.image_tag} and {PAUSE_TAG} imported"
        f" [{time.monotonic() - t0:.0f} s]"
    )

    # cluster DNS (static, no upstream) and kube-proxy
    svc = "kubernetes.default.svc"
    run.spawn(
        "dnsmasq",
        [
            str(binaries.dnsmasq),
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            f"--listen-address={NODE_IP}",
            "--port=53",
            "--user=root",
            "--pid-file=",
            f"--address=/{svc}.cluster.local/{KUBERNETES_SERVICE_IP}",
            f"--address=/{svc}/{KUBERNETES_SERVICE_IP}",
            "--local=/cluster.local/",
            "--local=/svc/",
        ],
        _child_env(),
    )
    run.spawn(
        "kube-proxy",
        [
            str(binaries.kube_proxy),
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={CLUSTER_CIDR}",
            f"--bind-address={NODE_IP}",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--oom-score-adj=0",
            f"--nodeport-addresses={NODE_IP}/32",
        ],
        _guarded_env(),
    )

    # the kubelet, as system:node:<name> (Node authorizer + NodeRestriction)
    user = f"system:node:{NODE_NAME}"
    node_kubeconfig = write_kubeconfig(
        paths.kubelet / "kubeconfig",
        server,
        pki.ca_cert.read_bytes(),
        pki.mint_client(user, ["system:nodes"]),
        user,
    )
    (paths.kubelet / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
    (paths.kubelet / "config.yaml").write_text(yaml.safe_dump(_kubelet_config(paths), sort_keys=False))
    kubelet = run.spawn(
        "kubelet",
        [
            str(binaries.kubelet),
            f"--config={paths.kubelet / 'config.yaml'}",
            f"--kubeconfig={node_kubeconfig}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{paths.sock}",
            "--runtime-request-timeout=5m",
            f"--root-dir={paths.kubelet / 'root'}",
            f"--cert-dir={paths.kubelet / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            f"--pod-infra-container-image={PAUSE_TAG}",
            "--v=1",
        ],
        _guarded_env(),
    )
    run.wait(f"node {NODE_NAME} Ready", kubelet, lambda: _node_ready(client), timeout)
    _lift_not_ready_taint(client)
    for rec in (cm, sched):
        if not is_alive(rec):
            raise RealNodeError(f"{rec.name} exited: {(log_tail(rec.log, 1) or '').strip()} (log {rec.log})")
    say(f"node {NODE_NAME} Ready at {NODE_IP} [{time.monotonic() - t0:.0f} s]")

    # the operator, from the chart, running as pods on the node
    _label_namespaces(client)
    install_chart(paths, options, kubeconfig, timeout)
    record["helm_release"] = HELM_RELEASE
    save(record)
    run.wait("controller and webhook pods Ready", None, lambda: _deployments_ready(client, "kserve"), timeout)
    run.wait("webhook caBundle", None, lambda: _webhook_ca_set(client), timeout)
    say(f"chart {options.chart.name} installed, controller and webhook Ready [{time.monotonic() - t0:.0f} s]")


def install_chart(paths: Paths, options: Options, kubeconfig: Path, timeout: float) -> None:
    """`helm install` with the imported image (pulls are never attempted: pullPolicy Never)."""
    repo, _, tag = options.image_tag.rpartition(":")
    values = [
        f"image.repository={repo}",
        f"image.tag={tag}",
        "image.pullPolicy=Never",
        "controller.replicas=1",
        "webhook.replicas=1",
        *options.helm_values,
    ]
    argv = [str(options.helm), "--kubeconfig", str(kubeconfig), "--namespace", "kserve"]
    argv += ["install", HELM_RELEASE, str(options.chart), "--wait", "--timeout", f"{int(timeout)}s"]
    for value in values:
        argv += ["--set", value]
    env = _guarded_env()
    env.update(
        HELM_CACHE_HOME=str(paths.dir / "helm" / "cache"),
        HELM_CONFIG_HOME=str(paths.dir / "helm" / "config"),
        HELM_DATA_HOME=str(paths.dir / "helm" / "data"),
        NO_PROXY=f"{NO_PROXY},{NODE_IP}",
        no_proxy=f"{NO_PROXY},{NODE_IP}",
    )
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout + 30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    (paths.logs / "helm.log").write_text(f"$ {shlex.join(argv)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [""])[-1]
        raise RealNodeError(f"helm install failed: {last} (log {paths.logs / 'helm.log'})")


# --- teardown -------------------------------------------------------------------------------------


def processes(record: Mapping[str, Any]) -> list[ProcessRecord]:
    return [ProcessRecord.from_json(p) for p in record.get("processes", []) if isinstance(p, dict)]


def _by_name(record: Mapping[str, Any]) -> dict[str, ProcessRecord]:
    return {p.name: p for p in processes(record)}


def _kill_containers(paths: Paths, record: Mapping[str, Any]) -> None:
    """Every container of the node, through containerd, then whatever our cgroups still hold."""
    ctr = _which("ctr")
    containerd = _by_name(record).get("containerd")
    if ctr is not None and containerd is not None and is_alive(containerd):
        base = [str(ctr), "--address", str(paths.sock), "--namespace", "k8s.io"]
        listed = _run([*base, "tasks", "ls", "-q"], check=False, timeout=30)
        for task in listed.stdout.split():
            _run([*base, "tasks", "kill", "--signal", "SIGKILL", task], check=False, timeout=30)
        for task in listed.stdout.split():
            _run([*base, "tasks", "delete", "--force", task], check=False, timeout=30)
    existing = set(record.get("existing_cgroups", []))
    for top in _kubepods_cgroups():
        if top in existing:
            continue
        for procs in Path(top).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)


def _kill_shims(paths: Paths) -> None:
    """containerd's shims run in sessions of their own; their pids are in the task bundles."""
    for pid_file in (paths.containerd / "state").glob("io.containerd.runtime.v2.task/*/*/shim.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(paths.sock) in cmdline:  # ours, not a recycled pid
                os.kill(pid, signal.SIGKILL)


def _unescape_mount(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _unmount_under(roots: Sequence[str]) -> None:
    """Unmount everything below `roots`, deepest first; lazily when still busy."""
    for _attempt in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = _unescape_mount(line.split()[4])
            if any(target == r or target.startswith(r.rstrip("/") + "/") for r in roots):
                mounts.append(target)
        if not mounts:
            return
        for target in sorted(set(mounts), key=len, reverse=True):
            if _run(["umount", target], check=False).returncode != 0:
                _run(["umount", "-l", target], check=False)


def _iptables_rule_cleanup(binary: str, before: str | None) -> None:
    """Remove the KUBE-*/CNI-* rules and chains added since `before` (nobody else's)."""
    if before is None:
        return
    now = _iptables_save(binary)
    if now is None:
        return

    def parse(text: str) -> dict[str, tuple[set[str], list[str]]]:
        tables: dict[str, tuple[set[str], list[str]]] = {}
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                tables[table] = (set(), [])
            elif line.startswith(":") and table:
                tables[table][0].add(line[1:].split()[0])
            elif line.startswith("-A ") and table:
                tables[table][1].append(line[3:])
        return tables

    old, new = parse(before), parse(now)
    ours = ("KUBE-", "CNI-")
    for table, (chains, rules) in new.items():
        old_chains, old_rules = old.get(table, (set(), []))
        for rule in reversed(rules):
            if rule in old_rules or not any(tag in rule for tag in ours):
                continue
            _run([binary, "-w", "-t", table, "-D", *shlex.split(rule)], check=False)
        added = [c for c in chains if c not in old_chains and c.startswith(ours)]
        for chain in added:
            _run([binary, "-w", "-t", table, "-F", chain], check=False)
        for chain in added:
            _run([binary, "-w", "-t", table, "-X", chain], check=False)


def _remove_cgroups(existing: Sequence[str]) -> None:
    for top in _kubepods_cgroups():
        if top in existing:
            continue
        dirs = sorted(
            (p for p in Path(top).rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        for d in [*dirs, Path(top)]:
            for _attempt in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # the kernel frees a cgroup a moment after its last task


def teardown(record: Mapping[str, Any], node_dir: Path) -> list[str]:
    """Undo everything `start` did, in reverse, from the record alone. Returns the processes stopped."""
    paths = Paths(node_dir)
    stopped: list[str] = []
    procs = _by_name(record)

    def halt(name: str) -> None:
        rec = procs.get(name)
        if rec is not None:
            if is_alive(rec):
                stopped.append(name)
            stop(rec, timeout=10)

    halt("kubelet")
    _kill_containers(paths, record)
    for name in STOP_ORDER[1:]:
        halt(name)
    for rec in procs.values():  # anything recorded that the order above does not name
        if rec.name not in STOP_ORDER:
            halt(rec.name)
    _kill_shims(paths)
    existing_paths = set(record.get("existing_paths", []))
    created = [p for p in HOST_PATHS if p not in existing_paths]
    _unmount_under([str(node_dir), *created])
    for binary, before in (record.get("iptables") or {}).items():
        if shutil.which(binary) or _which(binary):
            _iptables_rule_cleanup(binary, before)
    if record.get("bridge_created"):
        _run(["ip", "link", "del", BRIDGE], check=False)
    for name, value in (record.get("sysctls") or {}).items():
        with contextlib.suppress(OSError):
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value)
    _remove_cgroups(record.get("existing_cgroups", []))
    for path in created:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(node_dir, ignore_errors=True)
    return stopped
