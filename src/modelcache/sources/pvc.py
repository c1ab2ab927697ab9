"""pvc://<claim>/<path>: a model already on a PersistentVolumeClaim, read as local files.

KServe mounts the claim at /mnt/pvc in the storage-initializer container and reads
/mnt/pvc/<path>; we do the same (root overridable with MODELCACHE_PVC_ROOT for other mounts).
`..` cannot climb out of the mount, and neither can a symbolic link (see sources/file.py): a link
may lead anywhere inside the claim, and one that leaves it is refused (exit 4).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from modelcache.errors import UsageError
from modelcache.sources.base import SourceOptions
from modelcache.sources.file import FileSource
from modelcache.uri import ModelURI

DEFAULT_PVC_ROOT = "/mnt/pvc"


class PvcSource(FileSource):
    def __init__(self, uri: ModelURI, options: SourceOptions) -> None:
        root = Path(options.env.get("MODELCACHE_PVC_ROOT", DEFAULT_PVC_ROOT))
        rel = posixpath.normpath("/" + uri.local_path.lstrip("/")).lstrip("/")
        if not uri.host:
            raise UsageError(f"malformed URI {uri.uri!r}: expected pvc://<claim>/<path>")
        local = ModelURI(uri=uri.uri, scheme="file", host="", path=str(root / rel))
        super().__init__(local, options)
        self.boundary = root  # links inside the claim may cross directories, never leave the claim


SOURCE = PvcSource
