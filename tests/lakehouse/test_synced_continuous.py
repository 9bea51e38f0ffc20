"""Continuous synced tables on a real compute with scale to zero: an idle source lets the branch
suspend; a new Delta version wakes it and lands; a schema change stops one table, not the others."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from prometheus_client import CollectorRegistry

from compute import EndpointConfig, Endpoints
from lakehouse.synced import service as service_module
from lakehouse.synced.compute import BranchComputes
from lakehouse.synced.service import SyncedTables
from lakehouse.synced.spec import SyncedTableSpec
from storage import Store
from storage.postgres import PgBinaries, ServiceUser
from tests.conftest import poll_until
from tests.lakehouse.synced_support import admin, assert_equal_at_recorded_version, write

COLS = ["id", "v"]
DEADLINE = 90.0  # generous: a loaded machine; only a hang should reach it


@pytest.fixture(scope="module")
async def eps(root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[Endpoints]:
    store = Store.open(root / "store", user=service_user, pg=pg)
    store.bootstrap()
    endpoints = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg,
                          config=EndpointConfig(suspend_timeout=2))
    await endpoints.start()
    yield endpoints
    await endpoints.close()
    store.close()


def state(eps: Endpoints) -> str:
    return next(s.state for s in eps.status() if s.branch == "main")


def table(ids: list[int], tag: str) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "v": [f"{tag}{i}" for i in ids]})


async def test_idle_source_lets_the_branch_suspend_and_a_new_version_wakes_it(eps: Endpoints, root: Path) -> None:
    registry = CollectorRegistry()
    service = SyncedTables(BranchComputes(eps), root / "synced_tables.json", registry)
    await service.start()
    uri, other = root / "events", root / "other"
    write(uri, table([1, 2], "a"))
    write(other, table([1], "o"))
    try:
        spec = SyncedTableSpec.make(source=str(uri), branch="main", target="events", primary_key="id",
                                    mode="continuous")
        created = await service.create(spec)
        assert (created["version"], created["rows"], created["state"]) == (0, 2, "ok")
        spec2 = SyncedTableSpec.make(source=str(other), branch="main", target="other", primary_key="id",
                                     mode="continuous")
        await service.create(spec2)

        # Nothing new in the sources: the watcher reads their logs only, and the branch scales to zero.
        await poll_until(lambda: state(eps) == "suspended", "idle suspend", timeout=DEADLINE, every=0.2)

        write(uri, table([3], "b"))
        await poll_until(lambda: service.get("main", "postgres", "public.events").version == 1,
                         "continuous apply after wake", timeout=DEADLINE, every=0.1)
        assert state(eps) == "active"
        conn = await admin(await eps.ensure_ready("main"))
        try:
            await assert_equal_at_recorded_version(conn, spec, COLS)
        finally:
            await conn.close()

        # An incompatible change stops that table with the column named; the other keeps going.
        write(other, pa.table({"id": pa.array([9], pa.int64()), "v": pa.array([1.5])}), mode="overwrite",
              schema_mode="overwrite")
        await poll_until(lambda: service.get("main", "postgres", "public.other").stopped, "schema stop",
                         timeout=DEADLINE, every=0.1)
        status = service.get("main", "postgres", "public.other").status()
        assert status["state"] == "stopped" and "column 'v' changed type from text to double precision" in \
            status["last_error"]
        write(uri, table([4], "c"))
        await poll_until(lambda: service.get("main", "postgres", "public.events").version == 2,
                         "the other table keeps going", timeout=DEADLINE, every=0.1)
        assert registry.get_sample_value("lakelet_synced_table_rows", {"branch": "main", "table": "public.events"}) == 4
        assert registry.get_sample_value("lakelet_synced_table_lag_seconds",
                                         {"branch": "main", "table": "public.events"}) == 0
    finally:
        await service.close()

    # The definitions survive a restart of the service; a caught-up table does not wake anything.
    saved = json.loads((root / "synced_tables.json").read_text())
    assert {t["spec"]["table"] for t in saved["tables"]} == {"events", "other"}
    await eps.suspend("main")
    again = SyncedTables(BranchComputes(eps), root / "synced_tables.json", CollectorRegistry())
    await again.start()
    try:
        entry = again.get("main", "postgres", "events")
        assert (entry.version, entry.rows) == (2, 4)
        await poll_until(lambda: entry.source_version == 2, "a poll of the source", timeout=DEADLINE, every=0.1)
        assert state(eps) == "suspended"
        assert DeltaTable(str(uri)).version() == 2
    finally:
        await again.close()


async def test_compute_killed_during_a_run_is_retried_to_the_exact_table(eps: Endpoints, root: Path) -> None:
    """SIGKILL of the branch's Postgres while a continuous run is applying a large change: the run's
    transaction is lost with the server, the watcher backs off, wakes the branch and applies again."""
    registry = CollectorRegistry()
    service = SyncedTables(BranchComputes(eps), root / "killed.json", registry)
    await service.start()
    uri = root / "bulk"
    write(uri, table([0], "a"))
    spec = SyncedTableSpec.make(source=str(uri), branch="main", target="bulk", primary_key="id", mode="continuous")
    try:
        await service.create(spec)
        entry = service.get("main", "postgres", "bulk")
        write(uri, table(list(range(1, 300_001)), "b"))
        await poll_until(lambda: entry.lock.locked(), "a run in progress", timeout=DEADLINE, every=0.005)
        addr = await eps.ensure_ready("main")
        os.kill(addr.pid, signal.SIGKILL)
        await poll_until(lambda: entry.version == 1 and not entry.lock.locked(), "the retried run",
                         timeout=DEADLINE, every=0.1)
        failed = registry.get_sample_value("lakelet_synced_table_runs_total", {
            "branch": "main", "table": "public.bulk", "kind": "none", "outcome": "error"})
        assert failed and failed >= 1  # the kill did land inside a run
        conn = await admin(await eps.ensure_ready("main"))
        try:
            await assert_equal_at_recorded_version(conn, spec, COLS)
        finally:
            await conn.close()
    finally:
        await service.close()


async def test_a_triggered_table_reports_its_lag_without_running(eps: Endpoints, root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "LAG_POLL_SECONDS", 0.2)
    registry = CollectorRegistry()
    service = SyncedTables(BranchComputes(eps), root / "triggered.json", registry)
    await service.start()
    uri = root / "ondemand"
    write(uri, table([1], "a"))
    try:
        await service.create(SyncedTableSpec.make(source=str(uri), branch="main", target="ondemand",
                                                  primary_key="id", mode="triggered"))
        entry = service.get("main", "postgres", "ondemand")
        write(uri, table([2], "b"))
        labels = {"branch": "main", "table": "public.ondemand"}
        await poll_until(lambda: (registry.get_sample_value("lakelet_synced_table_lag_seconds", labels) or 0) > 0,
                         "the lag of a table behind its source", timeout=DEADLINE, every=0.1)
        assert (entry.version, entry.source_version) == (0, 1)  # measured, not run: triggered waits
        status = await service.refresh("main", "postgres", "ondemand")
        assert (status["version"], status["lag_seconds"]) == (1, 0.0)
        assert registry.get_sample_value("lakelet_synced_table_lag_seconds", labels) == 0
    finally:
        await service.close()
