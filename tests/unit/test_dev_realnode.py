"""Pure parts of the real-node playground: image archives for `ctr images import`, configs that keep
every packet on the machine."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from modelcache.dev import images, realnode
from modelcache.errors import UsageError


def test_pause_archive_is_a_reproducible_docker_archive(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF fake")
    a = images.pause_image(binary, tmp_path / "a.tar", realnode.PAUSE_TAG)
    b = images.pause_image(binary, tmp_path / "b.tar", realnode.PAUSE_TAG)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = json.loads(tar.extractfile(manifest[0]["Config"]).read())  # type: ignore[union-attr]
        layer = tar.extractfile(manifest[0]["Layers"][0])
        assert layer is not None
        with tarfile.open(fileobj=layer) as inner:
            member = inner.getmember("pause")
            assert member.mode == 0o755
    assert manifest[0]["RepoTags"] == [realnode.PAUSE_TAG]
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert realnode.image_tag(a) == realnode.PAUSE_TAG


def test_image_tag_refuses_latest_and_non_archives(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"x")
    latest = images.pause_image(binary, tmp_path / "l.tar", "localhost/x:latest")
    with pytest.raises(UsageError, match="always be pulled"):
        realnode.image_tag(latest)
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(UsageError, match="not a docker-archive"):
        realnode.image_tag(tmp_path / "junk.tar")


def test_pods_get_no_default_route_and_no_masquerade(tmp_path: Path) -> None:
    cni = realnode._cni_config(realnode.Paths(tmp_path))
    bridge = cni["plugins"][0]
    assert bridge["ipMasq"] is False
    routes = [r["dst"] for r in bridge["ipam"]["routes"]]
    assert "0.0.0.0/0" not in routes and routes == [realnode.CLUSTER_CIDR, realnode.SERVICE_RANGE]


def test_guarded_env_sends_every_fetch_to_a_closed_loopback_port() -> None:
    env = realnode._guarded_env()
    assert env["HTTP_PROXY"] == env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:9"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"


def test_kubelet_never_garbage_collects_imported_images(tmp_path: Path) -> None:
    config = realnode._kubelet_config(realnode.Paths(tmp_path))
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["clusterDNS"] == [realnode.NODE_IP] and config["address"] == realnode.NODE_IP
