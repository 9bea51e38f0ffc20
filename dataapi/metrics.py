"""The Data API's Prometheus metrics (served on /metrics by the shell, summed over the workers):
requests by branch, method and status, and their latency. The branch label is set only once the
branch is known to exist, so hostile paths cannot grow the label set.

Counted in plain Python numbers and rendered only when collected: on every request,
prometheus_client's ``inc``/``observe`` (a lock each, a label lookup) cost more than the counting
itself, and a worker's process is single-threaded."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

UNKNOWN = "-"
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30)


class _Requests(Collector):
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        self.created: dict[tuple[str, str, int], float] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("lakelet_data_api_requests", "Data API requests answered",
                                     labels=["branch", "method", "status"])
        for (branch, method, status), n in list(self.counts.items()):
            family.add_metric([branch, method, str(status)], n, created=self.created[(branch, method, status)])
        yield family


class _Latency(Collector):
    def __init__(self) -> None:
        self.buckets: dict[str, list[int]] = {}   # per branch: count per bucket (not cumulative), +Inf last
        self.sums: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("lakelet_data_api_request_seconds", "Data API request latency, wake included",
                                       labels=["branch"])
        for branch, counts in list(self.buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += n
                cumulative.append((str(float(bound)) if bound != float("inf") else "+Inf", running))
            family.add_metric([branch], cumulative, self.sums[branch])
        yield family


class DataAPIMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = _Requests()
        self.seconds = _Latency()
        self.registry.register(self.requests)
        self.registry.register(self.seconds)

    def observe(self, branch: str, method: str, status: int, seconds: float) -> None:
        key = (branch, method, status)
        counts = self.requests.counts
        n = counts.get(key)
        if n is None:
            self.requests.created[key] = time.time()
            n = 0
        counts[key] = n + 1
        buckets = self.seconds.buckets.get(branch)
        if buckets is None:
            buckets = self.seconds.buckets[branch] = [0] * (len(BUCKETS) + 1)
            self.seconds.sums[branch] = 0.0
        buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds.sums[branch] += seconds
