"""Hostile OCI layers and titles through the real CLI against docker-registry on 127.0.0.1 (issue 9).

Modelcar layers are tar(.gz) blobs built byte by byte (traversal, NUL, over-long names, devices,
bombs, thousands of link copies); ORAS artifacts carry hostile titles. Each case: exit code, one
line, nothing next to the cache root, no partial, nothing published.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcache.sources.oci import host_arch
from tests.conftest import assert_one_line_error, run_cli
from tests.integration.test_hostile_files import assert_untouched
from tests.support.archives import M, MiB, gzip_tar_bomb, tar_bytes
from tests.support.registry import IMAGE_CONFIG, LAYER_GZIP, OCI_MANIFEST, Registry, available

UP = "../../../../../sentinel"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not available():
        pytest.skip("needs /usr/bin/docker-registry: run scripts/deps/docker-registry.sh")
    with Registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    d = tmp_path / "sentinel"
    d.mkdir()
    return d


def push_image(registry: Registry, repo: str, layers: list[bytes]) -> str:
    """A modelcar image of already gzipped layer blobs; returns its oci:// URI."""
    config = json.dumps(
        {"architecture": host_arch(), "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": IMAGE_CONFIG,
            "digest": registry.push_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": LAYER_GZIP, "digest": registry.push_blob(repo, blob), "size": len(blob)}
            for blob in layers
        ],
    }
    registry.push_manifest(repo, "1", manifest, OCI_MANIFEST)
    return registry.uri(repo, "1")


def layer(*members: M) -> bytes:
    return gzip.compress(tar_bytes(list(members)), mtime=0)


W = M("models/w.bin", data=b"weights")
LAYER_CASES: dict[str, tuple[list[M], str]] = {
    "dotdot": ([W, M(f"models/{UP}/x", data=b"x")], "'..'"),
    "dotdot-inside": ([W, M("models/a/../../../x", data=b"x")], "'..'"),
    "percent-00": ([W, M("models/w%00.bin", data=b"x")], "%00"),
    "long-segment": ([W, M("models/" + "s" * 300, data=b"x")], "longer than"),
    "control-char": ([W, M("models/a\rb", data=b"x")], "control character"),
    "fifo": ([W, M("models/fifo", "fifo")], "special file"),
    "chardev": ([W, M("models/null", "chr")], "special file"),
    "hardlink-out": ([W, M("models/h", "hard", target="etc/shadow")], "points outside"),
    "symlink-out": ([W, M("models/s", "sym", target="/etc/shadow")], "outside /models"),
    "symlink-loop": ([W, M("models/a", "sym", target="b"), M("models/b", "sym", target="a")], "loops"),
    "bad-whiteout": ([W, M("models/sub/.wh..", data=b"")], "whiteout"),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_hostile_image_layers(registry: Registry, home: Path, sentinel: Path, case: str) -> None:
    members, fragment = LAYER_CASES[case]
    uri = push_image(registry, f"hostile/{case}", [layer(*members)])
    line = assert_one_line_error(run_cli(home, "pull", uri), 4)
    assert fragment in line, line
    assert_untouched(home, sentinel)


def test_layer_bomb_and_link_copy_bomb(
    registry: Registry, home: Path, tmp_path: Path, sentinel: Path
) -> None:
    bomb = gzip_tar_bomb(tmp_path / "bomb.tar.gz", 2048 * MiB, name="models/zeros.bin").read_bytes()
    line = assert_one_line_error(run_cli(home, "pull", push_image(registry, "hostile/bomb", [bomb])), 4)
    assert "decompression bomb" in line
    assert_untouched(home, sentinel)
    # one 1 MiB file and 200 symbolic links to it: 200 MiB of copies from a tiny layer
    links = [M(f"models/l{i}", "sym", target="w.bin") for i in range(200)]
    uri = push_image(registry, "hostile/links", [layer(M("models/w.bin", data=bytes(MiB)), *links)])
    line = assert_one_line_error(run_cli(home, "pull", uri, MODELCACHE_MAX_UNPACK_BYTES=str(20 * MiB)), 4)
    assert "MODELCACHE_MAX_UNPACK_BYTES" in line
    assert_untouched(home, sentinel)


def test_overlay_semantics_still_hold(registry: Registry, home: Path) -> None:
    """Layers are overlays, not archives: a later entry replaces an earlier one of another type."""
    uri = push_image(
        registry,
        "hostile/overlay",
        [
            layer(M("models/a", data=b"file"), M("models/a/b", data=b"under")),
            layer(M("models/c/", "dir"), M("models/c", data=b"now a file")),
        ],
    )
    proc = run_cli(home, "pull", uri)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert (out / "a" / "b").read_bytes() == b"under" and (out / "c").read_bytes() == b"now a file"


TITLE_CASES: dict[str, tuple[dict[str, bytes], str]] = {
    "dotdot": ({f"{UP}/x": b"x"}, "'..'"),
    "absolute": ({"/tmp/modelcache-title-abs": b"x"}, "absolute"),
    "percent-00": ({"w%00.bin": b"x"}, "%00"),
    "dot": ({".": b"x"}, "no file name"),
    "file-and-dir": ({"a": b"1", "a/b": b"2"}, "both a file and a directory"),
    "twice": ({"w.bin": b"1", "./w.bin": b"2"}, "listed twice"),
    "long": ({"t" * 300: b"x"}, "longer than"),
}


@pytest.mark.parametrize("case", sorted(TITLE_CASES))
def test_hostile_oras_titles(registry: Registry, home: Path, sentinel: Path, case: str) -> None:
    files, fragment = TITLE_CASES[case]
    registry.push_files(f"titles/{case}", "1", files)
    line = assert_one_line_error(run_cli(home, "pull", registry.uri(f"titles/{case}", "1")), 4)
    assert fragment in line, line
    assert_untouched(home, sentinel)
    assert not Path("/tmp/modelcache-title-abs").exists()
