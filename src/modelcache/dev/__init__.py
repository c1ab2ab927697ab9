"""Local Kubernetes control plane (etcd + kube-apiserver 1.20) for e2e tests and `modelcache dev up`.

    from modelcache.dev import ControlPlane
    info = ControlPlane.up(home, nodes=2)      # ready, CRDs established, nodes Ready
    with info.client() as client: ...          # lightkube, as system:masters
    kubeconfig = info.mint_user("controller", ["modelcache:controllers"])   # RBAC-bound user
    ControlPlane.down(home)

The kube-apiserver binary comes from scripts/build-kube-apiserver.sh; etcd from Debian's etcd-server.
"""

from __future__ import annotations

from .bootstrap import LOCAL_MODEL_DEFAULTS, BootstrapError, strip_empty_string_defaults
from .controlplane import (
    BinaryMissingError,
    ControlPlane,
    ControlPlaneError,
    ControlPlaneInfo,
    ControlPlaneStatus,
    Layout,
    NotRunningError,
    default_home,
    default_manifest_dirs,
    down,
    find_etcd,
    find_kube_apiserver,
    load,
    reference_dir,
    running,
    status,
    up,
)
from .pki import CertKey

__all__ = [
    "LOCAL_MODEL_DEFAULTS",
    "BinaryMissingError",
    "BootstrapError",
    "CertKey",
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneInfo",
    "ControlPlaneStatus",
    "Layout",
    "NotRunningError",
    "default_home",
    "default_manifest_dirs",
    "down",
    "find_etcd",
    "find_kube_apiserver",
    "load",
    "reference_dir",
    "running",
    "status",
    "strip_empty_string_defaults",
    "up",
]
