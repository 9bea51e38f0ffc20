"""A sync's slot across what the store does to a running branch:

- an **online image** (``pg_basebackup`` of the running compute, taken as its WAL grows) carries the
  sync slot like a clean image does, so a kill -9 plus the loss of ``computes/`` after it resumes
  the sync where it was — no re-snapshot, history equal to the change list row by row; a branch
  made from that image does not get the slot;
- a slot **no one reads** cannot pin WAL forever: computes of a synced branch run with
  ``max_slot_wal_keep_size``; when Postgres invalidates the slot, the next worker says so in status
  and takes a fresh snapshot instead of failing in a loop or losing it silently.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from compute import EndpointConfig, logical_slots
from lakehouse.manager import LakehouseSync
from storage import images
from storage.postgres import PgBinaries, ServiceUser
from storage.store import IMAGE_WAL_THRESHOLD
from tests.lakehouse.conftest import Worker, connect, history, make_spec, wait_for, wait_lsn
from tests.lakehouse.test_survival import _caught_up, streaming_with_writes
from tests.storage.conftest import Lake, close_lake, open_lake

FILLER = "INSERT INTO public.filler SELECT g, repeat('x', 200) FROM generate_series(1, 4000) g"  # ~1 MB of WAL


@pytest.fixture(scope="module")
async def lake(lake_root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[Lake]:
    """Endpoints that check twice a second whether a running branch needs an online image."""
    opened = await open_lake(lake_root, service_user, pg, image_wal_threshold=IMAGE_WAL_THRESHOLD,
                             config=EndpointConfig(suspend_timeout=3600, image_check_every=0.5))
    opened.endpoints.require_logical("main")
    yield opened
    await close_lake(opened)


def _online(lake: Lake) -> list[object]:
    return [i for i in lake.store.catalog.images(lake.store.get_branch("main").id) if i.online]


async def test_online_image_carries_the_slot(lake: Lake, lake_root: Path) -> None:
    sync = LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync-online",
                         default_uri=str(lake_root / "lakehouse-online"), flush_interval=0.2,
                         registry=CollectorRegistry())
    await sync.start()
    conn = await connect(lake)
    try:
        writer = await streaming_with_writes(sync, conn, "onl", seed=11, transactions=8, what="before the online image")

        # WAL grows past the threshold: the store images the running compute.
        lake.store.image_wal_threshold = 2 << 20
        before = len(_online(lake))

        async def imaged() -> bool:
            await conn.execute(FILLER)
            return len(_online(lake)) > before

        await _until(imaged)
        lake.store.image_wal_threshold = IMAGE_WAL_THRESHOLD
        await lake.endpoints.endpoint("main").image_job_done()
        image = _online(lake)[-1]
        files = [f["p"] for f in images.read_manifest(lake.store.objects, image.manifest_key)["files"]]  # type: ignore[attr-defined]
        assert [f for f in files if f.startswith("pg_replslot/lakelet_sync_")], "the online image keeps the slot"

        # Changes after the image, then kill -9 and the loss of computes/: only the image has the slot.
        for _ in range(8):
            await writer.transaction()
        node = lake.endpoints.active_node("main")
        assert node is not None and node.pid is not None
        os.kill(node.pid, signal.SIGKILL)
        await wait_for(lambda: lake.endpoints.endpoint("main").state == "suspended", "crash noticed")
        await lake.endpoints.endpoint("main").image_job_done()
        await conn.close()
        shutil.rmtree(lake.computes)
        conn = writer.conn = await connect(lake)
        for _ in range(4):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after kill -9 and rm -r computes")
        assert sync.status("main")[0]["snapshot_note"] is None  # resumed from the image's slot

        # A branch made from the running compute now starts from that image: it gets no sync slot.
        node = lake.endpoints.active_node("main")
        assert node is not None
        lake.store.create_branch("onl_kid", "main", head_lsn=await node.branch_point())
        kid = await connect(lake, "onl_kid")
        try:
            assert await kid.fetchval("SELECT count(*) FROM pg_replication_slots "
                                      "WHERE slot_name LIKE 'lakelet\\_sync\\_%'") == 0
        finally:
            await kid.close()
            await lake.endpoints.suspend("onl_kid")
    finally:
        await conn.close()
        await sync.close()


async def _until(step: object, timeout: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await step():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError("no online image was taken")


async def test_a_slot_no_one_reads_is_bounded_and_its_loss_is_said(lake: Lake) -> None:
    conn = await connect(lake)
    try:
        keep = await conn.fetchval("SHOW max_slot_wal_keep_size")
        assert keep == logical_slots.SETTINGS["max_slot_wal_keep_size"]
        await conn.execute("CREATE SCHEMA lost; CREATE TABLE lost.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO lost.t VALUES (1, 'one'), (2, 'two')")
        spec = make_spec(lake, "lost", flush_interval=0.05)
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming", "snapshot")
        await conn.execute("UPDATE lost.t SET v = 'uno' WHERE id = 1")
        await wait_lsn(worker, conn)
        worker.stop()
        assert len(history(spec, "t")) == 4

        # The worker is gone (a sync in error, say) while the branch writes on: past the limit
        # (made small here) Postgres invalidates the slot at a checkpoint.
        await conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        await conn.execute("SELECT pg_reload_conf()")
        try:
            await conn.execute("DELETE FROM lost.t WHERE id = 2")  # only in the WAL the slot loses
            await conn.execute("CREATE TABLE IF NOT EXISTS public.filler (n int, pad text)")
            for _ in range(6):
                await conn.execute(FILLER)
                await conn.execute("CHECKPOINT")
                status = await conn.fetchval("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                                             spec.slot)
                if status == "lost":
                    break
            assert status == "lost"
        finally:
            await conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            await conn.execute("SELECT pg_reload_conf()")

        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming" or worker.proc.poll() is not None,
                       "a fresh snapshot")
        assert worker.proc.poll() is None, worker.log_text()
        note = worker.status().get("snapshot_note") or ""
        assert note.startswith(f"slot {spec.slot} was invalidated by Postgres"), note
        # History is the table as it is now (the delete came from the fresh snapshot, not the lost WAL).
        assert [(r["_pg_change_type"], r["id"], r["v"]) for r in history(spec, "t")] == [("insert", 1, "uno")]
        await conn.execute("INSERT INTO lost.t VALUES (3, 'three')")
        await wait_lsn(worker, conn)
        assert [(r["_pg_change_type"], r["id"]) for r in history(spec, "t")] == [("insert", 1), ("insert", 3)]
        worker.stop()
    finally:
        await conn.close()


async def test_wal_the_slot_needs_gone_is_said_and_resnapshotted(lake: Lake) -> None:
    """The slot is there but the WAL from its restart point is not (here removed by hand; in life a
    data dir rebuilt from an image whose slot is older than what the archive kept): the worker
    records why, and the next one takes a fresh snapshot saying so — no silent gap, no crash loop."""
    conn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA gone; CREATE TABLE gone.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO gone.t VALUES (1, 'one')")
        await conn.execute("CREATE TABLE IF NOT EXISTS public.filler (n int, pad text)")
        spec = make_spec(lake, "gone", flush_interval=0.05)
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming", "snapshot")
        await wait_lsn(worker, conn)
        worker.stop()
        await conn.execute("INSERT INTO gone.t VALUES (2, 'two')")  # in WAL about to disappear
        for _ in range(3):
            await conn.execute(FILLER)
        await conn.execute("CHECKPOINT")
        first = await conn.fetchval("SELECT pg_walfile_name(restart_lsn) FROM pg_replication_slots "
                                    "WHERE slot_name = $1", spec.slot)
        redo = await conn.fetchval("SELECT pg_walfile_name(redo_lsn) FROM pg_control_checkpoint()")
        node = lake.endpoints.active_node("main")
        assert node is not None
        doomed = [p for p in (node.datadir / "pg_wal").iterdir() if len(p.name) == 24 and first <= p.name < redo]
        assert doomed, (first, redo)
        for p in doomed:
            p.unlink()

        worker = Worker(spec)
        await wait_for(lambda: worker.proc.poll() is not None, "the worker to find the WAL gone")
        assert "has already been removed" in worker.log_text() + str(worker.status())
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming" or worker.proc.poll() is not None,
                       "a fresh snapshot")
        assert worker.proc.poll() is None, worker.log_text()
        note = worker.status().get("snapshot_note") or ""
        assert note.startswith(f"WAL that slot {spec.slot} needs is gone (") and "fresh snapshot" in note, note
        assert sorted((r["_pg_change_type"], r["id"]) for r in history(spec, "t")) == [("insert", 1), ("insert", 2)]
        worker.stop()
    finally:
        await conn.close()
