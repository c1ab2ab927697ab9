"""Node-to-node fill on loopback: three stores, real peer servers, a real origin, a lying relay.

Each "node" is a Store plus a PeerServer on 127.0.0.1; pulls run through the engine in this
process with `TransferConfig(peers=...)`. Byte counts come from the origin's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from modelcache import engine
from modelcache.peer import API
from modelcache.peer.auth import HEADER, sign
from modelcache.peer.server import PeerServer
from modelcache.peer.source import swarm
from modelcache.store import Store
from modelcache.transfer import TransferConfig
from modelcache.uri import parse_uri
from tests.conftest import write_random
from tests.support.corrupting_relay import CorruptingRelay
from tests.support.origin import Origin

MiB = 1 << 20
TOKEN = "peer-token-for-tests"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def node(root: Path) -> AsyncIterator[tuple[Store, str]]:
    store = Store(root)
    store.ensure()
    server = PeerServer(store, TOKEN, host="127.0.0.1", port=0)
    port = await server.start()
    try:
        yield store, f"127.0.0.1:{port}"
    finally:
        await server.stop()


def config(peers: list[str], me: str | None, key: str) -> TransferConfig:
    return TransferConfig(
        connections=4,
        retries=3,
        retry_base=0.05,
        piece_hashes=True,
        peers=swarm(key, [(p, TOKEN) for p in peers], me) if peers else None,
    )


def published(store: Store, url: str, name: str) -> bytes:
    rec = store.lookup(url)
    assert rec is not None
    return (Path(rec.path) / name).read_bytes()


def test_fill_from_peers_past_a_liar_and_a_dead_peer(tmp_path: Path, origin_root: Path) -> None:
    data = write_random(origin_root / "w.bin", 40 * MiB + 123)
    with Origin(origin_root) as origin:
        url = origin.url_for("/w.bin")
        key = parse_uri(url).key

        async def scenario() -> None:
            async with node(tmp_path / "a") as (a, addr_a), node(tmp_path / "b") as (b, addr_b):
                await engine.pull(a, url, config=config([], None, key))
                assert origin.bytes_sent_for("/w.bin") >= len(data)
                origin.reset_stats()
                # B fills from A: the origin sends only the few KiB that cross-check neighbours.
                await engine.pull(b, url, config=config([addr_a], addr_b, key))
                assert published(b, url, "w.bin") == data
                assert origin.bytes_sent_for("/w.bin") < len(data) // 20
                origin.reset_stats()
                # C: a relay in front of A that flips bytes, a dead peer, and B.
                relay = CorruptingRelay(("127.0.0.1", int(addr_a.rsplit(":", 1)[1])))
                relay_port = await relay.start()
                dead = f"127.0.0.1:{_closed_port()}"
                try:
                    async with node(tmp_path / "c") as (c, addr_c):
                        peers = [f"127.0.0.1:{relay_port}", dead, addr_b]
                        await engine.pull(c, url, config=config(peers, addr_c, key))
                        assert published(c, url, "w.bin") == data
                finally:
                    await relay.stop()
                assert relay.corrupted >= 1  # it did lie, and cost at most a piece per lie
                assert origin.bytes_sent_for("/w.bin") < len(data) // 4

        asyncio.run(scenario())


def test_three_nodes_at_once_share_the_origin(tmp_path: Path, origin_root: Path) -> None:
    data = write_random(origin_root / "m.bin", 32 * MiB + 5)
    with Origin(origin_root, rate_limit=16 * MiB) as origin:
        url = origin.url_for("/m.bin")
        key = parse_uri(url).key

        async def scenario() -> None:
            async with (
                node(tmp_path / "a") as (a, addr_a),
                node(tmp_path / "b") as (b, addr_b),
                node(tmp_path / "c") as (c, addr_c),
            ):
                everyone = [addr_a, addr_b, addr_c]
                await asyncio.gather(
                    *(
                        engine.pull(s, url, config=config(everyone, me, key))
                        for s, me in zip((a, b, c), everyone, strict=True)
                    )
                )
                for s in (a, b, c):
                    assert published(s, url, "m.bin") == data

        asyncio.run(scenario())
        # Each piece is the job of one owner: far less than the 3 copies of three lone pulls.
        assert origin.bytes_sent_for("/m.bin") < 1.5 * len(data)


def test_peer_server_wants_signatures_and_offers_only_good_files(tmp_path: Path, origin_root: Path) -> None:
    data = write_random(origin_root / "x.bin", 9 * MiB)
    with Origin(origin_root, digest=True) as origin:
        url = origin.url_for("/x.bin")
        key = parse_uri(url).key

        async def scenario() -> None:
            async with node(tmp_path / "a") as (a, addr_a), aiohttp.ClientSession() as http:
                await engine.pull(a, url, config=config([], None, key))
                path = f"{API}/{key}/files/x.bin"
                base = f"http://{addr_a}"
                async with http.get(base + path, headers={"Range": "bytes=0-9"}) as resp:
                    assert resp.status == 401
                    assert TOKEN not in await resp.text()
                wrong = {"Range": "bytes=0-9", HEADER: sign("not-the-token", "GET", path, "bytes=0-9")}
                async with http.get(base + path, headers=wrong) as resp:
                    assert resp.status == 401
                good = {"Range": "bytes=10-19", HEADER: sign(TOKEN, "GET", path, "bytes=10-19")}
                async with http.get(base + path, headers=good) as resp:
                    assert resp.status == 206 and await resp.read() == data[10:20]
                    assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
                # A published copy damaged on disk is never offered (re-checked when first hashed).
                rec = a.lookup(url)
                assert rec is not None
                victim = Path(rec.path) / "x.bin"
                os.chmod(victim, stat.S_IRUSR | stat.S_IWUSR)
                with open(victim, "r+b") as fh:
                    fh.seek(5 * MiB)
                    fh.write(b"\0" * 8)
                fresh = PeerServer(a, TOKEN, host="127.0.0.1", port=0)
                port = await fresh.start()
                try:
                    doc = await fresh.describe(key)
                    assert doc is not None and doc["files"] == {}
                    good = {HEADER: sign(TOKEN, "GET", path)}
                    async with http.get(f"http://127.0.0.1:{port}{path}", headers=good) as resp:
                        assert resp.status == 404
                finally:
                    await fresh.stop()
                assert hashlib.sha256(data).hexdigest() != hashlib.sha256(victim.read_bytes()).hexdigest()

        asyncio.run(scenario())


def test_a_hostile_peer_costs_pieces_not_correctness(tmp_path: Path, origin_root: Path) -> None:
    """A peer that lists every piece with made-up hashes, answers with wrong ranges, too long or
    wrong bytes: each lie costs one piece (then the peer is avoided); the model is the origin's."""
    from aiohttp import web

    data = write_random(origin_root / "h.bin", 20 * MiB + 1)
    with Origin(origin_root) as origin:
        url = origin.url_for("/h.bin")
        key = parse_uri(url).key
        answers = iter(["range", "long", "bytes"] * 10)
        revision: list[str | None] = []

        async def manifest(request: web.Request) -> web.Response:
            pieces = {str(i): hashlib.sha256(str(i).encode()).hexdigest() for i in range(6)}
            etag = None
            return web.json_response(
                {
                    "revision": revision[0],
                    "files": {
                        "h.bin": {"size": len(data), "etag": etag, "piece_size": 4 * MiB, "pieces": pieces}
                    },
                }
            )

        async def files(request: web.Request) -> web.Response:
            kind = next(answers)
            first, last = (int(x) for x in request.headers["Range"][6:].split("-"))
            body = data[first : last + 1]
            if kind == "range":
                return web.Response(
                    status=206, body=body, headers={"Content-Range": f"bytes 0-{len(body) - 1}/1"}
                )
            if kind == "long":
                rng = f"bytes {first}-{last}/{len(data)}"
                return web.Response(status=206, body=body + b"x", headers={"Content-Range": rng})
            rng = f"bytes {first}-{last}/{len(data)}"
            return web.Response(status=206, body=bytes(len(body)), headers={"Content-Range": rng})

        async def scenario() -> None:
            async with node(tmp_path / "a") as (a, addr_a):
                source_rev = (await _resolve(url)).revision
                revision.append(source_rev)
                app = web.Application()
                app.router.add_get(API + f"/{key}/manifest", manifest)
                app.router.add_get(API + f"/{key}/files/{{path:.+}}", files)
                runner = web.AppRunner(app)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                try:
                    await engine.pull(a, url, config=config([f"127.0.0.1:{port}"], addr_a, key))
                finally:
                    await runner.cleanup()
                assert published(a, url, "h.bin") == data

        asyncio.run(scenario())
        assert origin.bytes_sent_for("/h.bin") < 2 * len(data)


async def _resolve(url: str) -> Any:
    from modelcache.sources import open_source

    source = open_source(parse_uri(url))
    try:
        return await source.resolve()
    finally:
        await source.aclose()


def test_a_downloading_node_offers_only_written_and_hashed_pieces(tmp_path: Path, origin_root: Path) -> None:
    data = write_random(origin_root / "s.bin", 32 * MiB)
    with Origin(origin_root, rate_limit=2 * MiB) as origin:
        url = origin.url_for("/s.bin")
        key = parse_uri(url).key

        async def scenario() -> None:
            async with node(tmp_path / "a") as (a, addr_a), aiohttp.ClientSession() as http:
                cfg = TransferConfig(connections=2, piece_hashes=True, checkpoint_interval=0.1)
                pulling = asyncio.create_task(engine.pull(a, url, config=cfg))
                server = PeerServer(a, TOKEN, host="127.0.0.1", port=0)
                doc = None
                for _ in range(600):  # until the first piece is on disk and hashed (a condition, not a time)
                    doc = await server.describe(key)
                    if doc and doc["files"].get("s.bin", {}).get("pieces"):
                        break
                    await asyncio.sleep(0.05)
                assert doc is not None and not doc["complete"]
                listed = {int(i): h for i, h in doc["files"]["s.bin"]["pieces"].items()}
                index, digest = next(iter(listed.items()))
                assert hashlib.sha256(data[index * 4 * MiB : (index + 1) * 4 * MiB]).hexdigest() == digest
                path = f"{API}/{key}/files/s.bin"
                a0, b0 = index * 4 * MiB, (index + 1) * 4 * MiB - 1
                rng = f"bytes={a0}-{b0}"
                async with http.get(
                    f"http://{addr_a}{path}", headers={"Range": rng, HEADER: sign(TOKEN, "GET", path, rng)}
                ) as resp:
                    assert resp.status == 206 and await resp.read() == data[a0 : b0 + 1]
                last = f"bytes={len(data) - 10}-{len(data) - 1}"  # the tail: not fetched at 2 MiB/s yet
                async with http.get(
                    f"http://{addr_a}{path}", headers={"Range": last, HEADER: sign(TOKEN, "GET", path, last)}
                ) as resp:
                    assert resp.status == 404
                pulling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pulling

        asyncio.run(scenario())


def test_a_node_that_started_alone_learns_of_a_latecomer(tmp_path: Path, origin_root: Path) -> None:
    """A starts with no peers; B starts later with A as its peer. A's discovery (asked again while it
    downloads) brings B in, so the two split the origin's work and A takes pieces from B."""
    from modelcache.peer import Peer
    from modelcache.peer.source import PeerSettings, Swarm

    data = write_random(origin_root / "late.bin", 32 * MiB)
    with Origin(origin_root, rate_limit=2 * MiB) as origin:
        url = origin.url_for("/late.bin")
        key = parse_uri(url).key

        async def scenario() -> None:
            async with node(tmp_path / "a") as (a, addr_a), node(tmp_path / "b") as (b, addr_b):
                known: list[tuple[str, str]] = []

                async def discover() -> list[tuple[str, str]]:
                    return list(known)

                swarm_a = Swarm(PeerSettings((), me=addr_a, poll=0.1, rediscover=0.2), key, discover)
                cfg_a = TransferConfig(
                    connections=2, retries=3, retry_base=0.05, checkpoint_interval=0.2, peers=swarm_a
                )
                pulling = asyncio.create_task(engine.pull(a, url, config=cfg_a))
                server = PeerServer(a, TOKEN, host="127.0.0.1", port=0)
                for _ in range(600):  # until A has a piece on disk (a condition, not a time)
                    doc = await server.describe(key)
                    if doc and doc["files"].get("late.bin", {}).get("pieces"):
                        break
                    await asyncio.sleep(0.05)
                known.append((addr_b, TOKEN))
                settings_b = PeerSettings((Peer(addr_a, TOKEN),), me=addr_b, poll=0.1)
                cfg_b = TransferConfig(connections=2, retries=3, retry_base=0.05, checkpoint_interval=0.2)
                cfg_b.peers = Swarm(settings_b, key)
                await asyncio.gather(pulling, engine.pull(b, url, config=cfg_b))
                assert published(a, url, "late.bin") == data and published(b, url, "late.bin") == data
                assert swarm_a.peer_bytes > 0  # A took pieces B fetched: B had joined A's swarm

        asyncio.run(scenario())
