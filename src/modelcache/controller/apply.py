"""Executes a `Plan` against the API server: the only place controller writes happen.

Every write is idempotent (create tolerates 409, patch/delete tolerate 404), so a stale observation
costs at most a redundant request. `Recent` remembers writes that just succeeded so that the next
pass, which may run before the watch has echoed them back, does not send the same write again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.resources.apps_v1 import DaemonSet
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Node, PersistentVolume, PersistentVolumeClaim
from lightkube.types import CascadeType, PatchType

from modelcache.api.types import API_VERSION
from modelcache.kube import resources
from modelcache.kube.constants import MANAGED_BY, MANAGED_BY_LABEL
from modelcache.kube.events import EventRecorder

from .actions import (
    Action,
    ApplyDaemonSet,
    Create,
    CreateVolume,
    Delete,
    Event,
    FinalizerPatch,
    MergePatch,
    ObjectRef,
    Plan,
    Step,
    Target,
)
from .manifests import adoption_patch, foreign_agent_image, volume_adoption

log = logging.getLogger("modelcache.controller")

COMPONENT = "modelcache-controller"

LocalModelCacheRes = resources.LocalModelCache
LocalModelNamespaceCacheRes = resources.LocalModelNamespaceCache
LocalModelNodeGroupRes = resources.LocalModelNodeGroup
LocalModelNodeRes = resources.LocalModelNode


#: Kind -> lightkube resource, for the kinds the controller writes.
_RESOURCES: dict[str, Any] = {
    "LocalModelCache": LocalModelCacheRes,
    "LocalModelNamespaceCache": LocalModelNamespaceCacheRes,
    "LocalModelNodeGroup": LocalModelNodeGroupRes,
    "LocalModelNode": LocalModelNodeRes,
    "Node": Node,
    "DaemonSet": DaemonSet,
    "PersistentVolume": PersistentVolume,
    "PersistentVolumeClaim": PersistentVolumeClaim,
    "Job": Job,
}
#: Generic (CRD) resources are built from a dict by calling them; core kinds through codecs.
_GENERIC = (LocalModelCacheRes, LocalModelNamespaceCacheRes, LocalModelNodeGroupRes, LocalModelNodeRes)


def _resource(target: Target) -> Any:
    res = _RESOURCES[target.kind]
    return res.Status if target.subresource == "status" else res


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Recent:
    """Writes that succeeded within `window` seconds, by target, with what was written."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._done: dict[tuple[str, ...], tuple[str, float]] = {}

    def fresh(self, key: tuple[str, ...], value: Any) -> bool:
        """True when exactly this write to this target just succeeded (skip it)."""
        found = self._done.get(key)
        return (
            found is not None
            and found[0] == _fingerprint(value)
            and time.monotonic() - found[1] < self.window
        )

    def record(self, key: tuple[str, ...], value: Any) -> None:
        now = time.monotonic()
        self._done[key] = (_fingerprint(value), now)
        if len(self._done) > 50_000:
            self._done = {k: v for k, v in self._done.items() if now - v[1] < self.window}


@dataclass
class Outcome:
    writes: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


class Writer:
    """Applies plans with bounded concurrency; failures are logged and reported, never raised."""

    def __init__(
        self, client: AsyncClient, namespace: str, *, concurrency: int = 16, event_memory: float = 600.0
    ) -> None:
        self.client = client
        self.namespace = namespace  # where the agent DaemonSets live
        self.recent = Recent()
        self._sem = asyncio.Semaphore(concurrency)
        # its own concurrency: jobs post events while holding _sem
        self.events = EventRecorder(client, COMPONENT, memory=event_memory)

    async def apply(self, plan: Plan) -> Outcome:
        """Run the plan's actions in one loop (finalizer patches first: they carry a
        resourceVersion that any other write to the same cache would bump)."""
        outcome = Outcome()
        steps = plan.actions(self.namespace)

        async def run(step: Step) -> None:
            if self.recent.fresh(step.key, step.value):
                outcome.skipped += 1
                return
            async with self._sem:
                try:
                    await self.execute(step.action)
                except ApiError as exc:
                    outcome.failed.append(f"{'/'.join(step.key)}: {exc.status.code} {exc.status.message}")
                    return
                except Exception as exc:  # network: retried on the next pass
                    outcome.failed.append(f"{'/'.join(step.key)}: {type(exc).__name__}: {exc}")
                    return
            outcome.writes += 1
            self.recent.record(step.key, step.value)

        for phase in sorted({step.phase for step in steps}):
            await asyncio.gather(*(run(step) for step in steps if step.phase == phase))
        await self.post_events(plan.events)
        for failure in outcome.failed[:5]:
            log.warning("write failed (will retry): %s", failure)
        if len(outcome.failed) > 5:
            log.warning("... and %d more failed writes", len(outcome.failed) - 5)
        return outcome

    # -- actions ---------------------------------------------------------------------------------------

    async def execute(self, action: Action) -> None:
        """One typed action against the API server; idempotent (see each action's rule)."""
        match action:
            case Create(body=body):
                await self._create(_RESOURCES[body["kind"]], body)
            case MergePatch(target=target, patch=patch):
                await self._patch(_resource(target), target.name, patch, target.namespace or None)
            case Delete(target=target, background=background):
                cascade = CascadeType.BACKGROUND if background else None
                await self._delete(_resource(target), target.name, target.namespace or None, cascade)
            case CreateVolume(cache=cache, body=body):
                await self._create_volume(cache, body)
            case ApplyDaemonSet(body=body):
                await self._apply_daemonset(body)
            case FinalizerPatch():
                await self._patch_finalizers(action)

    async def _patch_finalizers(self, fp: FinalizerPatch) -> None:
        namespace, name = fp.cache
        res: Any = LocalModelNamespaceCacheRes if namespace else LocalModelCacheRes
        # resourceVersion makes it conditional: never drop a finalizer someone added meanwhile.
        patch = {
            "metadata": {"finalizers": list(fp.finalizers) or None, "resourceVersion": fp.resource_version}
        }
        await self._patch(res, name, patch, namespace or None)

    async def _patch(self, res: Any, name: str, patch: dict[str, Any], namespace: str | None = None) -> None:
        """Merge patch; a missing object is fine."""
        try:
            await self.client.patch(res, name, patch, namespace=namespace, patch_type=PatchType.MERGE)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def _create(self, res: Any, body: dict[str, Any]) -> None:
        """Create; one of that name existing already is fine."""
        try:
            await self.client.create(res(body) if res in _GENERIC else codecs.from_dict(body))
        except ApiError as exc:
            if exc.status.code != 409:
                raise

    async def _delete(
        self, res: Any, name: str, namespace: str | None = None, cascade: CascadeType | None = None
    ) -> None:
        """Delete; a missing object is fine."""
        try:
            await self.client.delete(res, name, namespace=namespace, cascade=cascade)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def _create_volume(self, cache: ObjectRef, body: dict[str, Any]) -> None:
        """Create a PV/PVC and say so on the cache, or say why not (e.g. jobNamespace missing)."""
        meta = body["metadata"]
        where = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
        what = f"{body['kind']} {where}"
        try:
            await self.client.create(codecs.from_dict(body))
        except ApiError as exc:
            if exc.status.code == 409:
                await self._adopt_volume(cache, body, what)
                return
            await self.post_events([Event(cache, "Warning", "VolumeFailed", f"{what}: {exc.status.message}")])
            raise
        await self.post_events([Event(cache, "Normal", "VolumeCreated", what)])

    async def _adopt_volume(self, cache: ObjectRef, body: dict[str, Any], what: str) -> None:
        """A PV/PVC of our name exists: adopt it when KServe made it for this cache, else say whose it is."""
        meta = body["metadata"]
        res: Any = PersistentVolume if body["kind"] == "PersistentVolume" else PersistentVolumeClaim
        namespace = meta.get("namespace")
        existing = await self.client.get(res, meta["name"], namespace=namespace)
        verdict = volume_adoption(existing.to_dict(), body, cache)
        if verdict == "ours":
            return
        if verdict == "foreign":
            message = f"{what} exists and belongs to something else; left alone (rename or delete it)"
            await self.post_events([Event(cache, "Warning", "VolumeConflict", message)])
            return
        await self.client.patch(
            res, meta["name"], adoption_patch(body), namespace=namespace, patch_type=PatchType.MERGE
        )
        log.info("adopted %s (created by KServe for %s)", what, cache.name)
        await self.post_events(
            [Event(cache, "Normal", "VolumeAdopted", f"{what} (created by KServe) adopted")]
        )

    async def _apply_daemonset(self, body: dict[str, Any]) -> None:
        """Create, or merge-patch ours over the existing one; KServe's of that name is replaced."""
        meta = body["metadata"]
        try:
            await self.client.create(codecs.from_dict(body))
            return
        except ApiError as exc:
            if exc.status.code != 409:
                raise
        existing = (await self.client.get(DaemonSet, meta["name"], namespace=meta["namespace"])).to_dict()
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            await self._replace_foreign_daemonset(existing, body)
            return
        # Exists with another spec: merge-patch ours over it (labels, annotations, spec).
        patch = {
            "metadata": {"labels": meta["labels"], "annotations": meta["annotations"]},
            "spec": body["spec"],
        }
        await self.client.patch(
            DaemonSet, meta["name"], patch, namespace=meta["namespace"], patch_type=PatchType.MERGE
        )

    async def _replace_foreign_daemonset(self, existing: dict[str, Any], body: dict[str, Any]) -> None:
        """`<group>-agent` made by KServe (its Go agent): delete it so ours takes the name; anything
        else of that name is someone else's and is left alone, with a warning."""
        meta = body["metadata"]
        spec = ((existing.get("spec") or {}).get("template") or {}).get("spec") or {}
        images = [str(c.get("image") or "") for c in spec.get("containers") or []]
        owner = meta["ownerReferences"][0] if meta.get("ownerReferences") else None
        ref = ObjectRef(API_VERSION, "LocalModelNodeGroup", owner["name"] if owner else meta["name"], "", "")
        where = f"DaemonSet {meta['namespace']}/{meta['name']}"
        if not any(foreign_agent_image(i) for i in images):
            message = f"{where} exists and is not ours; no agent runs for this group until it is removed"
            await self.post_events([Event(ref, "Warning", "AgentConflict", message)])
            raise RuntimeError(message)
        await self.client.delete(DaemonSet, meta["name"], namespace=meta["namespace"])
        log.warning("deleted KServe's agent %s (images %s); ours replaces it", where, ", ".join(images))
        message = f"{where} ran KServe's agent ({', '.join(images)}); deleted, ours replaces it"
        await self.post_events([Event(ref, "Warning", "ReplacedKServeAgent", message)])
        raise RuntimeError(f"{where}: KServe's agent deleted; ours is created on the next pass")

    # -- events ----------------------------------------------------------------------------------------

    async def post_events(self, events: list[Event]) -> None:
        """Kubernetes events, each (object, reason, message) at most once per `event_memory` seconds."""
        await self.events.record_all((ev.ref, ev.type, ev.reason, ev.message) for ev in events)
