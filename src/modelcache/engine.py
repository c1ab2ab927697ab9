"""The one engine: URI -> verified model directory, downloaded at most once per cache.

Used by the CLI, the node agent and the storage initializer alike. The flow:
lookup (hit: done) -> per-key lock (another process may be downloading it: wait, then hit) ->
resolve snapshot -> space check -> resumable transfer into staging -> (unpack archive) ->
manifest -> atomic publish.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelcache.errors import (
    ConflictError,
    InsufficientSpaceError,
    IntegrityError,
    ModelcacheError,
    SnapshotMismatchError,
    SourceError,
    TransientSourceError,
)
from modelcache.sources import SourceOptions, open_source
from modelcache.sources.base import Snapshot, Source
from modelcache.store.core import ModelRecord, Store
from modelcache.store.locks import FileLock
from modelcache.store.manifest import FileEntry, Manifest
from modelcache.transfer import ProgressEvent, Transfer, TransferConfig, backoff, check_space
from modelcache.uri import ModelURI, parse_uri, redact

log = logging.getLogger("modelcache")
RESOLVE_TIMEOUT = float(os.environ.get("MODELCACHE_RESOLVE_TIMEOUT", "120"))  # per attempt


@dataclass(frozen=True)
class PullResult:
    record: ModelRecord
    hit: bool
    seconds: float
    bytes_fetched: int = 0
    waited_for_other: bool = False


async def resolve_with_retries(
    source: Source, config: TransferConfig, on_event: Callable[[ProgressEvent], None] | None = None
) -> Snapshot:
    attempt = 0
    while True:
        try:
            # aiohttp's read timeout restarts with every byte: a server dripping its headers or
            # its listing would hold a pull (or a pod's initializer) forever without a deadline.
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    return await source.resolve()
            except TimeoutError:
                raise TransientSourceError(
                    f"{source.shown}: no complete answer within {RESOLVE_TIMEOUT:g}s (stalled)"
                ) from None
        except TransientSourceError as exc:
            attempt += 1
            if attempt > config.retries:
                raise SourceError(f"{exc.message} (gave up after {config.retries} retries)") from exc
            delay = backoff(attempt, config.retry_base)
            if on_event:
                on_event(ProgressEvent("retry", message=f"{exc.message}; retry {attempt} in {delay:.1f}s"))
            await asyncio.sleep(delay)


async def pull(
    store: Store,
    ref: str,
    *,
    options: SourceOptions | None = None,
    config: TransferConfig | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
    lock_timeout: float | None = None,
) -> PullResult:
    t0 = time.monotonic()
    uri = parse_uri(ref)
    rec = store.lookup(uri.uri)
    if rec is not None:
        _check_revision(store, rec, options)
        store.touch(rec.key)
        return PullResult(rec, hit=True, seconds=time.monotonic() - t0)
    store.ensure()
    store.repair()
    lock = store.lock(uri.key)
    waited = False
    if not lock.try_acquire():
        waited = True
        log.info("another process is downloading %s; waiting for it", redact(uri.uri))
        if on_event:
            on_event(ProgressEvent("wait", message="another process is downloading this model"))
        if not await lock.acquire_async(timeout=lock_timeout):
            raise ModelcacheError(f"timed out waiting for the lock on {redact(uri.uri)}")
    try:
        rec = store.lookup(uri.uri)
        if rec is not None:  # the other process finished it: at the revision we want?
            _check_revision(store, rec, options)
            store.touch(rec.key)
            return PullResult(rec, hit=True, seconds=time.monotonic() - t0, waited_for_other=waited)
        fetched, rec = await _download(
            store, uri, options or SourceOptions(), config or TransferConfig(), on_event, lock
        )
        return PullResult(
            rec, hit=False, seconds=time.monotonic() - t0, bytes_fetched=fetched, waited_for_other=waited
        )
    finally:
        lock.release()


def _check_revision(store: Store, rec: ModelRecord, options: SourceOptions | None) -> None:
    """The key is the URI alone (KServe's), so a hit may hold another revision than `--revision` asks."""
    wanted = options.revision if options else None
    if not wanted:
        return
    m = store.manifest(rec.key)
    if wanted in (m.revision, m.source.get("requested_revision")):
        return
    have = m.source.get("requested_revision") or m.revision
    raise ConflictError(
        f"{redact(rec.uri)} is cached at revision {have}, not {wanted}; "
        "`modelcache rm` it first, or put the revision in the URI (hf://owner/model:REV)"
    )


async def _download(
    store: Store,
    uri: ModelURI,
    options: SourceOptions,
    config: TransferConfig,
    on_event: Callable[[ProgressEvent], None] | None,
    lock: FileLock | None = None,
) -> tuple[int, ModelRecord]:
    def ours() -> bool:
        """False once the heartbeat found our lock broken (we were paused past its staleness):
        another process owns the staging directory now, so we neither publish nor clean it."""
        return lock is None or not lock.lost

    source = open_source(uri, options)
    staging = store.staging_dir(uri.key)
    shown = redact(uri.uri)  # what is kept at rest (state.json, manifest, index): never a secret
    fetched = 0
    try:
        snapshot = await resolve_with_retries(source, config, on_event)
        for attempt in (1, 2):
            dest = staging / ("download" if snapshot.archive else "files")
            follower = source.follower(snapshot, staging / "files") if snapshot.archive else None
            transfer = Transfer(
                source,
                snapshot,
                staging,
                dest,
                uri=shown,
                config=config,
                on_event=on_event,
                follower=follower,
            )
            staging.mkdir(parents=True, exist_ok=True)
            needed = _remaining(transfer, snapshot) * (2 if snapshot.archive else 1)
            check_space(staging, needed)
            try:
                digests = await transfer.run()
                fetched += transfer.bytes_fetched
                break
            except (IntegrityError, SnapshotMismatchError) as exc:
                # Wrong bytes, or an origin that lied or changed under us: start afresh, once,
                # from a new snapshot (never mix bytes of two versions).
                fetched += transfer.bytes_fetched
                if ours():
                    store.clear_staging(uri.key)
                if attempt == 2 or not ours() or transfer.follower_failed:
                    raise
                log.warning("%s: %s; starting again from a fresh snapshot", shown, exc)
                if isinstance(exc, SnapshotMismatchError):
                    snapshot = await resolve_with_retries(source, config, on_event)
        if transfer.follower is not None:  # unpacked while downloading
            entries = transfer.followed
            shutil.rmtree(staging / "download", ignore_errors=True)
        else:
            entries = await asyncio.to_thread(_finish_tree, source, staging, snapshot, digests)
        checked = sum(1 for f in snapshot.files if f.sha256)
        manifest = Manifest(
            key=uri.key,
            uri=shown,
            revision=snapshot.revision,
            created_at=time.time(),
            source={
                "scheme": uri.scheme,
                **snapshot.extra,
                **({"archive": snapshot.archive} if snapshot.archive else {}),
                # Whether the bytes were checked against the origin's own checksum (else: our
                # sha256 of what arrived, with overlapping requests cross-checked).
                "source_checksum": "all"
                if checked == len(snapshot.files)
                else ("some" if checked else "none"),
            },
            files=entries,
        )
        if not ours():
            raise TransientSourceError(f"{shown}: lost the download lock to another process; pull again")
        rec = store.publish(staging / "files", manifest)
        store.clear_staging(uri.key)
        return fetched, rec
    except (InsufficientSpaceError, IntegrityError):
        # Resuming cannot help: no space until some is freed, or bytes that are not a valid model.
        if ours():
            store.clear_staging(uri.key)
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if ours():
                store.clear_staging(uri.key)
            raise InsufficientSpaceError(f"no space left on the device holding {store.root}") from exc
        raise
    finally:
        await source.aclose()


def _remaining(transfer: Transfer, snapshot: Snapshot) -> int:
    """Bytes still to write, from the checkpoint if there is one (resume needs less space)."""
    from modelcache.transfer import read_staging_summary

    summary = read_staging_summary(transfer.staging)
    done = summary.done_bytes if summary and summary.uri == transfer.uri else 0
    return max(0, snapshot.total_bytes - done)


def _finish_tree(
    source: Source, staging: Path, snapshot: Snapshot, digests: dict[str, str]
) -> list[FileEntry]:
    """Unpack an archive snapshot (verified as downloaded) or list the downloaded files for the manifest."""
    files_dir = staging / "files"
    if snapshot.archive:
        if files_dir.exists():
            shutil.rmtree(files_dir)
        entries = source.finalize(snapshot, staging / "download", files_dir)
        shutil.rmtree(staging / "download", ignore_errors=True)
        return entries
    return [
        FileEntry(
            path=f.path,
            size=f.size if f.size is not None else (files_dir / f.path).stat().st_size,
            sha256=digests[f.path],
        )
        for f in snapshot.files
    ]
