"""Files the program needs at run time, shipped inside the package and found with importlib.resources.

`crds/`: our LocalModel* CRDs (the same bytes as `deploy/crds/` and the chart's `crds/`; a unit test
keeps the copies equal to `python -m modelcache.api.crd`). `kserve-crds/`: the KServe-side CRDs the
dev playground installs (InferenceService, LLMInferenceService, ClusterStorageContainer), in forms a
1.20 apiserver accepts. Nothing here reads the source tree, so an installed wheel works anywhere.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _dir(name: str) -> Path:
    # A regular (non-zip) install: the resource is a real directory, which the YAML loader wants.
    path = Path(str(files(__name__).joinpath(name)))
    if not path.is_dir():
        raise FileNotFoundError(f"modelcache package data missing: {path} (broken install?)")
    return path


def crds_dir() -> Path:
    """Our CRDs (LocalModelCache, LocalModelNamespaceCache, LocalModelNodeGroup, LocalModelNode)."""
    return _dir("crds")


def kserve_crds_dir() -> Path:
    """KServe's InferenceService, LLMInferenceService and ClusterStorageContainer CRDs (playground)."""
    return _dir("kserve-crds")
