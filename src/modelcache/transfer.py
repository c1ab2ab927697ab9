"""Moving bytes: chunk planning (pure) and the async runner.

The runner downloads many files at once and large files as parallel ranged chunks over one pool of
`connections` workers. Idle workers steal the back half of the largest chunk still in flight, so
the tail of a download keeps every connection busy (per-connection rate caps are the norm on object
stores and CDNs; parallelism is what beats them). Progress within each chunk is checkpointed to
`state.json` after an fdatasync, so a kill -9 loses at most the last checkpoint interval.
sha256 is computed while downloading: a hasher per file follows the contiguous written prefix and
reads it back from the page cache, so verification costs almost no extra wall time.

An origin that publishes no checksum can still change under us (or lie with one ETag for two
contents): each ranged request of such a file starts `overlap` bytes early, and those bytes must
equal what the neighbouring request wrote there (checked before the model is published). A read
that makes no progress at `min_rate` over `stall_window` seconds is retried like a reset.

A `Follower` reads one file in order while it downloads (an archive unpacked as it arrives): a
thread reads through `FollowReader`, whose reads wait for the contiguous written prefix, so the
unpack overlaps the download instead of following it; its failure (a bad archive) stops the pull.

Peers (node-to-node fill, `modelcache.peer`): with `piece_hashes` on, every fixed-size piece of a
ranged file is hashed as soon as it is completely written and recorded in `state.json`, so a peer
server can offer it (and a peer can check it) before the whole file is done; chunks are then whole
pieces. A source implementing `PeerHooks` can hand over hashes it already checked and is asked to
attest each finished file; an integrity failure makes it distrust its peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

from modelcache.errors import (
    InsufficientSpaceError,
    IntegrityError,
    ModelcacheError,
    SnapshotMismatchError,
    SourceError,
    TransientSourceError,
    UsageError,
)
from modelcache.quantity import format_bytes, parse_quantity
from modelcache.safepath import real_dir, write_nofollow
from modelcache.sources.base import Follower, RemoteFile, Snapshot, Source

MiB = 1 << 20
GiB = 1 << 30
WRITE_BLOCK = 1 * MiB
HASH_BLOCK = 4 * MiB
MIN_STEAL = 16 * MiB  # split only chunks with this much left: a cut wastes what the server already sent
STATE_FILE = "state.json"
MIN_PIECE = 4 * MiB
MAX_PIECES = 2048  # per file: keeps manifests small for 100 GB files
P = ParamSpec("P")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# Pure planning
# --------------------------------------------------------------------------------------------
def next_chunk_size(unallocated: int, connections: int, *, lo: int = 1 * MiB, hi: int = 64 * MiB) -> int:
    """Guided self-scheduling: big chunks while much is left, ever smaller ones towards the end.

    Each new chunk takes 1/(2 x connections) of what is still unallocated, so every connection
    finishes at about the same moment (no long tail) without cutting requests short.
    """
    want = unallocated // max(1, 2 * connections)
    size = max(lo, min(hi, want - want % MiB if want >= MiB else want))
    return min(size, unallocated)


def request_floor(
    samples: Sequence[tuple[float, float]], *, lo: int = 1 * MiB, hi: int = 16 * MiB, k: float = 16.0
) -> int:
    """The smallest ranged request worth making, from recent (first-byte latency s, bytes/s) samples.

    A request should stream at least `k` times as long as it waited for its first byte, or the
    tail of a download becomes round trips: ~1 MiB for a loopback nginx, 8-16 MiB for S3 (AWS's
    own advice), whatever the server's per-request cost turns out to be. Medians: one slow
    request does not move it."""
    if not samples:
        return lo
    latency = statistics.median(s[0] for s in samples)
    rate = statistics.median(s[1] for s in samples)
    want = int(k * latency * rate)
    return max(lo, min(hi, want - want % MiB))


@dataclass
class RequestTimes:
    """(first-byte latency, per-connection rate) of the last requests that streamed long enough."""

    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=32))

    def add(self, started: float, first_at: float, first_len: int, ended: float, nbytes: int) -> None:
        body = nbytes - first_len
        if first_at <= 0 or body < 2 * first_len or body < MiB or ended <= first_at:
            return  # too short to tell latency from transfer time
        rate = body / (ended - first_at)
        # the first block arrived after the latency plus its own transfer time
        self.samples.append((max(0.0, first_at - started - first_len / rate), rate))


def split_point(start: int, received: int, end: int, min_piece: int = MIN_STEAL // 2) -> int | None:
    """Where to cut an in-flight chunk so an idle worker can take its back half (None: not worth it)."""
    pos = start + received
    remaining = end - pos
    if remaining < 2 * min_piece:
        return None
    cut = pos + remaining // 2
    return cut - cut % (64 * 1024) if cut - cut % (64 * 1024) > pos else cut


def piece_size(size: int) -> int:
    """The piece length for a file of `size` bytes: 4 MiB, doubled until at most MAX_PIECES pieces."""
    piece = MIN_PIECE
    while piece * MAX_PIECES < size:
        piece *= 2
    return piece


def covered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def unknown_size_room(free: int, fs_size: int, known_left: int, reserve: int | None) -> tuple[int, int]:
    """(bytes the files of unknown size may take in all, the free space kept).

    An origin that gives no size can stream forever. Such files may fill what the files of known
    size leave of the free space, down to `reserve` (default: 5% of the filesystem, at most 1 GiB;
    a node whose disk runs low has its pods evicted), never the whole disk."""
    keep = reserve if reserve is not None else min(GiB, fs_size // 20)
    return max(0, free - keep - known_left), keep


def backoff(attempt: int, base: float, cap: float = 20.0) -> float:
    """Exponential backoff with full jitter (AWS architecture blog), so retrying clients spread out."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


# --------------------------------------------------------------------------------------------
# Runtime state
# --------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    start: int
    end: int | None
    done: int = 0  # bytes durably written from start
    active: bool = False
    buffered: int = 0  # bytes received but not yet written (for split decisions)

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done >= self.end


@dataclass
class FileTask:
    rf: RemoteFile
    dest: Path
    ranged: bool
    chunks: list[Chunk]  # allocated so far; they tile [0, cursor)
    cursor: int = 0  # next byte not yet given to any chunk
    sha256: str | None = None  # ours, once hashed
    claims: list[tuple[int, int, bytes]] = field(default_factory=list)  # (offset, length, sha256)
    dirty: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    piece: int = 0  # piece length when piece hashes are kept (0: not kept)
    pieces: dict[int, str] = field(default_factory=dict)  # index -> sha256 hex of a written piece
    pieces_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def size(self) -> int | None:
        return self.rf.size

    def done_bytes(self) -> int:
        return sum(c.done for c in self.chunks)

    def contiguous(self) -> int:
        """Length of the written prefix [0, n) — what the hasher may consume."""
        pos = 0
        for c in sorted(self.chunks, key=lambda c: c.start):
            if c.start != pos:
                break
            pos = c.start + c.done
            if not c.complete:
                break
        return pos

    def complete(self) -> bool:
        unallocated = self.ranged and self.size is not None and self.cursor < self.size
        return not unallocated and all(c.complete for c in self.chunks)

    def to_state(self) -> dict[str, Any]:
        return {
            "size": self.rf.size,
            "etag": self.rf.etag,
            "source_sha256": self.rf.sha256,
            "ranged": self.ranged,
            "chunks": [[c.start, c.end, c.done] for c in sorted(self.chunks, key=lambda c: c.start)],
            "sha256": self.sha256,
            "piece_size": self.piece,
            "pieces": {str(i): h for i, h in sorted(self.pieces.items())},
        }

    def written(self) -> list[tuple[int, int]]:
        return covered([(c.start, c.start + c.done) for c in self.chunks])

    def piece_bounds(self, index: int) -> tuple[int, int]:
        assert self.size is not None and self.piece
        return index * self.piece, min(self.size, (index + 1) * self.piece)


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # plan | advance | file_done | retry | done
    path: str = ""
    nbytes: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class StagingSummary:
    uri: str
    revision: str | None
    done_bytes: int
    total_bytes: int
    file_count: int


def read_staging_summary(staging: Path) -> StagingSummary | None:
    try:
        data = json.loads((staging / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files", {})
    done = sum(sum(c[2] for c in f.get("chunks", [])) for f in files.values())
    total = sum(f.get("size") or 0 for f in files.values())
    return StagingSummary(str(data.get("uri", "")), data.get("revision"), done, total, len(files))


class RateLimiter:
    """A shared token bucket: `--limit-rate` caps the whole pull, not each connection."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class FollowReader(io.RawIOBase):
    """A staging file as a seekable, read-only stream for a thread, while the download writes it.

    A read waits until the bytes it wants are in the contiguous written prefix (`advance`), then
    reads them back from the page cache; reads are always full (tarfile counts short reads as
    truncation) except at the end. `abort` wakes the reader with the pull's failure."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._size = size
        self._pos = 0
        self._available = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, available: int) -> None:
        with self._cond:
            if available > self._available:
                self._available = min(available, self._size)
                self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        with self._cond:
            while self._error is None and self._available < self._pos + want:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        got = 0
        while got < want:
            n = os.preadv(self._fd, [view[got:want]], self._pos + got)
            if n <= 0:
                raise IntegrityError("staging file shrank while unpacking")
            got += n
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass
class TransferConfig:
    connections: int = int(os.environ.get("MODELCACHE_CONNECTIONS", "32"))
    chunk_size: int | None = (
        int(os.environ["MODELCACHE_CHUNK_SIZE"]) if "MODELCACHE_CHUNK_SIZE" in os.environ else None
    )
    # The smallest ranged request (bar a file's last bytes); unset: measured (`request_floor`).
    min_chunk: int | None = (
        int(os.environ["MODELCACHE_MIN_CHUNK"]) if "MODELCACHE_MIN_CHUNK" in os.environ else None
    )
    retries: int = int(os.environ.get("MODELCACHE_RETRIES", "5"))
    retry_base: float = float(os.environ.get("MODELCACHE_RETRY_BASE", "0.5"))
    checkpoint_interval: float = 0.5
    limit_rate: int | None = None
    preallocate: bool = os.environ.get("MODELCACHE_PREALLOCATE", "1") != "0"
    overlap: int = int(os.environ.get("MODELCACHE_OVERLAP", str(8 * 1024)))
    stall_window: float = float(os.environ.get("MODELCACHE_STALL_WINDOW", "30"))
    min_rate: int = int(os.environ.get("MODELCACHE_MIN_RATE", "1024"))  # bytes/s while waiting on the origin
    # Free space a download of unknown size must leave (None: MODELCACHE_RESERVE, else see
    # `unknown_size_room`). The agent passes its --reserve.
    reserve: int | None = None
    piece_hashes: bool = False  # keep per-piece sha256 in state.json (a peer server offers those pieces)
    peers: Swarm | None = None  # other nodes to fetch pieces from first (implies piece_hashes)


@runtime_checkable
class Swarm(Protocol):
    """Peers for one pull (`modelcache.peer.source.Swarm`): given as plain data by the caller."""

    def attach(self, origin: Source, snapshot: Snapshot) -> Source:
        """A source that reads from peers first and `origin` otherwise (also a `PeerHooks`)."""
        ...


@runtime_checkable
class PeerHooks(Protocol):
    """What a peer-aware source (`modelcache.peer.source.PeerSource`) adds to `Source`."""

    def piece_hash(self, f: RemoteFile, index: int) -> str | None:
        """The sha256 of piece `index` if this source already checked the bytes it handed over."""
        ...

    def wants_overlap(self, f: RemoteFile, start: int) -> bool:
        """Whether a read starting at `start` should re-read its neighbour's tail (the origin check)."""
        ...

    async def attest(self, f: RemoteFile, sha256: str) -> None:
        """Raise IntegrityError when `sha256` of the finished file is not what its origin-fetcher saw."""
        ...

    def distrust(self) -> None:
        """An integrity failure happened: fetch only from the origin from now on."""
        ...

    async def detach(self) -> None:
        """Stop watching peers (the origin source stays open: its owner closes it)."""
        ...


class Transfer:
    """Download one snapshot's files into `dest_dir`, resumably, reporting progress as events."""

    def __init__(
        self,
        source: Source,
        snapshot: Snapshot,
        staging: Path,
        dest_dir: Path,
        *,
        uri: str,
        config: TransferConfig | None = None,
        on_event: Callable[[ProgressEvent], None] | None = None,
        follower: Follower[Any] | None = None,
    ) -> None:
        self.config = config or TransferConfig()
        self.follower = follower
        self.followed: Any = None  # what follower.consume returned (once run() succeeded)
        self.follower_failed = False  # the follower raised (a bad archive: retrying cannot help)
        self.source = source if self.config.peers is None else self.config.peers.attach(source, snapshot)
        self.snapshot = snapshot
        self.staging = staging
        self.dest_dir = dest_dir
        self.uri = uri
        self.on_event = on_event or (lambda e: None)
        self.limiter = RateLimiter(self.config.limit_rate) if self.config.limit_rate else None
        self.tasks: list[FileTask] = []
        self.request_times = RequestTimes()
        self.bytes_fetched = 0  # bytes received from the source in this run (resume accounting)
        self.unknown_room: tuple[int, int] | None = None  # (room, kept free) for files of unknown size

    # -- state -------------------------------------------------------------------------------
    def _load_previous(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.staging / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if data.get("uri") != self.uri or data.get("revision") != self.snapshot.revision:
            return {}
        files: dict[str, Any] = data.get("files", {})
        return files

    def _save_state(self) -> None:
        data = {
            "uri": self.uri,
            "revision": self.snapshot.revision,
            "dest": str(self.dest_dir.relative_to(self.staging)),
            "files": {t.rf.path: t.to_state() for t in self.tasks},
        }
        tmp = self.staging / f".{STATE_FILE}.tmp"
        write_nofollow(tmp, json.dumps(data).encode())
        os.replace(tmp, self.staging / STATE_FILE)

    def _plan(self) -> None:
        previous = self._load_previous()
        for rf in self.snapshot.files:
            dest = self.dest_dir / rf.path
            ranged = self.source.supports_ranges(rf) and rf.size is not None
            prev = previous.get(rf.path)
            same = (
                prev is not None
                and prev.get("size") == rf.size
                and prev.get("etag") == rf.etag
                and prev.get("source_sha256") == rf.sha256
                and prev.get("ranged") == ranged
                and dest.exists()
            )
            sha: str | None = None
            if same and prev is not None and (ranged or prev.get("sha256")):
                chunks = [Chunk(s, e, d) for s, e, d in prev["chunks"]]
                sha = prev.get("sha256")
            elif ranged:
                chunks = []  # allocated on demand, see _next
            else:
                chunks = [Chunk(0, rf.size)]
            if not same:
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
            cursor = max((c.end or 0 for c in chunks), default=0)
            task = FileTask(rf, dest, ranged, chunks, cursor=cursor)
            task.sha256 = sha if task.complete() else None
            if (self.config.piece_hashes or self.config.peers is not None) and ranged and rf.size:
                task.piece = piece_size(rf.size)
                if same and prev is not None and prev.get("piece_size") == task.piece:
                    task.pieces = {int(i): h for i, h in (prev.get("pieces") or {}).items()}
            self.tasks.append(task)

    def _open_files(self) -> None:
        """Create, size and preallocate every file. No descriptor stays open: each write, hash and
        sync opens the file for that one call (`_with_fd`), so a model with more files than the
        open-file limit works, and open descriptors stay bounded by the thread pool."""
        for t in self.tasks:
            real_dir(t.dest.parent, "staging directory")
            size = t.size
            try:
                fd = os.open(t.dest, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise _disk_error(exc, self.staging) from exc
            try:
                if size is None:
                    continue
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                if self.config.preallocate and size > 0 and not t.complete():
                    try:
                        os.posix_fallocate(fd, 0, size)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        # EOPNOTSUPP/EINVAL: the filesystem cannot preallocate; writes will tell.
            except OSError as exc:
                raise _disk_error(exc, self.staging) from exc
            finally:
                os.close(fd)

    def _checkpoint(self) -> None:
        for t in self.tasks:
            if t.dirty:
                _with_fd(t.dest, os.fdatasync)
                t.dirty = False
        self._save_state()

    # -- run ---------------------------------------------------------------------------------
    async def run(self) -> dict[str, str]:
        """Returns {path: sha256}. Raises SourceError / IntegrityError / InsufficientSpaceError."""
        real_dir(self.staging, "staging directory")
        real_dir(self.dest_dir, "staging directory")
        self._plan()
        if any(t.size is None for t in self.tasks):
            st = os.statvfs(self.staging)  # before preallocation takes the known sizes' blocks
            known_left = sum((t.size or 0) - t.done_bytes() for t in self.tasks if t.size is not None)
            reserve = self.config.reserve if self.config.reserve is not None else _env_reserve()
            self.unknown_room = unknown_size_room(
                st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, known_left, reserve
            )
        self._open_files()
        total = self.snapshot.total_bytes
        already = sum(t.done_bytes() for t in self.tasks)
        self.on_event(ProgressEvent("plan", nbytes=already, total=total, message=f"{len(self.tasks)} files"))
        stop = asyncio.Event()
        checkpointer = asyncio.create_task(self._checkpoint_loop(stop))
        tasks = [asyncio.create_task(self._hasher(t)) for t in self.tasks]
        tasks += [asyncio.create_task(self._piece_hasher(t)) for t in self.tasks if t.piece]
        tasks += [asyncio.create_task(self._worker()) for _ in range(max(1, self.config.connections))]
        reader: FollowReader | None = None
        if self.follower is not None:
            t = next(t for t in self.tasks if t.rf.path == self.follower.path)
            reader = FollowReader(t.dest, t.size or 0)
            tasks.append(asyncio.create_task(self._follow(t, reader, self.follower)))
        try:
            # Fail fast: a bad archive found by the follower stops the download, and vice versa.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        except BaseException:
            for task in tasks:  # a cancelled _follow wakes and waits for its thread
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            stop.set()
            await asyncio.gather(checkpointer, return_exceptions=True)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._checkpoint)
            if reader is not None:
                reader.close()
        hooks = self.source if isinstance(self.source, PeerHooks) else None
        try:
            return await self._verify(hooks)
        finally:
            if hooks is not None:
                await hooks.detach()

    async def _follow(self, t: FileTask, reader: FollowReader, follower: Follower[Any]) -> None:
        """Feed the follower's thread the contiguous prefix as it grows (a stream that restarts on
        retry, one not ranged, is offered only once complete)."""
        consumer = asyncio.create_task(asyncio.to_thread(follower.consume, cast(IO[bytes], reader)))
        try:
            while not consumer.done():
                reader.advance(t.contiguous() if t.ranged else (t.size or 0) if t.complete() else 0)
                t.changed.clear()
                changed = asyncio.create_task(t.changed.wait())
                await asyncio.wait({consumer, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            try:
                self.followed = consumer.result()
            except Exception:
                self.follower_failed = True
                raise
        except BaseException:
            reader.abort(TransientSourceError("the download stopped"))
            await asyncio.gather(consumer, return_exceptions=True)  # the thread cannot be cancelled
            raise

    async def _verify(self, hooks: PeerHooks | None) -> dict[str, str]:
        total = self.snapshot.total_bytes
        try:
            await asyncio.to_thread(self._check_claims)
            result: dict[str, str] = {}
            for t in self.tasks:
                assert t.sha256 is not None
                if t.rf.sha256 and t.rf.sha256.lower() != t.sha256:
                    raise IntegrityError(
                        f"{t.rf.path}: sha256 {t.sha256[:12]}… does not match "
                        f"the source's {t.rf.sha256[:12]}…"
                    )
                if hooks is not None and not t.rf.sha256:
                    await hooks.attest(t.rf, t.sha256)
                result[t.rf.path] = t.sha256
        except (IntegrityError, SnapshotMismatchError):
            if hooks is not None:
                hooks.distrust()
            raise
        self.on_event(ProgressEvent("done", nbytes=total, total=total))
        return result

    def _check_claims(self) -> None:
        """Overlapping bytes fetched by two requests must agree, or the origin changed under us."""
        for t in self.tasks:
            for offset, length, digest in t.claims:
                on_disk = _with_fd(t.dest, os.pread, length, offset)
                if hashlib.sha256(on_disk).digest() != digest:
                    raise SnapshotMismatchError(
                        f"{t.rf.path}: two requests returned different bytes at offset {offset}: "
                        "the origin changed under us (or serves one validator for two contents)"
                    )

    async def _checkpoint_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.checkpoint_interval)
            if any(t.dirty for t in self.tasks):
                await asyncio.to_thread(self._checkpoint)

    # -- scheduling --------------------------------------------------------------------------
    def _next(self) -> tuple[FileTask, Chunk] | None:
        for t in self.tasks:
            for c in t.chunks:
                if not c.active and not c.complete:
                    return t, c
        unallocated = sum((t.size or 0) - t.cursor for t in self.tasks if t.ranged)
        for t in self.tasks:
            if t.ranged and t.size is not None and t.cursor < t.size:
                lo = self.config.min_chunk or request_floor(self.request_times.samples)
                n = (
                    t.piece
                    or self.config.chunk_size
                    or next_chunk_size(unallocated, self.config.connections, lo=lo)
                )
                c = Chunk(t.cursor, min(t.size, t.cursor + n))
                t.cursor = c.end or t.cursor
                t.chunks.append(c)
                return t, c
        # Nothing left to allocate: take the back half of the biggest chunk still in flight.
        best: tuple[int, FileTask, Chunk] | None = None
        for t in self.tasks:
            if not t.ranged or t.piece:  # pieces are the unit peers offer and check: never cut
                continue
            for c in t.chunks:
                if c.active and c.end is not None:
                    left = c.end - (c.start + c.done + c.buffered)
                    if best is None or left > best[0]:
                        best = (left, t, c)
        if best is None:
            return None
        _, t, c = best
        assert c.end is not None
        cut = split_point(c.start, c.done + c.buffered, c.end)
        if cut is None:
            return None
        new = Chunk(cut, c.end)
        c.end = cut
        t.chunks.append(new)
        return t, new

    def _busy(self) -> bool:
        return any(c.active for t in self.tasks for c in t.chunks)

    async def _worker(self) -> None:
        while True:
            item = self._next()
            if item is None:
                if not self._busy():
                    return
                await asyncio.sleep(0.05)
                continue
            t, c = item
            c.active = True
            try:
                await self._fetch(t, c)
            finally:
                c.active = False
                c.buffered = 0
                t.changed.set()

    async def _fetch(self, t: FileTask, c: Chunk) -> None:
        attempt = 0
        while True:
            before = c.done
            try:
                await self._stream(t, c)
                if c.end is None:
                    c.end = c.done  # size learned at EOF
                if not c.complete:
                    raise TransientSourceError(
                        f"{t.rf.path}: response ended early at byte {c.start + c.done} of {c.end}"
                    )
                if t.complete():
                    self.on_event(ProgressEvent("file_done", t.rf.path, nbytes=t.size or 0))
                return
            except TransientSourceError as exc:
                if c.done - before >= 8 * MiB:
                    attempt = 0  # real progress: this is a flaky link, not a dead one
                attempt += 1
                if attempt > self.config.retries:
                    raise SourceError(f"{exc.message} (gave up after {self.config.retries} retries)") from exc
                if not t.ranged:  # cannot resume mid-file: start the stream again
                    c.done = 0
                    with contextlib.suppress(OSError):
                        _with_fd(t.dest, os.ftruncate, 0)
                delay = backoff(attempt, self.config.retry_base)
                self.on_event(
                    ProgressEvent(
                        "retry", t.rf.path, message=f"{exc.message}; retry {attempt} in {delay:.1f}s"
                    )
                )
                await asyncio.sleep(delay)

    async def _stream(self, t: FileTask, c: Chunk) -> None:
        pos = c.start + c.done
        pieces: list[bytes] = []  # received blocks, written with one pwritev: no concatenation copy

        async def flush() -> None:
            nonlocal pos, pieces
            batch, pieces = pieces, []
            c.buffered = 0
            limit = sum(map(len, batch))
            if c.end is not None:
                limit = min(limit, c.end - pos)
            if limit <= 0:
                return
            if t.size is None and self.unknown_room is not None:
                room, keep = self.unknown_room
                if sum(x.done_bytes() for x in self.tasks if x.size is None) + limit > room:
                    raise InsufficientSpaceError(
                        f"{t.rf.path}: the origin gave no size and sent more than the "
                        f"{format_bytes(room)} this filesystem can spare (keeping {format_bytes(keep)} "
                        "free; MODELCACHE_RESERVE sets that)"
                    )
            try:
                await asyncio.to_thread(_with_fd, t.dest, _pwritev_all, batch, limit, pos)
            except OSError as exc:
                raise _disk_error(exc, self.staging) from exc
            pos += limit
            c.done += limit
            t.dirty = True
            t.changed.set()
            self.on_event(ProgressEvent("advance", t.rf.path, nbytes=limit))

        if c.end is not None and pos >= c.end:
            return
        # No source checksum: start early and keep what the neighbour wrote there as a witness.
        overlap = min(self.config.overlap, pos) if t.ranged and not t.rf.sha256 else 0
        if overlap and isinstance(self.source, PeerHooks) and not self.source.wants_overlap(t.rf, pos):
            overlap = 0  # this piece will come from a peer and be checked against its sha256
        head = bytearray()
        started, first_at, first_len, got = time.monotonic(), 0.0, 0, 0
        stream = self._guarded(self.source.read(t.rf, pos - overlap, c.end), t)
        async with contextlib.aclosing(stream):
            async for data in stream:
                if not got:
                    first_at, first_len = time.monotonic(), len(data)
                got += len(data)
                if len(head) < overlap:
                    take = overlap - len(head)
                    head += data[:take]
                    data = data[take:]
                    if len(head) == overlap:
                        t.claims.append((pos - overlap, overlap, hashlib.sha256(head).digest()))
                    if not data:
                        continue
                if self.limiter is not None:
                    await self.limiter.take(len(data))
                self.bytes_fetched += len(data)
                pieces.append(data)
                c.buffered += len(data)
                if c.end is not None and pos + c.buffered >= c.end:
                    break  # reached the (possibly shortened) end
                if c.buffered >= WRITE_BLOCK:
                    await flush()
        await flush()
        self.request_times.add(started, first_at, first_len, time.monotonic(), got)

    async def _guarded(self, stream: AsyncGenerator[bytes, None], t: FileTask) -> AsyncGenerator[bytes, None]:
        """`stream`, failing as a retryable error when the origin stalls or trickles.

        Only time spent waiting on the origin counts (not --limit-rate's sleeps), so a slow but
        steady link passes and a 1 byte/s drip does not hold a connection forever.
        """
        window, min_rate = self.config.stall_window, self.config.min_rate
        waited, got = 0.0, 0
        async with contextlib.aclosing(stream):
            while True:
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(window):
                        data = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise TransientSourceError(f"{t.rf.path}: no data for {window:g}s (stalled)") from None
                waited += time.monotonic() - t0
                got += len(data)
                if waited >= window:
                    if got < min_rate * waited:
                        raise TransientSourceError(
                            f"{t.rf.path}: stalled at {got / waited:.0f} B/s over {waited:.0f}s "
                            f"(minimum {min_rate} B/s)"
                        )
                    waited, got = 0.0, 0
                yield data

    # -- hashing -----------------------------------------------------------------------------
    async def _piece_hasher(self, t: FileTask) -> None:
        """Hash each piece once it is completely written (any order), for peers to fetch and check."""
        assert t.size is not None
        count = (t.size + t.piece - 1) // t.piece
        hooks = self.source if isinstance(self.source, PeerHooks) else None
        while len(t.pieces) < count:
            written = t.written()
            for index in range(count):
                if index in t.pieces:
                    continue
                a, b = t.piece_bounds(index)
                if not any(s <= a and b <= e for s, e in written):
                    continue
                known = hooks.piece_hash(t.rf, index) if hooks is not None else None
                if known is None:
                    h = hashlib.sha256()
                    await asyncio.to_thread(_with_fd, t.dest, _hash_range, h, a, b)
                    known = h.hexdigest()
                t.pieces[index] = known
                t.dirty = True
                t.pieces_changed.set()
            if len(t.pieces) >= count:
                break
            t.changed.clear()
            if t.written() == written:
                await t.changed.wait()

    async def _hasher(self, t: FileTask) -> None:
        if t.sha256 is not None:
            return
        h = hashlib.sha256()
        pos = 0
        while True:
            if not t.ranged:
                # A non-ranged stream may restart from zero on retry: hash once it is complete.
                if t.complete():
                    pos = await asyncio.to_thread(_with_fd, t.dest, _hash_range, h, 0, t.chunks[0].done)
                    break
            else:
                prefix = t.contiguous()
                if pos < prefix:
                    pos = await asyncio.to_thread(_with_fd, t.dest, _hash_range, h, pos, prefix)
                    continue
                if t.complete():
                    break
            t.changed.clear()
            await t.changed.wait()
        t.sha256 = h.hexdigest()
        t.dirty = True


def _with_fd(path: Path, fn: Callable[Concatenate[int, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(fd, ...)` on `path` opened for this one call (never through a symlink)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fn(fd, *args, **kwargs)
    finally:
        os.close(fd)


def _pwritev_all(fd: int, pieces: list[bytes], limit: int, offset: int) -> None:
    """Write the first `limit` bytes of `pieces` at `offset`; pwritev may write less than asked."""
    views: list[memoryview] = []
    left = limit
    for p in pieces:
        if left <= 0:
            break
        views.append(memoryview(p)[:left])
        left -= len(views[-1])
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _hash_range(fd: int, h: Any, start: int, end: int) -> int:
    pos = start
    while pos < end:
        data = os.pread(fd, min(HASH_BLOCK, end - pos), pos)
        if not data:
            raise IntegrityError("staging file shrank while hashing")
        h.update(data)
        pos += len(data)
    return pos


def _disk_error(exc: OSError, where: Path) -> ModelcacheError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(f"no space left on the device holding {where}")
    return ModelcacheError(f"cannot write to {where}: {exc.strerror}")


def _env_reserve() -> int | None:
    """MODELCACHE_RESERVE as bytes (a quantity such as 2Gi), or None when unset."""
    raw = os.environ.get("MODELCACHE_RESERVE", "").strip()
    if not raw:
        return None
    try:
        return parse_quantity(raw)
    except UsageError as exc:
        raise UsageError(f"MODELCACHE_RESERVE: {exc.message}") from None


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(path: Path, needed: int) -> None:
    free = free_bytes(path)
    if needed > free:
        raise InsufficientSpaceError(
            f"need {format_bytes(needed)} but only {format_bytes(free)} is free on the device holding {path}"
        )
