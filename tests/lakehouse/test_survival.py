"""The sync's slot survives everything a compute goes through — suspend/resume, kill -9, the loss
of ``computes/``, a restart of the whole service — with writes around each, and the history
equals the expected change list afterwards: nothing missed, nothing repeated."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

from compute import EndpointConfig, Endpoints
from lakehouse.manager import LakehouseSync
from storage import images
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
        logs = "".join((p / "worker.log").read_text()[-4000:] for p in [sync.state_dir(c) for c in sync.syncs.values()])
        pglog = (sync.endpoints.ctx.computes_dir / "main" / "postgres.log").read_text()[-3000:]
        assert got == expected, f"{what}: {sync.status('main')}\n{logs}\n{pglog}"


async def streaming_with_writes(sync: LakehouseSync, conn: asyncpg.Connection, schema: str, *, seed: int,
                                transactions: int, what: str) -> Writer:
    """``schema.t`` synced on main and streaming, ``transactions`` written and caught up; plus an
    unsynced ``public.filler`` for tests that grow WAL."""
    await conn.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id int PRIMARY KEY, v text);"
                       "CREATE TABLE public.filler (n int, pad text)")
    await sync.enable("main", schema)
    await wait_for(lambda: sync.status("main")[0]["state"] == "streaming", "snapshot")
    writer = Writer(conn, f"{schema}.t", seed=seed)
    for _ in range(transactions):
        await writer.transaction()
    await _caught_up(sync, writer.expected, what)
    return writer


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
        latest = lake.store.catalog.images(lake.store.get_branch("main").id)[-1]
        files = [f["p"] for f in images.read_manifest(lake.store.objects, latest.manifest_key)["files"]]
        assert [f for f in files if f.startswith("pg_replslot/lakelet_sync_")], "the clean image keeps the slot"
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


async def test_children_do_not_inherit_and_restore_resnapshots(lake: Lake, lake_root: Path) -> None:
    sync = LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync2",
                         default_uri=str(lake_root / "lakehouse2"), flush_interval=0.1,
                         registry=CollectorRegistry())
    await sync.start()
    conn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA br; CREATE TABLE br.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO br.t VALUES (1, 'one')")
        await sync.enable("main", "br")
        await wait_for(lambda: sync.status("main")[0]["state"] == "streaming", "snapshot")
        node = lake.endpoints.active_node("main")
        assert node is not None
        point = await node.branch_point()
        await conn.execute("INSERT INTO br.t VALUES (2, 'two')")

        # A child branch gets the data, not the sync: no slot of its parent's sync on its compute.
        head = await node.branch_point()
        lake.store.create_branch("kid", "main", head_lsn=head)
        kid = await connect(lake, "kid")
        try:
            assert await kid.fetchval("SELECT count(*) FROM br.t") == 2
            slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'lakelet_sync%'"
            assert await kid.fetchval(slots) == 0
        finally:
            await kid.close()
        assert sync.status("kid") == []
        # A sync of a branch that is deleted says so instead of waiting forever.
        await sync.enable("kid", "br")
        await lake.endpoints.suspend("kid")
        lake.store.delete_branch("kid")
        lake.endpoints.forget("kid")
        await wait_for(lambda: "no longer exists" in (sync.status("kid")[0]["error"] or ""), "deleted branch noticed")
        assert sync.status("kid")[0]["state"] == "error"
        await sync.disable("kid")

        # Restoring the branch re-points its sync: a fresh snapshot of the restored state, said in status.
        await conn.close()
        await lake.endpoints.suspend("main")
        lake.endpoints.forget("main")
        _, backup = lake.store.restore_branch("main", point)
        conn = await connect(lake)
        await wait_for(lambda: (sync.status("main")[0]["snapshot_note"] or "").startswith("the branch was restored"),
                       "re-snapshot after restore")
        await wait_for(lambda: sync.status("main")[0]["state"] == "streaming", "streaming after restore")
        rows = sorted((r["_pg_change_type"], r["id"]) for r in _rows(sync, "br"))
        assert rows == [("insert", 1)]
        # The backup branch the restore left keeps the old state, but not the old slot: no syncer
        # reads it there, and it would hold that compute's WAL.
        old = await connect(lake, backup)
        try:
            assert await old.fetchval("SELECT count(*) FROM br.t") == 2
            assert await old.fetchval("SELECT count(*) FROM pg_replication_slots "
                                      "WHERE slot_name LIKE 'lakelet\\_sync\\_%'") == 0
        finally:
            await old.close()
            await lake.endpoints.suspend(backup)
    finally:
        await conn.close()
        await sync.close()


def _rows(sync: LakehouseSync, schema: str) -> list[dict[str, object]]:
    from deltalake import DeltaTable

    uri = next(s["uri"] for s in sync.status("main") if s["schema"] == schema) + "/lb_t_history"
    return DeltaTable(uri).to_pyarrow_table().to_pylist()
