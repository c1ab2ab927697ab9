"""Air-gapped bundles: a plain tar with the manifest first, then the model's files.

Neither direction trusts a manifest, because both read one that someone else could have written:

- `export` reads the cache's own manifest, which sits on a shared volume. Every entry goes through
  `safe_relpath` and `join_under` (no symlink on the way) and is opened with O_NOFOLLOW; it must be
  a regular file with the manifest's size and sha256. So `../../etc/shadow`, a planted symlink or
  a fifo never ends up in a bundle (exit 4), and a damaged model is not shipped.
- `import` reads a bounded manifest, checks every entry the same way, checks the declared total
  against the unpack cap and the free space, and then accepts only members named exactly
  `model/<entry>`, regular, once each, of the declared size; every file's sha256 must equal the
  manifest's before the model is published.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO

from modelcache.archive import (
    CORRUPT_ARCHIVE,
    TreeCheck,
    UnpackBudget,
    UnsafeArchiveError,
    _write,
    member_relpath,
    os_error,
)
from modelcache.errors import (
    ConflictError,
    InsufficientSpaceError,
    IntegrityError,
    ModelcacheError,
    NotFoundError,
    UsageError,
)
from modelcache.safepath import UnsafeNameError, join_under, no_symlink, printable, safe_relpath
from modelcache.store.core import ModelRecord, Store
from modelcache.store.manifest import FileEntry, Manifest
from modelcache.uri import storage_key

log = logging.getLogger("modelcache")

MANIFEST_NAME = "modelcache-bundle.json"
PREFIX = "model/"
BLOCK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of a million files is ~150 MB... of JSON we'd hold in memory
_HEX = frozenset("0123456789abcdef")


def checked_entries(manifest: Manifest, what: str) -> dict[str, FileEntry]:
    """The manifest's files by relative path, each path safe, listed once and not inside another."""
    tree = TreeCheck(what)
    out: dict[str, FileEntry] = {}
    for f in manifest.files:
        rel = safe_relpath(f.path, what)
        tree.add_file(rel, f.path)
        if not isinstance(f.size, int) or f.size < 0:
            raise IntegrityError(f"{what} {printable(rel)!r}: size is not a non-negative integer")
        if not isinstance(f.sha256, str) or len(f.sha256) != 64 or not set(f.sha256) <= _HEX:
            raise IntegrityError(f"{what} {printable(rel)!r}: sha256 is not 64 hex digits")
        out[rel] = f
    return out


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """A file read by tarfile.addfile, hashed on the way (export ships only what the manifest says)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.h = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.h.update(data)
        return data

    def readable(self) -> bool:
        return True


def _open_cached(base: Path, rel: str, entry: FileEntry) -> tuple[int, os.stat_result]:
    """Open a model file for reading: no symlink anywhere, a regular file of the manifest's size."""
    path = join_under(base, rel, "manifest entry")
    try:
        # O_NONBLOCK: a fifo planted at the path must not hang us before fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{printable(rel)!r} is missing from the cached model; run `verify`") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeNameError(
                f"manifest entry {printable(rel)!r} is a symlink; refusing to follow it"
            ) from exc
        raise IntegrityError(f"cannot read {printable(rel)!r} in the cached model: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeNameError(f"manifest entry {printable(rel)!r} is not a regular file")
    if st.st_size != entry.size:
        os.close(fd)
        raise IntegrityError(
            f"{printable(rel)!r} is {st.st_size} bytes, not the manifest's {entry.size}; run `verify`"
        )
    return fd, st


def export_bundle(store: Store, key: str, out: Path) -> int:
    """Write the bundle; returns its size in bytes."""
    m = store.manifest(key)
    base = no_symlink(store.model_dir(key), "model directory")
    if not base.is_dir():
        raise NotFoundError(f"not cached: {key}")
    if m.key != key:
        raise IntegrityError(f"the manifest of {key} names another model ({printable(m.key, 40)})")
    entries = checked_entries(m, "manifest entry")
    if not out.name or out.is_dir():
        raise UsageError(f"--output {out} must name a file, not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.parent} does not exist")
    data = json.dumps(m.to_dict(), indent=1).encode()
    tmp = out.with_name(out.name + ".part")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size = len(data)
            info.mtime = int(m.created_at)
            tf.addfile(info, io.BytesIO(data))
            for rel, entry in entries.items():
                src_fd, st = _open_cached(base, rel, entry)
                with os.fdopen(src_fd, "rb") as fh:
                    member = tarfile.TarInfo(PREFIX + rel)
                    member.size = entry.size
                    member.mtime = int(st.st_mtime)
                    member.mode = 0o644
                    reader = _HashingReader(fh)
                    tf.addfile(member, reader)
                if reader.h.hexdigest() != entry.sha256:
                    raise IntegrityError(
                        f"{printable(rel)!r} does not match its manifest sha256; run `verify --full`"
                    )
        tmp.replace(out)
    except ModelcacheError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(f"no space left to write {out}") from exc
        if exc.errno is None:  # tarfile: "unexpected end of data" (a model file shrank as we read it)
            raise IntegrityError(f"a model file changed while exporting it ({exc})") from exc
        raise UsageError(f"cannot write {out}: {exc.strerror}") from exc
    return out.stat().st_size


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
def import_bundle(store: Store, bundle: Path) -> ModelRecord:
    if not bundle.is_file():
        raise NotFoundError(f"no such bundle: {bundle}")
    store.ensure()
    name = printable(bundle.name)
    try:
        with tarfile.open(bundle, "r:*") as tf:
            first, manifest = _read_manifest(tf, name)
            if storage_key(manifest.uri) != manifest.key:
                # At rest a URI is redacted (`https://***@host/...`), so its key cannot be recomputed.
                # The check never stopped a hostile bundle anyway (its author picks URI and key
                # alike); what the bundle's bytes are is checked below, file by file.
                if "***" not in manifest.uri:
                    raise IntegrityError(f"{name}: manifest key does not match its URI")
                log.warning(
                    "%s: the URI is redacted, so its key %s is taken from the bundle", name, manifest.key
                )
            entries = checked_entries(manifest, "bundle manifest entry")
            if not entries:
                raise UsageError("bundle manifest lists no files")
            budget = UnpackBudget(bundle.stat().st_size, name)
            for rel, entry in entries.items():
                budget.reserve(entry.size, rel)
            with store.lock(manifest.key):
                # By key: the URI at rest is redacted, and a bundle must never replace a model
                # (pinned, in use, or another one under the same key) that is already here.
                existing = store.lookup_key(manifest.key)
                if existing is not None:
                    return existing
                if os.path.lexists(store.model_dir(manifest.key)):
                    raise ConflictError(
                        f"{name}: models/{manifest.key} exists but is not a complete model; "
                        "`modelcache rm --force` it first"
                    )
                staging = no_symlink(store.staging_dir(manifest.key), "staging directory") / "import"
                shutil.rmtree(staging, ignore_errors=True)
                files = staging / "files"
                files.mkdir(parents=True)
                try:
                    budget.check_free(files)
                    _unpack(tf, first, entries, files)
                    return store.publish(files, manifest)
                finally:
                    store.clear_staging(manifest.key)
    except ModelcacheError:
        raise
    except RecursionError as exc:
        raise IntegrityError(f"{name}: unreadable manifest (nested too deeply)") from exc
    except OSError as exc:
        if exc.errno is None:  # gzip/bz2: not a valid stream
            raise IntegrityError(f"{name}: not a valid bundle ({printable(str(exc), 120)})") from exc
        raise os_error(exc, name) from exc
    except CORRUPT_ARCHIVE as exc:
        reason = printable(str(exc).splitlines()[0].rstrip(" (:") if str(exc) else type(exc).__name__, 120)
        raise IntegrityError(f"{name}: not a valid bundle ({reason})") from exc


def _read_manifest(tf: tarfile.TarFile, name: str) -> tuple[tarfile.TarInfo, Manifest]:
    first = tf.next()
    if first is None or first.name != MANIFEST_NAME or not first.isreg():
        raise IntegrityError(f"{name}: not a modelcache bundle (manifest missing)")
    if first.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{name}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    fh = tf.extractfile(first)
    assert fh is not None
    try:
        return first, Manifest.from_dict(json.loads(fh.read(first.size)))
    except (ValueError, TypeError, OverflowError) as exc:  # not UTF-8, not JSON, not a manifest
        reason = exc.message if isinstance(exc, ModelcacheError) else printable(str(exc), 120)
        raise IntegrityError(f"{name}: unreadable manifest ({reason})") from exc


def _unpack(tf: tarfile.TarFile, first: tarfile.TarInfo, entries: dict[str, FileEntry], root: Path) -> None:
    seen: set[str] = set()
    for m in tf:  # iteration starts again at the manifest, already read
        if m is first or m.isdir():
            continue  # directories are implied by the files
        if m.name == MANIFEST_NAME:
            raise UnsafeArchiveError("bundle holds a second manifest")
        if not m.name.startswith(PREFIX):
            raise UnsafeArchiveError(f"unexpected bundle member {printable(m.name)!r}")
        rel = member_relpath(m.name[len(PREFIX) :], "bundle member")
        if not m.isreg() or not rel:
            raise UnsafeArchiveError(f"unsafe bundle member {printable(m.name)!r}: not a regular file")
        entry = entries.get(rel)
        if entry is None:
            raise IntegrityError(f"bundle file {printable(rel)!r} is not in its manifest")
        if rel in seen:
            raise UnsafeArchiveError(f"unsafe bundle member {printable(m.name)!r}: listed twice")
        if m.size != entry.size:
            raise IntegrityError(
                f"{printable(rel)!r}: {m.size} bytes in the bundle, {entry.size} in its manifest"
            )
        src = tf.extractfile(m)
        assert src is not None
        written = _write(src, join_under(root, rel, "bundle member"), root, limit=entry.size, exclusive=True)
        if written.sha256 != entry.sha256 or written.size != entry.size:
            raise IntegrityError(f"{printable(rel)!r}: sha256 or size does not match the bundle manifest")
        seen.add(rel)
    missing = sorted(entries.keys() - seen)
    if missing:
        raise IntegrityError(f"bundle is missing {len(missing)} file(s), e.g. {printable(missing[0])!r}")
