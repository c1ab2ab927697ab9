"""What the node agent watches and reads: its LocalModelNode, the config, the disk, pods on the node.

Nothing here decides (`plan` does) or starts work (`tasks` does). The `Observer` holds what the
apiserver last said (this node's object, inferenceservice-config, the node group's storageLimit);
`observe_disk` turns the store into `plan`'s inputs on the agent's one disk thread (`DiskThread`);
`Remembered` is the little the agent keeps across restarts.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lightkube import AsyncClient
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, ServiceAccount

from modelcache.agent import credentials as cred
from modelcache.agent import plan as pl
from modelcache.api.types import LocalModelNodeSpec
from modelcache.errors import ModelcacheError, NotFoundError
from modelcache.kube import backoff, resources
from modelcache.kube.config import LocalModelConfig, parse_local_model_config
from modelcache.kube.constants import CONFIGMAP_NAME
from modelcache.quantity import parse_quantity
from modelcache.store import Store
from modelcache.store import adopt as ad
from modelcache.transfer import free_bytes

if TYPE_CHECKING:
    from modelcache.agent.agent import Settings

log = logging.getLogger("modelcache.agent")

STATE_FILE = "agent.json"
T = TypeVar("T")


def plain(obj: Any) -> dict[str, Any]:
    """A generic (custom) resource as plain JSON data."""
    data: dict[str, Any] = obj.to_dict()
    return data


# -- the disk ----------------------------------------------------------------------------------------
class DiskThread:
    """The store on the agent's one disk thread.

    SQLite connections belong to the thread that opened them: the engine uses its own `Store` on the
    event loop; every other blocking store call goes through `run` with `store`.
    """

    def __init__(self, root: Path) -> None:
        self.store = Store(root)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-disk")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking store work on the disk thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


@dataclass
class Remembered:
    """What survives a restart (agent.json): when each model was last fully verified, and which PVC
    name stands for which model (pods name PVCs, not keys, and the entry may be gone by then)."""

    verified_at: dict[str, float] = field(default_factory=dict)
    pvc_to_key: dict[str, str] = field(default_factory=dict)

    def load(self, store: Store) -> None:
        """Read the state file; complete models it does not know count as verified now."""
        try:
            data = json.loads((store.meta / STATE_FILE).read_text())
        except (OSError, ValueError):
            data = {}
        self.verified_at = {k: float(v) for k, v in (data.get("verified_at") or {}).items()}
        self.pvc_to_key = {k: str(v) for k, v in (data.get("pvc_to_key") or {}).items()}
        now = time.time()
        for row in store.index.all():
            self.verified_at.setdefault(row.key, now)

    def save(self, store: Store) -> None:
        from modelcache.store.manifest import write_json_atomic

        write_json_atomic(
            store.meta / STATE_FILE,
            json.dumps({"verified_at": self.verified_at, "pvc_to_key": self.pvc_to_key}),
        )


@dataclass
class Observed:
    """The store as `plan` sees it, read once per reconcile."""

    disk: dict[str, pl.OnDisk] = field(default_factory=dict)
    partials: dict[str, pl.Partial] = field(default_factory=dict)
    fs_free: int = 0
    foreign: dict[str, ad.Folder] = field(default_factory=dict)  # wanted keys: folders to adopt


def observe_disk(disk: Store, wanted_keys: set[str]) -> Observed:
    """Models, partial downloads and foreign folders on disk (blocking: run it on the disk thread).

    Only wanted models get the fast check: a model nobody wants is evicted or kept, never re-fetched.
    """
    obs = Observed()
    disk.ensure()
    for rec in disk.list_models():  # repairs first: a directory deleted by hand drops out
        if rec.state == "complete":
            healthy = True
            if rec.key in wanted_keys:
                try:
                    problems = disk.verify(rec.key, full=False)
                except (NotFoundError, OSError) as exc:
                    problems = [str(exc)]
                if problems:
                    healthy = False
                    log.warning("model %s failed the fast check: %s", rec.key, "; ".join(problems[:3]))
            obs.disk[rec.key] = pl.OnDisk(
                key=rec.key,
                uri=rec.uri,
                size_bytes=rec.size_bytes,
                last_used_at=rec.last_used_at or rec.created_at or 0.0,
                healthy=healthy,
                pinned=rec.pinned,
                in_use=rec.in_use,
                created_at=rec.created_at,
            )
        else:
            obs.partials[rec.key] = pl.Partial(
                rec.key, rec.uri, rec.size_bytes, held=rec.state == "downloading"
            )
    for key in ad.foreign_keys(disk):
        if key in wanted_keys:
            obs.foreign[key] = ad.scan(disk, key)
    obs.fs_free = free_bytes(disk.root)
    return obs


# -- the apiserver -----------------------------------------------------------------------------------
class KubeLookup:
    """credentials.Lookup over the apiserver, in the job namespace, cached for one resolve."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._secrets: dict[str, Secret | None] = {}

    async def _secret(self, name: str) -> Secret | None:
        if name not in self._secrets:
            try:
                self._secrets[name] = await self.client.get(Secret, name, namespace=self.namespace)
            except Exception as exc:
                if getattr(getattr(exc, "status", None), "code", None) == 404:
                    self._secrets[name] = None
                else:
                    raise
        return self._secrets[name]

    async def secret(self, name: str) -> dict[str, str] | None:
        s = await self._secret(name)
        if s is None:
            return None
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (s.data or {}).items()}
        data.update(s.stringData or {})
        return data

    async def secret_annotations(self, name: str) -> dict[str, str]:
        s = await self._secret(name)
        return dict((s.metadata.annotations if s and s.metadata else None) or {})

    async def service_account(self, name: str) -> dict[str, Any] | None:
        try:
            sa = await self.client.get(ServiceAccount, name, namespace=self.namespace)
        except Exception as exc:
            if getattr(getattr(exc, "status", None), "code", None) == 404:
                return None
            raise
        result: dict[str, Any] = sa.to_dict()
        return result

    async def storage_containers(self) -> list[dict[str, Any]]:
        return [plain(o) async for o in self.client.list(resources.ClusterStorageContainer)]


class Observer:
    """This node's LocalModelNode (an informer of one object), the config, pods on the node.

    `kick` asks for a reconcile; it is called when the spec changes, never for our own status writes.
    """

    def __init__(self, client: AsyncClient, settings: Settings, kick: Callable[[], None]) -> None:
        self.client = client
        self.s = settings
        self._kick = kick
        self.lmn: dict[str, Any] | None = None
        self.synced = asyncio.Event()  # the LocalModelNode has been listed once
        self.config = LocalModelConfig()
        self.cred_config = cred.CredentialConfig()
        self.storage_limit: int | None = settings.storage_limit
        self._config_at = -1e18

    @property
    def resync(self) -> float:
        """Seconds between full reconciles (and config re-reads): the flag, else KServe's config."""
        return float(self.s.resync_seconds or self.config.resync_seconds)

    # -- the LocalModelNode --------------------------------------------------------------------------
    async def watch(self) -> None:
        """List then watch from the list's version (the informer pattern), only this node's object.

        Nothing is planned before the first list: an agent that has not yet seen its entries must
        not take "no entries" for an answer and evict what the node still wants.
        """
        failures = 0
        fields: dict[str, Any] = {"metadata.name": self.s.node_name}
        while True:
            try:
                listing = self.client.list(resources.LocalModelNode, fields=fields)
                found = [plain(o) async for o in listing]
                self._observe(found[0] if found else None)
                self.synced.set()
                async for op, obj in self.client.watch(
                    resources.LocalModelNode, fields=fields, resource_version=listing.resourceVersion
                ):
                    failures = 0
                    self._observe(None if op == "DELETED" else plain(obj))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("watch of LocalModelNode %s failed: %s; retrying", self.s.node_name, exc)
                await asyncio.sleep(backoff.delay(failures + 1))

    def _observe(self, obj: dict[str, Any] | None) -> None:
        before, self.lmn = self.lmn, obj
        if pl.spec_changed(before, obj) or not self.synced.is_set():  # not for our own status writes
            self._kick()

    def patched(self, obj: dict[str, Any]) -> None:
        """Our own status write came back: newer than the watch's copy, and nothing to reconcile."""
        self.lmn = obj

    def spec(self) -> LocalModelNodeSpec | None:
        if not self.lmn or not self.lmn.get("spec"):
            return None
        return LocalModelNodeSpec.model_validate(self.lmn["spec"])

    # -- config --------------------------------------------------------------------------------------
    async def load_config(self, wanted: list[pl.Entry]) -> None:
        """inferenceservice-config and the node group's storageLimit, re-read once per resync."""
        if time.monotonic() - self._config_at < self.resync:
            return
        try:
            cm = await self.client.get(ConfigMap, CONFIGMAP_NAME, namespace=self.s.namespace)
            self.config = parse_local_model_config(cm.data)
            self.cred_config = cred.parse_credential_config(cm.data)
        except ModelcacheError as exc:
            log.warning("%s; using KServe's defaults", exc)
        except Exception as exc:
            log.warning("cannot read %s/%s: %s; using defaults", self.s.namespace, CONFIGMAP_NAME, exc)
        if self.s.storage_limit is None:
            self.storage_limit = await self._group_limit(wanted)
        self._config_at = time.monotonic()

    def group_name(self, wanted: list[pl.Entry]) -> str | None:
        """The node group: the flag, else the first wanted entry that names one."""
        if self.s.node_group:
            return self.s.node_group
        for e in wanted:
            if e.info.nodeGroup:
                return e.info.nodeGroup
        return None

    async def _group_limit(self, wanted: list[pl.Entry]) -> int | None:
        name = self.group_name(wanted)
        if not name:
            return None
        try:
            group = await self.client.get(resources.LocalModelNodeGroup, name)
            return parse_quantity((group.get("spec") or {})["storageLimit"])
        except Exception as exc:
            log.warning("cannot read storageLimit of LocalModelNodeGroup %s: %s", name, exc)
            return self.storage_limit

    # -- pods and credentials ------------------------------------------------------------------------
    async def mounted(self, pvc_to_key: dict[str, str]) -> set[str]:
        """Keys of the models pods on this node mount (through their PVC names)."""
        pods = [
            p.to_dict()
            async for p in self.client.list(Pod, namespace="*", fields={"spec.nodeName": self.s.node_name})
        ]
        return pl.mounted_keys(pods, pvc_to_key)

    async def mounted_or(
        self, pvc_to_key: dict[str, str], fallback: Callable[[], set[str]], then: str
    ) -> set[str]:
        """`mounted`, or `fallback()` when pods cannot be listed: every caller errs towards keeping
        models in place (`then` says how, in the warning)."""
        try:
            return await self.mounted(pvc_to_key)
        except Exception as exc:
            log.warning("cannot list pods on node %s: %s; %s", self.s.node_name, exc, then)
            return fallback()

    def lookup(self) -> KubeLookup:
        """Where credentials are looked up: the job namespace of the current config."""
        return KubeLookup(self.client, self.config.jobNamespace)
