"""kopf wiring: indexes keep a compact view of every object we reason about, and every event pokes the
reconciler. Handlers are coroutines: kopf runs plain functions in threads, and the wake-up signal is
an asyncio.Event that must be set from the loop. No create/update/delete handlers (they would make
kopf write its own annotations and finalizers): the reconciler recomputes everything from the
indexes, level-based.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from modelcache.api.types import GROUP, VERSION
from modelcache.kube.constants import MODEL_ANNOTATION, MODEL_POD_LABEL, MODEL_POD_LABEL_VALUE

from . import reconcile as r

log = logging.getLogger("modelcache.controller")

#: kopf resource selectors (group, version, plural).
NODES = ("v1", "nodes")
GROUPS = (GROUP, VERSION, "localmodelnodegroups")
CACHES = (GROUP, VERSION, "localmodelcaches")
NAMESPACE_CACHES = (GROUP, VERSION, "localmodelnamespacecaches")
MODEL_NODES = (GROUP, VERSION, "localmodelnodes")
ISVCS = (GROUP, "v1beta1", "inferenceservices")
LLMISVCS = (GROUP, "v1alpha2", "llminferenceservices")
PODS = ("v1", "pods")

#: Index names (kopf passes them to handlers as keyword arguments under these names).
INDEXES = (
    "nodes_idx",
    "groups_idx",
    "caches_idx",
    "ns_caches_idx",
    "model_nodes_idx",
    "services_idx",
    "llm_services_idx",
    "pods_idx",
)


#: Server-side filter of the pod watch: only pods our webhook labelled (it labels every pod it admits
#: that carries MODEL_ANNOTATION). Without it the controller would hold every pod of the cluster.
POD_LABEL_SELECTOR = f"{MODEL_POD_LABEL}={MODEL_POD_LABEL_VALUE}"


def configure_selectors(settings: kopf.OperatorSettings) -> None:
    """Label selectors kopf passes to the API server for its list and watch calls."""
    settings.watching.label_selectors[PODS] = POD_LABEL_SELECTOR


class Hub:
    """What handlers share with the reconciler loop: the live indexes and a wake-up signal."""

    def __init__(self, poke: Callable[[], None]) -> None:
        self.poke = poke
        self.indexes: dict[str, Any] | None = None

    def capture(self, kwargs: Mapping[str, Any]) -> None:
        """The first handler call proves every index is populated (kopf waits for that)."""
        if self.indexes is None:
            missing = [name for name in INDEXES if name not in kwargs]
            if missing:
                raise RuntimeError(f"kopf did not pass indexes {missing}")
            self.indexes = {name: kwargs[name] for name in INDEXES}
            log.info("indexes populated; reconciling")

    def snapshot(self) -> dict[str, list[Any]]:
        """A plain copy of every index's values (safe to use across awaits)."""
        out: dict[str, list[Any]] = {}
        for name, index in (self.indexes or {}).items():
            out[name] = [value for store in index.values() for value in store]
        return out


def build_registry(hub: Hub) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.index(*NODES, registry=registry, id="nodes_idx")
    async def nodes_idx(body: kopf.Body, **_: Any) -> r.Node:
        return r.node_from(body)

    @kopf.index(*GROUPS, registry=registry, id="groups_idx")
    async def groups_idx(body: kopf.Body, **_: Any) -> r.NodeGroup:
        return r.group_from(body)

    @kopf.index(*CACHES, registry=registry, id="caches_idx")
    async def caches_idx(body: kopf.Body, **_: Any) -> r.Cache:
        return r.cache_from(body)

    @kopf.index(*NAMESPACE_CACHES, registry=registry, id="ns_caches_idx")
    async def ns_caches_idx(body: kopf.Body, **_: Any) -> r.Cache:
        return r.cache_from(body)

    @kopf.index(*MODEL_NODES, registry=registry, id="model_nodes_idx")
    async def model_nodes_idx(body: kopf.Body, **_: Any) -> r.ModelNode:
        return r.model_node_from(body)

    # kopf keeps an object's previous value when an index function returns None, so a service
    # that loses its localmodel label returns an empty mapping instead: that clears its entry.
    @kopf.index(*ISVCS, registry=registry, id="services_idx")
    async def services_idx(body: kopf.Body, **_: Any) -> r.Service | dict[str, Any]:
        return r.service_from(body) or {}

    @kopf.index(*LLMISVCS, registry=registry, id="llm_services_idx")
    async def llm_services_idx(body: kopf.Body, **_: Any) -> r.Service | dict[str, Any]:
        return r.service_from(body) or {}

    # Only pods that ask for a cache by annotation (plain Deployments, vLLM without KServe).
    @kopf.index(*PODS, registry=registry, id="pods_idx", annotations={MODEL_ANNOTATION: kopf.PRESENT})
    async def pods_idx(body: kopf.Body, **_: Any) -> r.Service | dict[str, Any]:
        return r.pod_service_from(body) or {}

    async def poke(**kwargs: Any) -> None:
        hub.capture(kwargs)
        hub.poke()

    for selector in (NODES, GROUPS, CACHES, NAMESPACE_CACHES, MODEL_NODES, ISVCS, LLMISVCS):
        kopf.on.event(*selector, registry=registry, id=f"poke-{selector[-1]}")(poke)
    kopf.on.event(*PODS, registry=registry, id="poke-pods", annotations={MODEL_ANNOTATION: kopf.PRESENT})(
        poke
    )
    return registry


def services(snapshot: Mapping[str, list[Any]]) -> list[r.Service]:
    found = snapshot.get("services_idx", []) + snapshot.get("llm_services_idx", [])
    out = [s for s in found if isinstance(s, r.Service)]
    # A pod's annotation names a namespace cache of its namespace if there is one, else a cluster
    # cache: the webhook resolves it the same way. A pod may be both watched and swept (unlabelled).
    ns_caches = {(c.namespace, c.name) for c in snapshot.get("ns_caches_idx", []) if isinstance(c, r.Cache)}
    seen: set[tuple[str, str]] = set()
    for pod in snapshot.get("pods_idx", []):
        if isinstance(pod, r.Service) and (pod.namespace, pod.name) not in seen:
            seen.add((pod.namespace, pod.name))
            ns = pod.namespace if (pod.namespace, pod.cache) in ns_caches else ""
            out.append(dataclasses.replace(pod, cache_namespace=ns))
    return out
