"""A sync whose slot lags behind WAL that is no longer on local disk: with an ``s3://`` store the
local archive keeps only each branch's WAL tail, so when a rebuilt data dir gets its sync slot
back, the segments from the slot's ``restart_lsn`` on must be read back from the bucket into
``pg_wal``. The sync then resumes where it was — no re-snapshot — and its history equals the
change list row by row."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lakehouse.manager import LakehouseSync
from storage.postgres import PgBinaries, ServiceUser
from storage.store import WAL_SEGMENT_MB
from tests.lakehouse.conftest import connect, wait_for
from tests.lakehouse.test_survival import _caught_up, streaming_with_writes
from tests.s3server import S3Server
from tests.storage.conftest import Lake, close_lake, open_lake, s3_server  # noqa: F401 - the fixture

FILLER = "INSERT INTO public.filler SELECT g, repeat('x', 200) FROM generate_series(1, 4000) g"  # ~1 MB of WAL
SEGMENT = WAL_SEGMENT_MB << 20


@pytest.fixture(scope="module")
async def lake(lake_root: Path, service_user: ServiceUser, pg: PgBinaries,
               s3_server: S3Server) -> AsyncIterator[Lake]:  # noqa: F811
    opened = await open_lake(lake_root, service_user, pg, f"s3://{s3_server.new_bucket()}/store",
                             upload_interval=0.2)
    opened.endpoints.require_logical("main")
    yield opened
    await close_lake(opened)


def _segno(name: str) -> int:
    return int(name[8:16], 16) * (0x100000000 // SEGMENT) + int(name[16:24], 16)


async def test_slot_behind_the_local_tail_is_seeded_from_the_bucket(lake: Lake, lake_root: Path) -> None:
    def new_sync() -> LakehouseSync:
        return LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync",
                             default_uri=str(lake_root / "lakehouse"), flush_interval=0.2,
                             registry=CollectorRegistry())

    sync = new_sync()
    await sync.start()
    conn = await connect(lake)
    try:
        writer = await streaming_with_writes(sync, conn, "bkt", seed=5, transactions=4, what="streaming")

        # The syncer stops: its slot stays where it was while changes and several segments follow.
        await sync.close()
        restart = await conn.fetchval("SELECT min(restart_lsn) - '0/0'::pg_lsn FROM pg_replication_slots")
        for _ in range(4):
            await writer.transaction()
        for _ in range(5):
            await conn.execute(FILLER)
        for _ in range(2):
            await writer.transaction()
        await conn.close()
        await lake.endpoints.suspend("main")  # a clean image that keeps the lagging slot

        # The uploader drops finished segments it has put in the bucket: the slot's are gone locally.
        assert lake.store.remote_wal is not None
        branch_id = lake.store.get_branch("main").id
        first = int(restart) // SEGMENT

        def offloaded() -> bool:
            return any(_segno(n) >= first for n in lake.store.remote_wal.entries(str(branch_id)))  # type: ignore[union-attr]

        await wait_for(offloaded, "a segment the slot needs only in the bucket", timeout=120)
        shutil.rmtree(lake.computes)  # the data dir is rebuilt from the image; the slot comes with it

        sync = new_sync()
        await sync.start()
        conn = writer.conn = await connect(lake)
        for _ in range(3):
            await writer.transaction()
        await _caught_up(sync, writer.expected, "after the rebuild")
        assert sync.status("main")[0]["snapshot_note"] is None  # resumed, never re-snapshotted
    finally:
        await conn.close()
        await sync.close()
