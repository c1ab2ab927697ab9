"""Run-time files ship in the package, and every copy of our CRDs is the generator's output.

Copies exist because each consumer needs files where it looks: the package (`modelcache dev up` from
a wheel), `deploy/crds` (kubectl users) and the Helm chart's `crds/`. `make crds` rewrites them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelcache import data
from modelcache.api.crd import render
from modelcache.dev import default_manifest_dirs
from modelcache.dev.bootstrap import strip_empty_string_defaults

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO.parent / "shared" / "reference" / "kserve-crds"
COPIES = [data.crds_dir(), REPO / "deploy" / "crds", REPO / "charts" / "modelcache" / "crds"]


def test_every_crd_copy_is_generated_output() -> None:
    expected = render()
    for directory in COPIES:
        if not directory.exists() and directory.parts[-3] == "charts":
            continue  # the chart arrives in a later commit
        found = {p.name: p.read_text() for p in directory.glob("*.yaml")}
        assert found == expected, f"{directory}: run `make crds`"


def _doc(path: Path) -> object:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kserve_side_crds_match_the_reference() -> None:
    shipped = data.kserve_crds_dir()
    names = sorted(p.name for p in shipped.glob("*.yaml"))
    assert names == [
        "serving.kserve.io_clusterstoragecontainers.yaml",
        "serving.kserve.io_inferenceservices.minimal.yaml",
        "serving.kserve.io_llminferenceservices.minimal.yaml",
    ]
    for name in names:
        assert _doc(shipped / name) == strip_empty_string_defaults(_doc(KSERVE / name)), name


def test_dev_up_reads_only_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELCACHE_REFERENCE_DIR", raising=False)
    package = Path(data.__file__).parent
    dirs = default_manifest_dirs()
    assert dirs == [data.kserve_crds_dir(), data.crds_dir()]
    assert all(d.is_relative_to(package) for d in dirs)
