"""One Kubernetes Event recorder for the controller, the agent and the webhook: best effort (an
event that cannot be posted is logged at debug level, never raised), messages cut to the API's
1024 characters, and optionally the same (object, reason, message) at most once per `memory`
seconds. Callers pass messages that are already redacted; `scrub` removes known secret values on top.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("modelcache.kube")

MAX_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """What an event is about (involvedObject)."""

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""


def event_body(
    ref: ObjectRef,
    type_: str,
    reason: str,
    message: str,
    component: str,
    *,
    host: str | None = None,
    now: dt.datetime | None = None,
    suffix: str | None = None,
) -> dict[str, Any]:
    """A core/v1 Event as a dict (pure apart from the defaults for `now` and `suffix`). Events about
    cluster-scoped objects live in `default`, where `kubectl describe` looks for them."""
    stamp = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = (ref.name[:200].rstrip("-.") or "object") + "." + (suffix or secrets.token_hex(8))
    involved = {
        "apiVersion": ref.api_version,
        "kind": ref.kind,
        "name": ref.name,
        "namespace": ref.namespace or None,
        "uid": ref.uid or None,
    }
    source: dict[str, str] = {"component": component}
    if host:
        source["host"] = host
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ref.namespace or "default"},
        "involvedObject": {k: v for k, v in involved.items() if v},
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "type": type_,
        "source": source,
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    """Posts events with `client` (a lightkube AsyncClient), at most `concurrency` at a time."""

    def __init__(
        self,
        client: Any,
        component: str,
        *,
        host: str | None = None,
        memory: float = 0.0,
        concurrency: int = 4,
        scrub: Callable[[str], str] | None = None,
    ) -> None:
        self.client = client
        self.component = component
        self.host = host
        self.memory = memory
        self.scrub = scrub
        self._sem = asyncio.Semaphore(concurrency)
        self._seen: dict[tuple[str, ...], float] = {}

    def _fresh(self, ref: ObjectRef, reason: str, message: str) -> bool:
        if self.memory <= 0:
            return True
        now = time.monotonic()
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.memory}
        key = (ref.kind, ref.namespace, ref.name, reason, message)
        seen = self._seen.get(key)
        if seen is not None and now - seen < self.memory:
            return False
        self._seen[key] = now
        return True

    async def record(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        from lightkube import codecs

        if self.scrub is not None:
            message = self.scrub(message)
        if not self._fresh(ref, reason, message):
            return
        body = event_body(ref, type_, reason, message, self.component, host=self.host)
        async with self._sem:
            try:
                await self.client.create(codecs.from_dict(body))
            except Exception as exc:  # events are best effort
                log.debug("event %s not posted: %s", reason, exc)

    async def record_all(self, events: Iterable[tuple[ObjectRef, str, str, str]]) -> None:
        await asyncio.gather(*(self.record(*ev) for ev in events))
