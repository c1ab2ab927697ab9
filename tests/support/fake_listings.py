"""Object-store endpoints whose listings name whatever a test wants (`../../tmp/x`, NUL, ...).

The real emulators (gcp-storage-emulator, Azurite) refuse or normalise such names, but a hostile or
buggy store, a proxy, or a compromised endpoint need not: this server speaks just enough of the
GCS JSON API (list + media download) and Azure's List Blobs + Get Blob to hand them to us.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape

from aiohttp import web

BODY = b"not a model\n"
MiB = 1 << 20
HUGE = 65 * MiB  # just past the 64 MiB a metadata answer may be


class FakeListings:
    """`endless=True`: every listing page names 1000 new objects and points to a next page, forever.
    `huge=True`: one well-formed listing page padded to HUGE bytes, chunked (no Content-Length)."""

    def __init__(self, names: list[str], *, endless: bool = False, huge: bool = False) -> None:
        self.names = names
        self.endless = endless
        self.huge = huge
        self.pages = 0  # listing pages served
        self.downloads: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/storage/v1/b/{bucket}/o", self._gcs_list)
        app.router.add_get("/download/storage/v1/b/{bucket}/o/{name:.*}", self._download)
        app.router.add_get("/{account}/{container}", self._azure_list)
        app.router.add_get("/{account}/{container}/{name:.*}", self._download)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _page(self) -> tuple[list[str], str]:
        """This page's names and the next page's token ("" on the last page)."""
        self.pages += 1
        if not self.endless:
            return self.names, ""
        return [f"models/p{self.pages}-{i}.bin" for i in range(1000)], str(self.pages + 1)

    async def _padded(self, request: web.Request, head: bytes, pad: bytes, tail: bytes) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(head)
        piece = pad * (MiB // len(pad))
        for _ in range(HUGE // MiB):
            await resp.write(piece)
        await resp.write(tail)
        await resp.write_eof()
        return resp

    async def _gcs_list(self, request: web.Request) -> web.StreamResponse:
        if self.huge:
            return await self._padded(request, b'{"items": [], "pad": "', b"x", b'"}')
        names, token = self._page()
        items = [{"name": n, "size": str(len(BODY)), "generation": "1"} for n in names]
        return web.json_response({"items": items, **({"nextPageToken": token} if token else {})})

    async def _azure_list(self, request: web.Request) -> web.StreamResponse:
        if self.huge:
            head = b"<?xml version='1.0'?><EnumerationResults><Blobs></Blobs><!-- "
            return await self._padded(request, head, b"x", b" --></EnumerationResults>")
        names, token = self._page()
        blobs = "".join(
            f"<Blob><Name>{escape(n)}</Name><Properties><Content-Length>{len(BODY)}</Content-Length>"
            f'<Etag>"0x1"</Etag></Properties></Blob>'
            for n in names
        )
        xml = (
            f"<?xml version='1.0'?><EnumerationResults><Blobs>{blobs}</Blobs>"
            f"<NextMarker>{token}</NextMarker></EnumerationResults>"
        )
        return web.Response(body=xml.encode(), content_type="application/xml")

    async def _download(self, request: web.Request) -> web.Response:
        self.downloads.append(request.match_info["name"])
        return web.Response(body=BODY, headers={"ETag": '"0x1"'})
