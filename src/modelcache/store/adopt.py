"""Adopting model folders another cache left behind (KServe's agent writes `models/<key>/`, no manifest).

Without this, a swap from KServe would re-download every model and `publish` would move the old
folder away under running pods' subPath mounts. So a folder at `models/<key>/` with no manifest is:

1. scanned at once (files and sizes, one lstat each, nothing read, no symlink followed);
2. compared with the source's listing (paths and sizes; sha256 where the source publishes one);
3. adopted in place when it matches: a manifest and an index row are written, the folder is never
   moved, so pods keep reading it. Files the source does not list (e.g. `.cache/huggingface/`
   that KServe's initializer leaves) are kept and recorded, so our fast check does not call the
   model damaged;
4. hashed later, in the background, at a capped read rate (`hash_adopted`): until then its
   entries carry `UNHASHED_SHA256`, which `Store.verify(full=True)` skips.

A folder that differs from the source is replaced by a normal download only when no pod mounts
it; otherwise it is left alone and reported. `decide` is the pure part; `scan`, `adopt`,
`hash_adopted` and `discard` are the executor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modelcache.errors import ConflictError, NotFoundError
from modelcache.safepath import UnsafeNameError, join_under, printable, safe_relpath
from modelcache.store.core import UNHASHED_SHA256, ModelRecord, Store
from modelcache.store.index import IndexRow
from modelcache.store.manifest import FileEntry, Manifest, load_manifest, save_manifest
from modelcache.uri import is_key, redact

ADOPTED = "adopted"  # key in Manifest.source
READ_BLOCK = 1 << 20


# -- plain data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundFile:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Folder:
    """What `scan` saw in `models/<key>/`. `problems`: entries we would never publish ourselves."""

    key: str
    files: tuple[FoundFile, ...]
    problems: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class ListedFile:
    path: str
    size: int | None
    sha256: str | None = None


@dataclass(frozen=True)
class Listing:
    """The source's snapshot, as far as adoption needs it. `archive`: files are unpacked from one
    archive, so only the unpacked folder can be trusted (no per-file comparison is possible)."""

    files: tuple[ListedFile, ...]
    revision: str | None = None
    archive: bool = False
    scheme: str = ""


@dataclass(frozen=True)
class Verdict:
    action: Literal["adopt", "replace", "wait"]
    reason: str
    differences: tuple[str, ...] = field(default=())


# -- pure decisions ----------------------------------------------------------------------------
def differences(folder: Folder, listing: Listing) -> list[str]:
    """How the folder differs from the source: missing files and wrong sizes (extras are fine)."""
    if listing.archive:
        return [] if folder.files else ["folder is empty"]
    found = {f.path: f for f in folder.files}
    out: list[str] = []
    for lf in listing.files:
        have = found.get(lf.path)
        if have is None:
            out.append(f"{printable(lf.path)}: missing")
        elif lf.size is not None and have.size != lf.size:
            out.append(f"{printable(lf.path)}: size {have.size} != {lf.size}")
    if not listing.files and not folder.files:
        out.append("folder is empty")
    return out


def decide(folder: Folder, listing: Listing | None, mounted: bool) -> Verdict:
    """Adopt a folder that matches its source; replace one that does not only when nothing mounts it.

    No listing yet (or the source is unreachable): wait. Nothing here ever deletes a mounted folder.
    """
    if listing is None:
        return Verdict("wait", "waiting for the source's listing to compare the folder with")
    diff = [*folder.problems, *differences(folder, listing)]
    if not diff:
        return Verdict("adopt", f"{len(folder.files)} file(s) match the source's listing")
    shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
    if mounted:
        return Verdict(
            "wait",
            f"the folder another cache left differs from the source ({shown}) and a pod mounts it; "
            "it is left alone until no pod does",
            tuple(diff),
        )
    return Verdict(
        "replace", f"the folder differs from the source ({shown}); downloading it again", tuple(diff)
    )


def manifest_for(folder: Folder, listing: Listing, uri: str, now: float) -> Manifest:
    """Our manifest for an adopted folder: the source's sha256 where it has one, else UNHASHED."""
    listed = {lf.path: lf.sha256 for lf in listing.files} if not listing.archive else {}
    entries = [
        FileEntry(path=f.path, size=f.size, sha256=listed.get(f.path) or UNHASHED_SHA256, mtime_ns=f.mtime_ns)
        for f in sorted(folder.files, key=lambda f: f.path)
    ]
    known = sum(1 for e in entries if e.sha256 != UNHASHED_SHA256)
    return Manifest(
        key=folder.key,
        uri=redact(uri),
        created_at=now,
        files=entries,
        revision=listing.revision,
        source={
            "scheme": listing.scheme,
            "source_checksum": "all" if entries and known == len(entries) else ("some" if known else "none"),
            ADOPTED: {"at": now, "hashed": False, "compared": "archive" if listing.archive else "listing"},
        },
    )


def needs_hashing(manifest: Manifest) -> bool:
    info = manifest.source.get(ADOPTED)
    return isinstance(info, dict) and not info.get("hashed", True)


def throttle_delay(done: int, elapsed: float, rate: float) -> float:
    """Seconds to sleep so that `done` bytes read in `elapsed` seconds stay under `rate` bytes/s."""
    if rate <= 0:
        return 0.0
    return max(0.0, done / rate - elapsed)


# -- executor ----------------------------------------------------------------------------------
def foreign_keys(store: Store) -> list[str]:
    """Keys of `models/<key>/` directories that have no manifest of ours (another cache's folders)."""
    if not store.models_dir.is_dir():
        return []
    out = []
    for p in sorted(store.models_dir.iterdir()):
        if not is_key(p.name) or os.path.lexists(store.manifest_path(p.name)):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(p).st_mode):
                out.append(p.name)
    return out


def scan(store: Store, key: str) -> Folder:
    """Files and sizes of `models/<key>/`, nothing read, no symlink followed."""
    base = store.model_dir(key)
    files: list[FoundFile] = []
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):  # followlinks=False
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = here / name
            rel = p.relative_to(base).as_posix()
            try:
                st = os.lstat(p)
                rel = safe_relpath(rel, "adopted file")
            except FileNotFoundError:
                continue
            except UnsafeNameError as exc:
                problems.append(exc.message)
                continue
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{printable(rel)}: symlink")
            elif stat.S_ISREG(st.st_mode):
                files.append(FoundFile(rel, st.st_size, st.st_mtime_ns))
            elif not stat.S_ISDIR(st.st_mode):
                problems.append(f"{printable(rel)}: special file")
    return Folder(key, tuple(sorted(files, key=lambda f: f.path)), tuple(problems))


def adopt(store: Store, folder: Folder, listing: Listing, uri: str, now: float | None = None) -> ModelRecord:
    """Record the folder as a complete model, in place: manifest first, then the index row.

    Re-scans under the per-key lock so a folder that changed since `scan` is not recorded wrongly.
    """
    store.ensure()
    lock = store.lock(folder.key)
    if not lock.try_acquire():
        raise ConflictError(f"{folder.key} is being written by another process; adopting it later")
    try:
        again = scan(store, folder.key)
        if again != folder:
            raise ConflictError(f"{folder.key} changed while being adopted; trying again later")
        manifest = manifest_for(folder, listing, uri, time.time() if now is None else now)
        save_manifest(store.manifest_path(folder.key), manifest)
        row = IndexRow(
            key=folder.key,
            uri=manifest.uri,
            revision=manifest.revision,
            size_bytes=manifest.size_bytes,
            file_count=len(manifest.files),
            created_at=manifest.created_at,
            last_used_at=manifest.created_at,
            pinned=False,
        )
        store.index.upsert(row)
    finally:
        lock.release()
    record = store.lookup_key(folder.key)
    if record is None:
        raise NotFoundError(f"not cached: {folder.key}")
    return record


def discard(store: Store, key: str) -> None:
    """Take an un-adoptable folder out of the way of a fresh download (callers checked no pod mounts it)."""
    store.discard_damaged(key)


def hash_adopted(
    store: Store,
    key: str,
    rate: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """sha256 of every file of an adopted model, read at most `rate` bytes/s; problems found.

    Matching files get their sha256 recorded (the manifest is rewritten once, at the end); a file
    whose hash differs from the source's, or whose size or mtime changed, is a problem. An empty
    result means the model is now as trustworthy as one we downloaded.
    """
    path = store.manifest_path(key)
    manifest = load_manifest(path)
    if not needs_hashing(manifest):
        return []
    base = store.model_dir(key)
    problems: list[str] = []
    done, t0 = 0, clock()
    for entry in manifest.files:
        p = join_under(base, entry.path, "manifest entry")
        h = hashlib.sha256()
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                problems.append(f"{printable(entry.path)}: changed since it was adopted")
                continue
            with open(p, "rb", buffering=0) as f:
                while block := f.read(READ_BLOCK):
                    h.update(block)
                    done += len(block)
                    delay = throttle_delay(done, clock() - t0, rate)
                    if delay > 0:
                        sleep(delay)
        except FileNotFoundError:
            problems.append(f"{printable(entry.path)}: missing")
            continue
        digest = h.hexdigest()
        if entry.sha256 != UNHASHED_SHA256 and entry.sha256 != digest:
            problems.append(f"{printable(entry.path)}: sha256 differs from the source's")
        entry.sha256 = digest
    if problems:
        return problems
    current = load_manifest(path)  # removed or replaced meanwhile: do not write over it
    if current.created_at != manifest.created_at:
        return []
    info = dict(manifest.source.get(ADOPTED) or {})
    info["hashed"] = True
    manifest.source[ADOPTED] = info
    save_manifest(path, manifest)
    return []
