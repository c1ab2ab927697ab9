"""The real webhook server (`modelcache.webhook.server.serve`) as its own process, with a given
certificate and a fixed cluster state instead of an apiserver, so tests can measure its memory
apart from their clients'. Prints `PORT <n>` when listening; stops on SIGTERM or when stdin closes.

    python -m tests.unit.webhook_process CERT KEY LIMITS_JSON
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys

from modelcache.webhook.admission import Cluster, EventNote, Obj, Options, Reads
from modelcache.webhook.limits import Limits
from modelcache.webhook.server import Webhook, serve


class FixedCluster:
    """The cluster edge replaced by an empty cluster: no apiserver needed."""

    async def read(self, request: Obj, needs: Reads) -> Cluster:
        return Cluster()

    async def record(self, note: EventNote) -> None:
        return None


async def main(cert: str, key: str, limits: Limits) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the test went away: so do we
    async with serve(Webhook(FixedCluster(), Options()), context, "127.0.0.1", 0, limits) as listener:
        print(f"PORT {listener.port}", flush=True)
        await stop.wait()
        s = listener.stats
        print(
            f"STATS accepted={s.accepted} refused={s.refused} evicted={s.evicted} {s.timed_out}", flush=True
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    asyncio.run(main(sys.argv[1], sys.argv[2], Limits(**json.loads(sys.argv[3]))))
