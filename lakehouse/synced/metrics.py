"""Synced-table metrics (served on /metrics by the shell)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

OPS = ("loaded", "upserted", "deleted")
KINDS = ("snapshot", "incremental", "none")
OUTCOMES = ("ok", "error")


class SyncedMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry}
        self.lag = Gauge("lakelet_synced_table_lag_seconds",
                         "Seconds since the oldest source commit the synced table does not hold yet (0: caught up)",
                         ["branch", "table"], **kw)
        self.rows = Gauge("lakelet_synced_table_rows", "Rows in the synced table", ["branch", "table"], **kw)
        self.applied = Counter("lakelet_synced_table_rows_applied_total",
                               "Rows written to synced tables: loaded by snapshots, upserted or deleted by changes",
                               ["branch", "table", "op"], **kw)
        self.runs = Counter("lakelet_synced_table_runs_total", "Synced-table runs by kind and outcome",
                            ["branch", "table", "kind", "outcome"], **kw)

    def forget(self, branch: str, table: str) -> None:
        for metric in (self.lag, self.rows):
            with contextlib.suppress(KeyError):
                metric.remove(branch, table)
        for op in OPS:
            with contextlib.suppress(KeyError):
                self.applied.remove(branch, table, op)
        for kind in KINDS:
            for outcome in OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.runs.remove(branch, table, kind, outcome)
