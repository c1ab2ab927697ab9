"""controller-runtime's metric names, labels and semantics for our one-loop controller and webhook,
read back through the Prometheus text format (what a scrape sees)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelcache.kube.metrics import ReconcileMetrics, WebhookMetrics


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reconcile_and_workqueue_series() -> None:
    registry, clock = CollectorRegistry(), Clock()
    m = ReconcileMetrics(registry=registry, clock=clock)
    q = (("controller", "localmodelcache"), ("name", "localmodelcache"))
    c = (("controller", "localmodelcache"),)
    before = scrape(registry)
    for result in ("success", "error", "requeue", "requeue_after"):  # every series exists at 0
        assert before[("controller_runtime_reconcile_total", (*c, ("result", result)))] == 0
    assert before[("controller_runtime_max_concurrent_reconciles", c)] == 1
    assert before[("workqueue_depth", q)] == 0

    m.added()
    m.added()  # a burst while one is pending: two adds, one item
    clock.now += 0.5
    assert scrape(registry)[("workqueue_depth", q)] == 1
    m.started()
    clock.now += 2.0
    running = scrape(registry)
    assert running[("workqueue_depth", q)] == 0
    assert running[("controller_runtime_active_workers", c)] == 1
    assert running[("workqueue_unfinished_work_seconds", q)] == 2.0
    assert running[("workqueue_longest_running_processor_seconds", q)] == 2.0
    m.finished("error")
    m.added()
    m.started()
    m.finished("success")

    after = scrape(registry)
    assert after[("workqueue_adds_total", q)] == 3
    assert after[("workqueue_retries_total", q)] == 1
    assert after[("controller_runtime_reconcile_total", (*c, ("result", "error")))] == 1
    assert after[("controller_runtime_reconcile_total", (*c, ("result", "success")))] == 1
    assert after[("controller_runtime_reconcile_errors_total", c)] == 1
    assert after[("controller_runtime_reconcile_time_seconds_count", c)] == 2
    assert after[("controller_runtime_reconcile_time_seconds_sum", c)] == 2.0
    assert after[("controller_runtime_reconcile_time_seconds_bucket", (*c, ("le", "2.0")))] == 2
    assert after[("workqueue_queue_duration_seconds_sum", q)] == 0.5
    assert after[("workqueue_work_duration_seconds_count", q)] == 2
    assert after[("controller_runtime_active_workers", c)] == 0
    assert after[("workqueue_unfinished_work_seconds", q)] == 0


def test_webhook_series_and_one_set_per_registry() -> None:
    registry = CollectorRegistry()
    m = WebhookMetrics(("/mutate/pods", "/validate/caches"), registry=registry)
    again = WebhookMetrics(registry=registry)  # a second server object in one process: same series
    m.begin("/mutate/pods")
    assert (
        scrape(registry)[("controller_runtime_webhook_requests_in_flight", (("webhook", "/mutate/pods"),))]
        == 1
    )
    again.end("/mutate/pods", 200, 0.03)
    m.begin("/validate/caches")
    m.end("/validate/caches", 400, 0.001)
    got = scrape(registry)
    pods = (("webhook", "/mutate/pods"),)
    assert got[("controller_runtime_webhook_requests_in_flight", pods)] == 0
    assert got[("controller_runtime_webhook_requests_total", (("code", "200"), *pods))] == 1
    assert (
        got[("controller_runtime_webhook_requests_total", (("code", "400"), ("webhook", "/validate/caches")))]
        == 1
    )
    assert got[("controller_runtime_webhook_latency_seconds_bucket", (("le", "0.05"), *pods))] == 1
    assert got[("controller_runtime_webhook_latency_seconds_count", pods)] == 1
