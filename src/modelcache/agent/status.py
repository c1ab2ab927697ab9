"""What the node agent reports: status.modelStatus / status.models on its LocalModelNode, the model
gauges, and Kubernetes Events.

The status content is decided by `plan.desired_status` / `plan.status_patch` (pure); this is the
patch, its throttle, and the redaction of everything that leaves the process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lightkube import AsyncClient
from lightkube.types import PatchType

from modelcache.agent import plan as pl
from modelcache.agent.metrics import Metrics
from modelcache.agent.observe import Observer, plain
from modelcache.api.types import GROUP, VERSION
from modelcache.kube import resources
from modelcache.kube.events import EventRecorder, ObjectRef

if TYPE_CHECKING:
    from modelcache.agent.agent import Settings

COMPONENT = "modelcache-agent"


class StatusReporter:
    """Writes what the agent knows to its LocalModelNode: status patches and Events.

    `secrets` is the agent's set of every credential value seen (filled as credentials are resolved);
    every event message is scrubbed of them.
    """

    def __init__(
        self,
        client: AsyncClient,
        settings: Settings,
        metrics: Metrics,
        observer: Observer,
        secrets: set[str],
    ) -> None:
        self.client = client
        self.s = settings
        self.metrics = metrics
        self.observer = observer
        self.secrets = secrets
        self.events = EventRecorder(client, COMPONENT, host=settings.node_name)
        self._last_patch = -1e18

    async def report(
        self,
        wanted: list[pl.Entry],
        healthy: dict[str, pl.OnDisk],
        downloading: set[str],
        progress: dict[str, pl.Progress],
    ) -> None:
        """Patch status.modelStatus / status.models when they changed (byte counters throttled)."""
        lmn = self.observer.lmn
        if lmn is None:
            return
        phases, details = pl.desired_status(wanted, healthy, downloading, progress)
        counts: dict[str, int] = {}
        for v in phases.values():
            counts[v] = counts.get(v, 0) + 1
        for status in ("ModelDownloadPending", "ModelDownloading", "ModelDownloaded", "ModelDownloadError"):
            self.metrics.models.labels(status=status).set(counts.get(status, 0))
        due = time.monotonic() - self._last_patch >= self.s.progress_interval
        others = pl.status_keys(self.observer.spec()) - set(phases)  # other groups' and download Jobs
        patch = pl.status_patch(lmn.get("status"), phases, details, progress_due=due, others=others)
        if patch is None:
            return
        try:
            updated = await self.client.patch(
                resources.LocalModelNode.Status, self.s.node_name, patch, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            if getattr(getattr(exc, "status", None), "code", None) == 404:
                return
            raise
        self._last_patch = time.monotonic()
        self.observer.patched(plain(updated))

    async def event(self, reason: str, message: str, warn: bool = False) -> None:
        """A Kubernetes Event on this node's LocalModelNode (best effort; messages are redacted)."""
        lmn = self.observer.lmn
        if lmn is None:
            return
        uid = str((lmn.get("metadata") or {}).get("uid") or "")
        ref = ObjectRef(f"{GROUP}/{VERSION}", "LocalModelNode", self.s.node_name, "", uid)
        await self.events.record(
            ref, "Warning" if warn else "Normal", reason, pl.scrub(message, self.secrets)
        )
