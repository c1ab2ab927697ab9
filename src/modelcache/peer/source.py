"""A `Source` that takes each piece from a peer that has it, else from the origin.

Why pieces: a piece is the unit a peer can prove (its sha256 is in the peer's manifest), so the
transfer runs with one chunk per piece (`TransferConfig.piece_hashes`). For each piece:

1. a peer whose manifest lists the piece serves it; its bytes must hash to the listed sha256 before
   one of them is handed to the transfer. A peer that fails, stalls or lies costs that one piece and
   is avoided for a while (longer for a lie);
2. else, when several nodes want the model at once, one of them is the piece's *owner* (rendezvous
   hashing over the live swarm, this node included): only the owner asks the origin, the others
   wait for it to offer the piece. An owner that is dead or makes no progress for `stall` seconds
   drops out of the swarm, so its pieces get new owners;
3. else (this node owns it, or nobody will), the origin.

Partial pieces (the few bytes a transfer re-reads to cross-check its neighbour, a resumed chunk)
always come from the origin. The origin is always what `resolve` asks, so the snapshot (revision,
sizes, validators, checksums) is the origin's, and a peer's manifest is used only when it describes
that same snapshot. Integrity end to end: the transfer still checks each finished file against the
source's sha256; without one, `attest` compares it with the whole-file sha256 other nodes recorded,
and an integrity failure makes this source origin-only (`distrust`) for the engine's second try.
Peer connections are direct (never through HTTP(S)_PROXY): peers are nodes of the same cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from yarl import URL

from modelcache.errors import IntegrityError, SourceError
from modelcache.peer import API, Peer
from modelcache.peer.auth import HEADER, sign
from modelcache.peer.server import valid_pieces
from modelcache.sources.base import RemoteFile, Snapshot, Source
from modelcache.sources.transport import read_limited
from modelcache.store.manifest import FileEntry
from modelcache.transfer import piece_size

log = logging.getLogger("modelcache.peer")


@dataclass(frozen=True)
class PeerSettings:
    """How to use peers. `me` is this node's own peer address (it takes part in piece ownership)."""

    peers: tuple[Peer, ...]
    me: str | None = None
    poll: float = 0.3  # seconds between manifest polls while downloading
    stall: float = 10.0  # an owner with no new piece for this long drops out of the swarm
    max_wait: float = 20.0  # longest wait for an owner before the origin (below the transfer's stall window)
    avoid_dead: float = 5.0  # a peer that cannot be reached is skipped this long
    avoid_lying: float = 300.0  # a peer that served bytes that fail their sha256
    connect_timeout: float = 2.0
    min_rate: int = 1 << 20  # bytes/s a peer must sustain for one piece, else it is "slow"
    rediscover: float = 5.0  # seconds between asking the caller for nodes that joined since


@dataclass
class _View:
    """What one peer offers for this model, as of its last manifest."""

    pieces: dict[str, dict[int, str]] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    count: int = 0
    progress_at: float = field(default_factory=time.monotonic)
    avoid_until: float = 0.0
    inflight: int = 0


Discover = Callable[[], Awaitable[Sequence[tuple[str, str]]]]


class Swarm:
    """Peers for one pull of model `key` (`TransferConfig.peers`): the caller's plain data, plus
    what this pull learns that must outlive one transfer attempt (distrust, byte counts)."""

    def __init__(self, settings: PeerSettings, key: str, discover: Discover | None = None) -> None:
        self.settings = settings
        self.key = key
        self.discover = discover  # the caller's fresh list of (address, token), e.g. from the cluster
        self.distrusted = False
        self.peer_bytes = 0
        self.origin_bytes = 0

    def attach(self, origin: Source, snapshot: Snapshot) -> PeerSource:
        return PeerSource(origin, self, snapshot)


class PeerSource(Source):
    def __init__(self, origin: Source, swarm: Swarm, snapshot: Snapshot) -> None:
        super().__init__(origin.uri, origin.options)
        self.origin = origin
        self.swarm = swarm
        self.settings = settings = swarm.settings
        self.key = swarm.key
        self.supports_revision = origin.supports_revision
        self.snapshot: Snapshot | None = snapshot
        self.views: dict[str, _View] = {p.address: _View() for p in settings.peers}
        self.peers = {p.address: p for p in settings.peers}
        self._verified: dict[tuple[str, int], str] = {}
        self._used: set[str] = set()  # files that got at least one piece from a peer
        self._updated = asyncio.Event()
        self._ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tracker: asyncio.Task[None] | None = None

    @property
    def distrusted(self) -> bool:
        return self.swarm.distrusted

    # -- Source ------------------------------------------------------------------------------
    async def resolve(self) -> Snapshot:
        self.snapshot = await self.origin.resolve()
        return self.snapshot

    def _alone(self) -> bool:
        return not self.peers and self.swarm.discover is None

    async def _started(self) -> None:
        """Start watching peers; every reader waits for the first look at their manifests."""
        if self._alone():
            return
        if self._tracker is None:
            self._tracker = asyncio.create_task(self._track())
        await self._ready.wait()

    def supports_ranges(self, f: RemoteFile) -> bool:
        return self.origin.supports_ranges(f)

    def finalize(self, snapshot: Snapshot, download_dir: Path, files_dir: Path) -> list[FileEntry]:
        return self.origin.finalize(snapshot, download_dir, files_dir)

    async def aclose(self) -> None:
        await self.detach()
        await self.origin.aclose()

    async def detach(self) -> None:
        if self._tracker is not None:
            self._tracker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tracker
            self._tracker = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def read(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        if self.distrusted or self._alone() or f.size is None or not self.origin.supports_ranges(f):
            async for block in self._from_origin(f, start, end):
                yield block
            return
        await self._started()
        piece = piece_size(f.size)
        stop = f.size if end is None else end
        pos = start
        while pos < stop:
            index = pos // piece
            a, b = index * piece, min(f.size, (index + 1) * piece)
            seg = min(stop, b)
            data = await self._piece_from_peers(f, index) if (pos, seg) == (a, b) else None
            if data is None:
                if (pos, seg) != (a, b):
                    self._verified.pop((f.path, index), None)  # part of it came from elsewhere
                async for block in self._from_origin(f, pos, seg):
                    yield block
            else:
                yield data  # one block: the transfer writes it with one pwritev, no copies
            pos = seg

    # -- PeerHooks ---------------------------------------------------------------------------
    def wants_overlap(self, f: RemoteFile, start: int) -> bool:
        """Whether a read at `start` should re-read its neighbour's tail from the origin.

        That cross-check catches an origin changing under us; a piece a peer will give us is
        checked against its sha256 instead, and the extra origin request would cost a round trip
        through the origin's (busy) uplink for every piece.
        """
        if self.distrusted or not self.peers or not f.size:
            return True
        piece = piece_size(f.size)
        if start % piece:
            return True  # a resumed, partial piece comes from the origin
        index = start // piece
        if any(index in self.views[a].pieces.get(f.path, {}) for a in self._live()):
            return False
        return self._owner(f, index) is None

    def piece_hash(self, f: RemoteFile, index: int) -> str | None:
        return self._verified.pop((f.path, index), None)

    async def attest(self, f: RemoteFile, sha256: str) -> None:
        """Compare with what the other nodes recorded; wait a little for one that has it."""
        if f.path not in self._used:
            return  # every byte came from the origin: nothing of a peer's to check
        deadline = time.monotonic() + self.settings.max_wait
        await self._started()
        while True:
            await self._poll_all()
            seen = {a: v.sha256[f.path] for a, v in self.views.items() if f.path in v.sha256}
            wrong = [a for a, s in seen.items() if s != sha256]
            if wrong:
                raise IntegrityError(
                    f"{f.path}: sha256 {sha256[:12]}… differs from the {seen[wrong[0]][:12]}… that "
                    f"node {wrong[0]} recorded; fetching again from the origin"
                )
            if seen or time.monotonic() > deadline or not self._live():
                if not seen:
                    log.info("%s: no peer has a whole-file sha256 yet; every piece was checked", f.path)
                return
            await asyncio.sleep(self.settings.poll)

    def distrust(self) -> None:
        if not self.distrusted and self.peers:
            log.warning("%s: integrity failure with peers involved; origin only from now on", self.shown)
        self.swarm.distrusted = True

    # -- origin ------------------------------------------------------------------------------
    async def _from_origin(self, f: RemoteFile, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        stream = self.origin.read(f, start, end)
        async with contextlib.aclosing(stream):
            async for block in stream:
                self.swarm.origin_bytes += len(block)
                yield block

    # -- peers -------------------------------------------------------------------------------
    def _live(self) -> list[str]:
        now = time.monotonic()
        return [a for a, v in self.views.items() if v.avoid_until <= now]

    def _avoid(self, address: str, seconds: float, why: str) -> None:
        view = self.views[address]
        view.avoid_until = time.monotonic() + seconds
        view.pieces, view.count = {}, 0
        log.info("peer %s avoided for %.0fs: %s", address, seconds, why)
        self._updated.set()

    def _owner(self, f: RemoteFile, index: int) -> str | None:
        """The swarm member that fetches this piece from the origin (None: this node)."""
        me = self.settings.me
        if me is None:
            return None
        now = time.monotonic()
        members = [me] + [
            a
            for a in self._live()
            if (a != me and now - self.views[a].progress_at < self.settings.stall) or self._complete(a, f)
        ]
        best = max(members, key=lambda a: hashlib.sha256(f"{a}\0{f.path}\0{index}".encode()).digest())
        return None if best == me else best

    def _complete(self, address: str, f: RemoteFile) -> bool:
        assert f.size is not None
        return len(self.views[address].pieces.get(f.path, {})) * piece_size(f.size) >= f.size

    async def _piece_from_peers(self, f: RemoteFile, index: int) -> bytes | None:
        """The verified piece from some peer, or None: ask the origin."""
        waited_since = time.monotonic()
        while not self.distrusted:
            holders = [a for a in self._live() if index in self.views[a].pieces.get(f.path, {})]
            if holders:
                address = min(holders, key=lambda a: (self.views[a].inflight, random.random()))
                expected = self.views[address].pieces[f.path][index]
                data = await self._fetch(address, f, index)
                if data is None:
                    continue
                digest = await asyncio.to_thread(_sha256, data)
                if digest != expected:
                    self._avoid(
                        address, self.settings.avoid_lying, f"piece {index} of {f.path} failed its sha256"
                    )
                    continue
                self._verified[(f.path, index)] = expected
                self._used.add(f.path)
                self.swarm.peer_bytes += len(data)
                return data
            if self._owner(f, index) is None or time.monotonic() - waited_since > self.settings.max_wait:
                return None
            self._updated.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._updated.wait(), self.settings.poll * 2)
        return None

    async def _fetch(self, address: str, f: RemoteFile, index: int) -> bytes | None:
        assert f.size is not None
        piece = piece_size(f.size)
        a, b = index * piece, min(f.size, (index + 1) * piece)
        peer = self.peers[address]
        path = f"{API}/{self.key}/files/{_quote(f.path)}"
        rng = f"bytes={a}-{b - 1}"
        view = self.views[address]
        view.inflight += 1
        limit = self.settings.connect_timeout + (b - a) / self.settings.min_rate
        try:
            async with asyncio.timeout(limit):
                headers = {"Range": rng, HEADER: sign(peer.token, "GET", path, rng)}
                async with self._client().get(URL(peer.base + path, encoded=True), headers=headers) as resp:
                    if resp.status == 503:  # busy: not a fault, try another holder
                        await asyncio.sleep(0.1)
                        return None
                    if (
                        resp.status != 206
                        or resp.headers.get("Content-Range") != f"bytes {a}-{b - 1}/{f.size}"
                    ):
                        self._avoid(
                            address, self.settings.avoid_dead, f"answered HTTP {resp.status} for a piece"
                        )
                        return None
                    if resp.content_length != b - a:
                        self._avoid(address, self.settings.avoid_dead, "announced a wrong length")
                        return None
                    data = await resp.read()  # bounded by the Content-Length just checked
                    if len(data) != b - a:
                        self._avoid(address, self.settings.avoid_dead, "sent a short or long piece")
                        return None
                    return data
        except TimeoutError:
            self._avoid(address, self.settings.avoid_dead * 6, f"slower than {self.settings.min_rate} B/s")
        except (aiohttp.ClientError, OSError) as exc:
            self._avoid(address, self.settings.avoid_dead, type(exc).__name__)
        finally:
            view.inflight -= 1
        return None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.settings.connect_timeout, sock_read=10
                ),
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
            )
        return self._session

    async def _track(self) -> None:
        last_discovery = time.monotonic()
        while True:
            await self._poll_all()
            self._ready.set()
            await asyncio.sleep(self.settings.poll)
            if (
                self.swarm.discover is not None
                and time.monotonic() - last_discovery >= self.settings.rediscover
            ):
                last_discovery = time.monotonic()
                await self._rediscover()

    async def _rediscover(self) -> None:
        """Add nodes that started on this model after us, so they share the origin's work."""
        assert self.swarm.discover is not None
        try:
            async with asyncio.timeout(10):
                pairs = await self.swarm.discover()
        except Exception as exc:  # the caller's cluster lookup failing costs only newcomers
            log.info("%s: peer discovery failed (%s)", self.key, type(exc).__name__)
            return
        for address, token in pairs:
            if address != self.settings.me and address not in self.peers:
                self.peers[address] = Peer(address, token)
                self.views[address] = _View()
                log.info("%s: new peer %s", self.key, address)

    async def _poll_all(self) -> None:
        now = time.monotonic()
        live = [a for a, v in self.views.items() if v.avoid_until <= now]
        await asyncio.gather(*(self._poll(a) for a in live))
        self._updated.set()

    async def _poll(self, address: str) -> None:
        peer = self.peers[address]
        path = f"{API}/{self.key}/manifest"
        try:
            async with asyncio.timeout(self.settings.connect_timeout + 3):
                headers = {HEADER: sign(peer.token, "GET", path)}
                async with self._client().get(URL(peer.base + path, encoded=True), headers=headers) as resp:
                    if resp.status == 404:
                        return  # alive, nothing yet (its progress clock runs from when we met it)
                    if resp.status != 200:
                        self._avoid(address, self.settings.avoid_dead, f"manifest: HTTP {resp.status}")
                        return
                    doc = json.loads(await read_limited(resp, f"peer {address}: manifest"))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, SourceError) as exc:
            self._avoid(address, self.settings.avoid_dead, f"manifest: {type(exc).__name__}")
            return
        self._absorb(address, doc)

    def _absorb(self, address: str, doc: object) -> None:
        """Keep what a peer's manifest says about files of *our* snapshot; ignore everything else."""
        snap = self.snapshot
        if snap is None or not isinstance(doc, dict) or doc.get("revision") != snap.revision:
            return
        files = doc.get("files")
        if not isinstance(files, dict):
            return
        view = self.views[address]
        pieces: dict[str, dict[int, str]] = {}
        shas: dict[str, str] = {}
        for rf in snap.files:
            got = files.get(rf.path)
            if not isinstance(got, dict) or rf.size is None or got.get("size") != rf.size:
                continue
            if got.get("piece_size") != piece_size(rf.size):
                continue
            if got.get("etag") is not None and rf.etag is not None and got.get("etag") != rf.etag:
                continue
            sha = got.get("sha256")
            source_sha = got.get("source_sha256")
            if rf.sha256 and ((sha and sha != rf.sha256.lower()) or (source_sha and source_sha != rf.sha256)):
                continue
            pieces[rf.path] = valid_pieces(got.get("pieces"))
            if isinstance(sha, str) and len(sha) == 64:
                shas[rf.path] = sha
        count = sum(len(p) for p in pieces.values())
        if count > view.count:
            view.progress_at = time.monotonic()
        view.pieces, view.sha256, view.count = pieces, shas, count


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def swarm(
    key: str, pairs: Sequence[tuple[str, str]], me: str | None = None, discover: Discover | None = None
) -> Swarm:
    """A Swarm for model `key` from (address, token) pairs, this node's own address left out;
    `discover` (optional) is asked every few seconds for nodes that joined since."""
    return Swarm(PeerSettings(tuple(Peer(a, t) for a, t in pairs if a != me), me=me), key, discover)
