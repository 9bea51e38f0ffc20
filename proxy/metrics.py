"""Proxy metrics. Byte and session counts are read from the per-branch ``LoadSignals`` at scrape
time, so the relay's hot path touches no Prometheus object. Bytes are the kernel's count of each
client connection (``TCP_INFO``: handshake and TLS included), added to the signals when a session
ends and read live for the sessions still open."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from compute import LoadSignals

LiveBytes = Callable[[], dict[str, tuple[int, int]]]
# The native relay's (sessions it moves now, bytes it holds for slow readers), or None without it.
RelayState = Callable[[], tuple[int, int] | None]


class _SignalsCollector(Collector):
    def __init__(self, branches: Callable[[], dict[str, LoadSignals]], live: LiveBytes | None,
                 relay: RelayState | None) -> None:
        self.branches = branches
        self.live = live
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        active = GaugeMetricFamily("lakelet_proxy_connections_active", "Sessions relayed now", labels=["branch"])
        moved = CounterMetricFamily("lakelet_proxy_bytes", "Bytes relayed", labels=["branch", "direction"])
        live = self.live() if self.live is not None else {}
        for branch, s in sorted(self.branches().items()):
            live_in, live_out = live.get(branch, (0, 0))
            active.add_metric([branch], s.sessions)
            moved.add_metric([branch, "in"], s.bytes_in + live_in)
            moved.add_metric([branch, "out"], s.bytes_out + live_out)
        yield active
        yield moved
        state = self.relay() if self.relay is not None else None
        if state is not None:
            yield GaugeMetricFamily("lakelet_proxy_relay_native_sessions",
                                    "Sessions whose bytes the native relay moves now", value=state[0])
            yield GaugeMetricFamily("lakelet_proxy_relay_buffered_bytes",
                                    "Bytes the native relay holds for readers slower than their writers",
                                    value=state[1])


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None, branches: Callable[[], dict[str, LoadSignals]],
                 live: LiveBytes | None = None, relay: RelayState | None = None) -> None:
        kw = {"registry": registry}
        self.connections = Counter("lakelet_proxy_connections_total", "Client connections by outcome",
                                   ["branch", "outcome"], **kw)
        self.wake_wait = Histogram("lakelet_proxy_wake_wait_seconds", "Time sessions were held for a compute",
                                   buckets=(0.005, 0.05, 0.25, 0.5, 1, 2, 5, 10, 30), **kw)
        self.auth_failures = Counter("lakelet_proxy_auth_failures_total", "Failed authentications", **kw)
        self.invalid_startup_packets = Counter(
            "lakelet_proxy_invalid_startup_packets_total",
            "Connections closed quietly because their first bytes were not a startup packet", **kw)
        self.protocol_errors = Counter("lakelet_proxy_protocol_errors_total", "Protocol violations by clients", **kw)
        if registry is not None:
            registry.register(_SignalsCollector(branches, live, relay))
        self._ended: dict[tuple[str, str], Counter] = {}

    def connection_ended(self, branch: str, outcome: str) -> None:
        """Count a connection by outcome: the labelled child is looked up once per (branch, outcome)
        pair, not on every connection (``labels()`` takes a lock and builds a key)."""
        child = self._ended.get((branch, outcome))
        if child is None:
            child = self._ended[branch, outcome] = self.connections.labels(branch, outcome)
        child.inc()
