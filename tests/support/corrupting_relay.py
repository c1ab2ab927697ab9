"""A lying peer: a relay in front of a real peer server that flips one byte of every file body.

Manifests pass through untouched (so the piece hashes it advertises are the honest ones), which is
what a node with bad RAM, a broken NIC offload or a tampering middlebox looks like. One request per
connection (`Connection: close` both ways) keeps it small.

    python -m tests.support.corrupting_relay --listen 127.0.0.1:0 --upstream 127.0.0.1:8477
prints ``PORT=<n>`` and relays until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from collections.abc import Sequence
from types import TracebackType

FLIP_AT = 4096  # body offset of the flipped byte (inside the first piece of any range)


class CorruptingRelay:
    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self.listen = listen
        self.port = 0
        self.corrupted = 0  # file bodies altered so far
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            keep = [ln for ln in lines[1:] if ln and not ln.lower().startswith("connection:")]
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            up_writer.write(
                ("\r\n".join([lines[0], *keep, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
            )
            await up_writer.drain()
            response = await up_reader.read()
            up_writer.close()
            resp_head, sep, body = response.partition(b"\r\n\r\n")
            if "/files/" in target and len(body) > FLIP_AT:
                body = body[:FLIP_AT] + bytes([body[FLIP_AT] ^ 0xFF]) + body[FLIP_AT + 1 :]
                self.corrupted += 1
            resp_lines = [
                ln
                for ln in resp_head.decode("latin-1").split("\r\n")
                if not ln.lower().startswith("connection:")
            ]
            writer.write(("\r\n".join([*resp_lines, "Connection: close"])).encode("latin-1") + sep + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()


class RelayThread:
    """The relay on its own event loop in a daemon thread (for synchronous tests)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.relay = CorruptingRelay(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> CorruptingRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.relay.start(), self._loop).result(10)
        return self.relay

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.corrupting_relay")
    parser.add_argument("--listen", type=_addr, default=("127.0.0.1", 0))
    parser.add_argument("--upstream", type=_addr, required=True)
    args = parser.parse_args(argv)

    async def run() -> None:
        relay = CorruptingRelay(args.upstream, args.listen)
        print(f"PORT={await relay.start()}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
