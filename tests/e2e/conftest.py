"""One real control plane (etcd + kube-apiserver 1.20) per test session.

Nothing is skipped: a missing kube-apiserver binary, etcd or reference CRDs fails every e2e test with
the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lightkube import Client

from modelcache.dev import ControlPlaneError, ControlPlaneInfo, default_manifest_dirs, running

from .support import leftover_processes, require_binaries

NODES = 2


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneInfo]:
    """A ready control plane with KServe's CRDs, `kserve/inferenceservice-config` and NODES nodes."""
    require_binaries()
    if not default_manifest_dirs():
        pytest.fail(
            "KServe reference CRDs not found: set MODELCACHE_REFERENCE_DIR to the shared reference dir",
            pytrace=False,
        )
    home = tmp_path_factory.mktemp("modelcache-home")
    try:
        with running(home, nodes=NODES) as info:
            yield info
    except ControlPlaneError as exc:
        pytest.fail(f"{exc.message}\n{exc.detail}", pytrace=False)
    assert not leftover_processes(home), "control plane processes left behind"


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlaneInfo) -> Iterator[Client]:
    """lightkube client as system:masters."""
    with control_plane.client() as client:
        yield client
