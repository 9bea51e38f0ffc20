"""The Data API's Prometheus metrics (served on /metrics by the shell): requests by branch, method
and status, and their latency. The branch label is set only once the branch is known to exist, so
hostile paths cannot grow the label set."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

UNKNOWN = "-"


class DataAPIMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter("lakelet_data_api_requests_total", "Data API requests answered",
                                ["branch", "method", "status"], **kw)
        self.seconds = Histogram("lakelet_data_api_request_seconds", "Data API request latency, wake included",
                                 ["branch"], buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30),
                                 **kw)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labels() is slow on the hot path

    def observe(self, branch: str, method: str, status: int, seconds: float) -> None:
        key = (branch, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(branch, method, str(status)),
                                              self.seconds.labels(branch))
        children[0].inc()
        children[1].observe(seconds)
