"""The controller's kopf wiring: what it asks the API server to filter, and how pods become users."""

from __future__ import annotations

import kopf

from modelcache.controller import handlers
from modelcache.controller import reconcile as r


def test_pods_are_watched_by_label_server_side() -> None:
    settings = kopf.OperatorSettings()
    handlers.configure_selectors(settings)
    pods = kopf.Resource("", "v1", "pods", namespaced=True)
    nodes = kopf.Resource("", "v1", "nodes", namespaced=False)
    assert settings.watching.label_selectors.collect(pods) == ["modelcache.io/uses-cache=true"]
    assert settings.watching.label_selectors.collect(nodes) == []


def test_a_pod_watched_and_swept_counts_once() -> None:
    pod = r.Service(kind="Pod", namespace="web", name="p", cache="llama")
    snapshot: dict[str, list[object]] = {"pods_idx": [pod, pod], "ns_caches_idx": []}
    assert handlers.services(snapshot) == [pod]
