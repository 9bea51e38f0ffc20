"""The sync's slot survives everything a compute goes through — suspend/resume, kill -9, the loss
of ``computes/``, a restart of the whole service — with writes around each, and the history
equals the expected change list afterwards: nothing missed, nothing repeated."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from prometheus_client import CollectorRegistry

from compute import EndpointConfig, Endpoints
from lakehouse.manager import LakehouseSync
from storage.postgres import PgBinaries, ServiceUser
from tests.lakehouse.conftest import Writer, connect, wait_for
from tests.storage.conftest import Lake

TXNS = 6


def _history(sync: LakehouseSync) -> list[tuple[object, ...]]:
    from deltalake import DeltaTable

    uri = sync.status("main")[0]["uri"] + "/lb_t_history"
    if not DeltaTable.is_deltatable(uri):
        return []
    rows = sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["_sort_by"])
    return [(r["_pg_change_type"], r["id"], r["v"]) for r in rows]


async def _caught_up(sync: LakehouseSync, expected: list[tuple[object, ...]], what: str) -> None:
    last: list[object] = []

    def equal() -> bool:
        last[:] = [_history(sync)]
        return last[0] == expected

    try:
        await wait_for(equal, what, timeout=120, every=0.25)
    except AssertionError:
        got = last[0] if last else []
        assert got == expected, f"{what}: {sync.status('main')}"


async def test_slot_survives_suspend_crash_lost_computes_and_restart(lake: Lake, lake_root: Path,
                                                                     service_user: ServiceUser,
                                                                     pg: PgBinaries) -> None:
    sync = LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync",
                         default_uri=str(lake_root / "lakehouse"), flush_interval=1.0,
                         registry=CollectorRegistry())
    await sync.start()
    conn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA surv; CREATE TABLE surv.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO surv.t VALUES (0, 'seed')")
        await sync.enable("main", "surv")
        await wait_for(lambda: sync.status("main")[0]["state"] == "streaming", "snapshot")
        writer = Writer(conn, "surv.t", seed=3)
        writer.live[0] = "seed"
        writer.expected.append(("insert", 0, "seed"))
        for _ in range(TXNS):
            await writer.transaction()

        # 1. Suspend (the sync drains first) and resume, with writes on both sides.
        await conn.close()
        await lake.endpoints.suspend("main")
        await _caught_up(sync, writer.expected, "drained before suspend")
        conn = writer.conn = await connect(lake)
        for _ in range(TXNS):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after resume")

        # 2. kill -9 of the compute while changes are still only in the slot (flushes are 1 s apart).
        for _ in range(TXNS):
            await writer.transaction()
        node = lake.endpoints.active_node("main")
        assert node is not None and node.pid is not None
        os.kill(node.pid, signal.SIGKILL)
        await wait_for(lambda: lake.endpoints.active_node("main") is None, "crash noticed")
        await conn.close()
        conn = writer.conn = await connect(lake)  # rebuilt from the store; the slot is carried over
        for _ in range(TXNS):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after kill -9 of the compute")

        # 3. The computes directory is lost while suspended: the slot comes back from the image.
        await conn.close()
        await lake.endpoints.suspend("main")
        shutil.rmtree(lake.computes)
        conn = writer.conn = await connect(lake)
        for _ in range(TXNS):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after rm -r computes")

        # 4. The service restarts: drain at shutdown, state and slot picked up again.
        await conn.close()
        await sync.close()
        await lake.endpoints.close()
        lake.endpoints = Endpoints(lake.store, computes_dir=lake.root / "computes", user=service_user, pg=pg,
                                   config=EndpointConfig(suspend_timeout=3600), cgroups=False)
        await lake.endpoints.start()
        sync = LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync",
                             default_uri=str(lake_root / "lakehouse"), flush_interval=1.0,
                         registry=CollectorRegistry())
        await sync.start()
        conn = writer.conn = await connect(lake)
        for _ in range(TXNS):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after a restart of the service")
        assert sync.status("main")[0]["snapshot_note"] is None  # never re-snapshotted
    finally:
        await conn.close()
        await sync.close()
