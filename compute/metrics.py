"""The compute room's Prometheus metrics (served on /metrics by the shell)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATES = ("suspended", "starting", "active", "suspending", "failed")
IMAGE_OUTCOMES = ("ok", "error")


class ComputeMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry}
        self.starts = Counter("lakelet_compute_starts_total", "Compute starts", ["branch"], **kw)
        self.state = Gauge("lakelet_compute_state", "1 for the endpoint's current state", ["branch", "state"], **kw)
        self.cu = Gauge("lakelet_compute_cu", "Current compute size in CU", ["branch"], **kw)
        self.start_seconds = Histogram(
            "lakelet_compute_start_seconds", "Time from wake request to a ready compute",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), **kw)
        self.decisions = Counter("lakelet_autoscaler_decisions_total", "Autoscaler size changes",
                                 ["branch", "direction"], **kw)
        self.cpu = Counter("lakelet_compute_cpu_seconds_total", "CPU time of the compute's processes",
                           ["branch"], **kw)
        self.memory = Gauge("lakelet_compute_memory_bytes",
                            "Resident memory of the compute's processes (private pages, shared memory once)",
                            ["branch"], **kw)
        self.background_images = Counter(
            "lakelet_compute_background_images_total",
            "Images taken of running computes whose branch streamed much WAL since its last image",
            ["branch", "outcome"], **kw)

    def set_state(self, branch: str, state: str) -> None:
        for s in STATES:
            self.state.labels(branch, s).set(1 if s == state else 0)

    def forget(self, branch: str) -> None:
        """Drop a branch's series (deleted or renamed), so /metrics does not report ghosts."""
        for metric in (self.starts, self.cu, self.cpu, self.memory):
            with contextlib.suppress(KeyError):
                metric.remove(branch)
        for state in STATES:
            with contextlib.suppress(KeyError):
                self.state.remove(branch, state)
        for direction in ("up", "down"):
            with contextlib.suppress(KeyError):
                self.decisions.remove(branch, direction)
        for outcome in IMAGE_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.background_images.remove(branch, outcome)
