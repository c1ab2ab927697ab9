"""Air-gapped bundles: a plain tar with the manifest first, then the model's files.

`import` trusts nothing in the bundle: every path is checked like any archive member and every
file's sha256 must equal the manifest's before the model is published.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

from modelcache.archive import UnsafeArchiveError, safe_member_path
from modelcache.errors import InsufficientSpaceError, IntegrityError, NotFoundError, UsageError
from modelcache.store.core import ModelRecord, Store
from modelcache.store.manifest import Manifest
from modelcache.uri import storage_key

MANIFEST_NAME = "modelcache-bundle.json"
PREFIX = "model/"
BLOCK = 1 << 20


def export_bundle(store: Store, key: str, out: Path) -> int:
    """Write the bundle; returns its size in bytes."""
    m = store.manifest(key)
    base = store.model_dir(key)
    if not base.is_dir():
        raise NotFoundError(f"not cached: {key}")
    if not out.name or out.is_dir():
        raise UsageError(f"--output {out} must name a file, not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.parent} does not exist")
    data = json.dumps(m.to_dict(), indent=1).encode()
    tmp = out.with_name(out.name + ".part")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size = len(data)
            info.mtime = int(m.created_at)
            tf.addfile(info, io.BytesIO(data))
            for f in m.files:
                tf.add(base / f.path, arcname=PREFIX + f.path, recursive=False)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(f"no space left to write {out}") from exc
        raise UsageError(f"cannot write {out}: {exc.strerror}") from exc
    return out.stat().st_size


def import_bundle(store: Store, bundle: Path) -> ModelRecord:
    if not bundle.is_file():
        raise NotFoundError(f"no such bundle: {bundle}")
    store.ensure()
    try:
        with tarfile.open(bundle, "r:*") as tf:
            first = tf.next()
            if first is None or first.name != MANIFEST_NAME or not first.isreg():
                raise IntegrityError(f"{bundle.name}: not a modelcache bundle (manifest missing)")
            fh = tf.extractfile(first)
            assert fh is not None
            try:
                manifest = Manifest.from_dict(json.loads(fh.read()))
            except ValueError as exc:
                raise IntegrityError(f"{bundle.name}: unreadable manifest ({exc})") from exc
            if storage_key(manifest.uri) != manifest.key:
                raise IntegrityError(f"{bundle.name}: manifest key does not match its URI")
            with store.lock(manifest.key):
                existing = store.lookup(manifest.uri)
                if existing is not None:
                    return existing
                staging = store.staging_dir(manifest.key) / "import"
                shutil.rmtree(staging, ignore_errors=True)
                files = staging / "files"
                files.mkdir(parents=True)
                try:
                    _unpack(tf, manifest, files)
                    return store.publish(files, manifest)
                finally:
                    store.clear_staging(manifest.key)
    except tarfile.TarError as exc:
        reason = str(exc).splitlines()[0].rstrip(" (:")
        raise IntegrityError(f"{bundle.name}: not a valid bundle ({reason})") from exc
    except RecursionError as exc:
        raise IntegrityError(f"{bundle.name}: unreadable manifest (nested too deeply)") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(f"no space left to import {bundle.name}") from exc
        raise IntegrityError(f"{bundle.name}: cannot unpack ({exc.strerror or exc})") from exc


def _unpack(tf: tarfile.TarFile, manifest: Manifest, root: Path) -> None:
    expected = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    for m in tf:
        if m.isdir() or m.name == MANIFEST_NAME:
            continue
        if not m.name.startswith(PREFIX):
            raise UnsafeArchiveError(f"unexpected bundle member {m.name!r}")
        rel = m.name[len(PREFIX) :]
        dest = safe_member_path(rel, root)
        if not m.isreg() or dest is None:
            raise UnsafeArchiveError(f"unsafe bundle member {m.name!r}")
        entry = expected.get(dest.relative_to(root).as_posix())
        if entry is None:
            raise IntegrityError(f"bundle file {rel!r} is not in its manifest")
        src = tf.extractfile(m)
        assert src is not None
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(dest, "wb") as out:
            while block := src.read(BLOCK):
                h.update(block)
                out.write(block)
        if h.hexdigest() != entry.sha256 or m.size != entry.size:
            raise IntegrityError(f"{entry.path}: sha256 or size does not match the bundle manifest")
        seen.add(entry.path)
    missing = sorted(expected.keys() - seen)
    if missing:
        raise IntegrityError(f"bundle is missing {len(missing)} file(s), e.g. {missing[0]}")
    if not manifest.files:
        raise UsageError("bundle manifest lists no files")
