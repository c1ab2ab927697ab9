"""What every source that speaks HTTP shares: one aiohttp session per pull.

The pool is unlimited because the engine already bounds concurrency; timeouts come from the pull's
options (a stalled read is retried by the engine); bodies are the stored bytes (no transparent
decompression: sizes and checksums are of what the service stores).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from modelcache.sources.base import Source


class AiohttpSource(Source):
    _session: aiohttp.ClientSession | None = None

    def session_kwargs(self) -> dict[str, Any]:
        """Extra ClientSession arguments (auth, default headers) for this source."""
        return {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.options.connect_timeout, sock_read=self.options.read_timeout
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                auto_decompress=False,
                raise_for_status=False,
                **self.session_kwargs(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
