"""Per-model manifests: every file with size and sha256, the source revision, and times.

Written before a model is published and read to verify it; the index can be rebuilt from them.
Plain dataclasses rather than pydantic: `modelcache path` must start in well under 250 ms.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    key: str
    uri: str
    created_at: float
    files: list[FileEntry]
    revision: str | None = None
    pinned: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in d["files"]]
            return cls(
                key=str(d["key"]),
                uri=str(d["uri"]),
                created_at=float(d["created_at"]),
                files=files,
                revision=d.get("revision"),
                pinned=bool(d.get("pinned", False)),
                source=dict(d.get("source") or {}),
                version=int(d.get("version", MANIFEST_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid manifest: {exc}") from exc


def write_json_atomic(path: Path, data: str) -> None:
    """tmp + fsync + rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_manifest(path: Path, manifest: Manifest) -> None:
    write_json_atomic(path, json.dumps(manifest.to_dict(), indent=1))


def load_manifest(path: Path) -> Manifest:
    return Manifest.from_dict(json.loads(path.read_text()))
