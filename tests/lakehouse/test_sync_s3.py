"""A lakehouse in a bucket: ``lakehouse_uri = s3://bucket/prefix`` with the standard AWS settings
(here moto's S3 server on loopback, plain HTTP, found through ``AWS_ENDPOINT_URL``). The history is
written there exactly once across a kill -9 of the worker, and read back by deltalake from the
bucket; a bucket that does not exist is refused at ``enable`` with one line."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from deltalake import DeltaTable
from prometheus_client import CollectorRegistry

from lakehouse import location
from lakehouse.manager import LakehouseSync, SyncError
from tests.lakehouse.conftest import Writer, connect, wait_for
from tests.s3server import S3Server
from tests.storage.conftest import Lake, s3_server  # noqa: F401 - the fixture


def _history(uri: str) -> list[tuple[object, ...]]:
    opts = location.storage_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return []
    rows = DeltaTable(uri, storage_options=opts).to_pyarrow_table().to_pylist()
    return [(r["_pg_change_type"], r["id"], r["v"]) for r in sorted(rows, key=lambda r: r["_sort_by"])]


async def test_history_in_a_bucket_exactly_once(lake: Lake, lake_root: Path, s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.new_bucket("lakehouse")
    base = f"s3://{bucket}/lake/house"
    sync = LakehouseSync(lake.endpoints, lake.store, state_root=lake_root / "sync-s3", default_uri=base,
                         flush_interval=0.1, registry=CollectorRegistry())
    await sync.start()
    conn = await connect(lake)
    wconn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA ins3; CREATE TABLE ins3.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO ins3.t SELECT g, 'v' || g FROM generate_series(1, 50) g")
        with pytest.raises(SyncError, match=r"^lakehouse s3://no-such-bucket-[0-9]+/x: bucket .* does not exist"):
            await sync.enable("main", "ins3", uri=f"s3://no-such-bucket-{os.getpid()}/x")
        status = await sync.enable("main", "ins3")
        assert status["uri"] == f"{base}/main/postgres/ins3"
        uri = status["uri"] + "/lb_t_history"
        writer = Writer(wconn, "ins3.t", seed=3)
        writer.next_id = 51
        writer.live = {i: f"v{i}" for i in range(1, 51)}
        writer.expected = [("insert", i, f"v{i}") for i in range(1, 51)]
        await wait_for(lambda: _history(uri) == writer.expected, "the snapshot in the bucket", timeout=120,
                       every=0.25)
        for _ in range(5):
            await writer.transaction()
        run = sync.runs[("main", "postgres", "ins3")]
        os.kill(run.proc.pid, signal.SIGKILL)  # whatever it had not committed is read again from the slot
        for _ in range(5):
            await writer.transaction()
            await asyncio.sleep(0.05)
        await wait_for(lambda: _history(uri) == writer.expected, "the history after kill -9", timeout=120,
                       every=0.25)
        # Nothing was written outside the prefix, and the local disk holds no Delta table.
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys and all(k.startswith("lake/house/main/postgres/ins3/lb_t_history/") for k in keys)
        assert not (lake_root / "lakehouse").exists()
    finally:
        await sync.close()
        await wconn.close()
        await conn.close()
