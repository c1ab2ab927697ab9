"""Prometheus metrics under controller-runtime's names and labels, so that dashboards and alerts built
for KServe's controllers (and any controller-runtime operator) read ours unchanged.

Our controller has one level-based loop, not one reconcile per object: it is one controller-runtime
"controller" with one worker whose queue holds at most one item ("reconcile the cluster"). Every
watch event is an add (deduplicated while one is pending, as client-go's queue does), a pass is one
reconcile, a failed pass is a retry. The names, labels and buckets follow controller-runtime
(`pkg/internal/controller/metrics`, `pkg/metrics/workqueue.go`, `pkg/webhook/internal/metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

#: controller-runtime's reconcile_time_seconds buckets.
RECONCILE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60,
)  # fmt: skip
#: client-go's workqueue duration buckets: ExponentialBuckets(10e-9, 10, 12).
WORKQUEUE_BUCKETS = tuple(10e-9 * 10**i for i in range(12))
#: Prometheus' DefBuckets, which controller-runtime's webhook latency histogram uses.
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The controller label: controller-runtime names a controller after the kind it is `For`
#: (KServe's LocalModelCache reconciler is "localmodelcache").
CONTROLLER_NAME = "localmodelcache"

Result = Literal["success", "error", "requeue", "requeue_after"]
RESULTS: tuple[Result, ...] = ("success", "error", "requeue", "requeue_after")

T = TypeVar("T")
#: registry (kept alive, so its id stays unique) and its collectors, by (id(registry), kind)
_by_registry: dict[tuple[int, type], tuple[CollectorRegistry, object]] = {}


def _once(registry: CollectorRegistry, kind: type[T], make: Callable[[], T]) -> T:
    """One set of metrics per registry and kind (registering a name twice raises)."""
    key = (id(registry), kind)
    found = _by_registry.get(key)
    if found is None:
        found = (registry, make())
        _by_registry[key] = found
    value = found[1]
    assert isinstance(value, kind)
    return value


class _ReconcileCollectors:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.total = Counter(
            "controller_runtime_reconcile_total",
            "Total number of reconciliations per controller",
            ["controller", "result"],
            registry=r,
        )
        self.errors = Counter(
            "controller_runtime_reconcile_errors_total",
            "Total number of reconciliation errors per controller",
            ["controller"],
            registry=r,
        )
        self.terminal_errors = Counter(
            "controller_runtime_terminal_reconcile_errors_total",
            "Total number of terminal reconciliation errors per controller",
            ["controller"],
            registry=r,
        )
        self.panics = Counter(
            "controller_runtime_reconcile_panics_total",
            "Total number of reconciliation panics per controller",
            ["controller"],
            registry=r,
        )
        self.time = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            ["controller"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.workers = Gauge(
            "controller_runtime_max_concurrent_reconciles",
            "Maximum number of concurrent reconciles per controller",
            ["controller"],
            registry=r,
        )
        self.active = Gauge(
            "controller_runtime_active_workers",
            "Number of currently used workers per controller",
            ["controller"],
            registry=r,
        )
        q = ["controller", "name"]
        self.depth = Gauge("workqueue_depth", "Current depth of workqueue", q, registry=r)
        self.adds = Counter(
            "workqueue_adds_total", "Total number of adds handled by workqueue", q, registry=r
        )
        self.queue_duration = Histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            q,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.work_duration = Histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            q,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.unfinished = Gauge(
            "workqueue_unfinished_work_seconds",
            "How many seconds of work has been done that is in progress and hasn't been observed by "
            "work_duration. Large values indicate stuck threads.",
            q,
            registry=r,
        )
        self.longest = Gauge(
            "workqueue_longest_running_processor_seconds",
            "How many seconds has the longest running processor for workqueue been running.",
            q,
            registry=r,
        )
        self.retries = Counter(
            "workqueue_retries_total", "Total number of retries handled by workqueue", q, registry=r
        )


class ReconcileMetrics:
    """The one-item queue and one worker of a level-based loop, as controller-runtime reports them."""

    def __init__(
        self,
        controller: str = CONTROLLER_NAME,
        registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = controller
        self._clock = clock
        self._queued_at: float | None = None
        self._started_at: float | None = None
        c = self._c = _once(registry, _ReconcileCollectors, lambda: _ReconcileCollectors(registry))
        q = (controller, controller)
        for result in RESULTS:  # controller-runtime starts every series at 0
            c.total.labels(controller, result)
        for counter in (c.errors, c.terminal_errors, c.panics):
            counter.labels(controller)
        c.workers.labels(controller).set(1)
        c.active.labels(controller).set(0)
        c.depth.labels(*q).set(0)
        c.adds.labels(*q)
        c.retries.labels(*q)
        c.unfinished.labels(*q).set_function(self._running_for)
        c.longest.labels(*q).set_function(self._running_for)

    def _running_for(self) -> float:
        return 0.0 if self._started_at is None else max(self._clock() - self._started_at, 0.0)

    def added(self) -> None:
        """A watch event, timer or config change asked for a pass."""
        self._c.adds.labels(self.controller, self.controller).inc()
        if self._queued_at is None:
            self._queued_at = self._clock()
            self._c.depth.labels(self.controller, self.controller).set(1)

    def started(self) -> None:
        """The worker took the item: it leaves the queue."""
        now = self._clock()
        labels = (self.controller, self.controller)
        queued_at = self._queued_at if self._queued_at is not None else now
        self._c.queue_duration.labels(*labels).observe(max(now - queued_at, 0.0))
        self._queued_at = None
        self._c.depth.labels(*labels).set(0)
        self._started_at = now
        self._c.active.labels(self.controller).set(1)

    def finished(self, result: Result) -> None:
        """The pass ended: `error` counts an error and a retry (the loop retries with backoff)."""
        now = self._clock()
        started = self._started_at if self._started_at is not None else now
        elapsed = max(now - started, 0.0)
        self._started_at = None
        c = self._c
        c.active.labels(self.controller).set(0)
        c.work_duration.labels(self.controller, self.controller).observe(elapsed)
        c.time.labels(self.controller).observe(elapsed)
        c.total.labels(self.controller, result).inc()
        if result == "error":
            c.errors.labels(self.controller).inc()
            c.retries.labels(self.controller, self.controller).inc()


class _WebhookCollectors:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "controller_runtime_webhook_requests_total",
            "Total number of admission requests by HTTP status code.",
            ["webhook", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "controller_runtime_webhook_latency_seconds",
            "Histogram of the latency of processing admission requests",
            ["webhook"],
            buckets=WEBHOOK_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "controller_runtime_webhook_requests_in_flight",
            "Current number of admission requests being served.",
            ["webhook"],
            registry=registry,
        )


class WebhookMetrics:
    """Per webhook path, as controller-runtime's webhook server labels them."""

    def __init__(self, paths: tuple[str, ...] = (), registry: CollectorRegistry = REGISTRY) -> None:
        self._c = _once(registry, _WebhookCollectors, lambda: _WebhookCollectors(registry))
        for path in paths:
            self._c.in_flight.labels(path).set(0)

    def begin(self, webhook: str) -> None:
        self._c.in_flight.labels(webhook).inc()

    def end(self, webhook: str, code: int, seconds: float) -> None:
        self._c.in_flight.labels(webhook).dec()
        self._c.latency.labels(webhook).observe(max(seconds, 0.0))
        self._c.requests.labels(webhook, str(code)).inc()
