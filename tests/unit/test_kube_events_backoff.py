"""kube/: the one event shape and the one backoff shared by controller, agent and webhook."""

from __future__ import annotations

import datetime as dt
import random

from modelcache.kube.backoff import Backoff, delay
from modelcache.kube.events import ObjectRef, event_body


def test_event_body_for_cluster_and_namespaced_objects() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC)
    node = ObjectRef("serving.kserve.io/v1alpha1", "LocalModelNode", "n1", "", "u1")
    body = event_body(node, "Warning", "DownloadFailed", "x" * 2000, "agent", host="n1", now=now, suffix="ab")
    assert body["metadata"] == {"name": "n1.ab", "namespace": "default"}  # cluster-scoped: default
    assert body["involvedObject"] == {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "name": "n1",
        "uid": "u1",
    }
    assert len(body["message"]) == 1024 and body["type"] == "Warning"
    assert body["source"] == {"component": "agent", "host": "n1"}
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-01-02T03:04:05Z"
    pod = ObjectRef("v1", "Pod", "web-", "team")
    assert event_body(pod, "Normal", "R", "m", "webhook", suffix="cd")["metadata"] == {
        "name": "web.cd",
        "namespace": "team",
    }


def test_backoff_doubles_caps_resets_and_jitters_within_half_a_step() -> None:
    assert [delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    b = Backoff(base=2.0, cap=10.0)
    assert [b.next(), b.next(), b.next(), b.next()] == [2.0, 4.0, 8.0, 10.0]
    b.reset()
    assert b.next() == 2.0
    rng = random.Random(7)
    for n in range(1, 10):
        step = delay(n)
        assert step / 2 <= delay(n, rng=rng) <= step
