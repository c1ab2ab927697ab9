"""Leader election on a coordination.k8s.io Lease, so that two replicas never write at once.

The client-go recipe, small: a candidate takes the Lease when it is free or when its holder has not
renewed it (no resourceVersion change) for `lease_duration` by our own clock; the leader renews every
`retry_period` and gives up (the process exits) if it cannot renew within `renew_deadline`. Every
write carries the resourceVersion it was based on, so two candidates cannot both win. No CRD needed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("modelcache.controller")

LEASE_NAME = "modelcache-controller"


def default_identity() -> str:
    """Pod name (the hostname in a pod) plus a random suffix: a restarted pod is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_now() -> str:
    """MicroTime as the API server writes it (RFC 3339 with exactly six fraction digits)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    client: AsyncClient
    namespace: str
    identity: str
    name: str = LEASE_NAME
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        self._seen_version: str | None = None
        self._seen_at = 0.0
        self._last_renew = 0.0
        self.is_leader = False

    async def _try(self) -> bool:
        """One attempt to acquire or renew; True when we hold the Lease afterwards."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            obj = Lease(
                metadata=ObjectMeta(name=self.name, namespace=self.namespace),
                spec=LeaseSpec(
                    holderIdentity=self.identity,
                    leaseDurationSeconds=int(self.lease_duration),
                    leaseTransitions=0,
                ),
            )
            try:
                await self.client.create(obj)
            except ApiError as create_exc:
                if create_exc.status.code == 409:
                    return False
                raise
            await self._stamp(None, acquire=True)
            return True
        meta, spec = lease.metadata, lease.spec
        version = meta.resourceVersion if meta else None
        holder = spec.holderIdentity if spec else None
        now = time.monotonic()
        if version != self._seen_version:
            self._seen_version, self._seen_at = version, now
        duration = float((spec.leaseDurationSeconds if spec else None) or self.lease_duration)
        if holder and holder != self.identity and now - self._seen_at < duration:
            return False  # held, and renewed recently enough by our clock
        transitions = (spec.leaseTransitions if spec else None) or 0
        if holder != self.identity:
            transitions += 1
        try:
            await self._stamp(version, acquire=holder != self.identity, transitions=transitions)
        except ApiError as exc:
            if exc.status.code == 409:
                return False  # someone else wrote first
            raise
        return True

    async def _stamp(self, version: str | None, *, acquire: bool, transitions: int | None = None) -> None:
        now = _micro_now()
        spec: dict[str, object] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "renewTime": now,
        }
        if acquire:
            spec["acquireTime"] = now
        if transitions is not None:
            spec["leaseTransitions"] = transitions
        patch: dict[str, object] = {"spec": spec}
        if version is not None:
            patch["metadata"] = {"resourceVersion": version}
        result = await self.client.patch(
            Lease, self.name, patch, namespace=self.namespace, patch_type=PatchType.MERGE
        )
        self._seen_version = result.metadata.resourceVersion if result.metadata else None
        self._seen_at = time.monotonic()

    async def acquire(self) -> None:
        """Return once we are the leader."""
        announced = False
        while True:
            try:
                if await self._try():
                    self.is_leader = True
                    self._last_renew = time.monotonic()
                    log.info(
                        "leader election: %s acquired lease %s/%s", self.identity, self.namespace, self.name
                    )
                    return
            except Exception as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("leader election: waiting for lease %s/%s", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry_period)

    async def keep(self) -> None:
        """Renew until we cannot; returns (leadership lost) so the caller stops acting."""
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                if await self._try():
                    self._last_renew = time.monotonic()
                    continue
                log.error("leader election: lease %s/%s taken by another replica", self.namespace, self.name)
                self.is_leader = False
                return
            except Exception as exc:
                log.warning("leader election: renew failed: %s", exc)
            if time.monotonic() - self._last_renew > self.renew_deadline:
                log.error("leader election: could not renew within %.0fs", self.renew_deadline)
                self.is_leader = False
                return

    async def release(self) -> None:
        """On a clean shutdown: hand the Lease over at once instead of after `lease_duration`."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            patch = {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}}
            await self.client.patch(
                Lease, self.name, patch, namespace=self.namespace, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            log.debug("leader election: release failed: %s", exc)
