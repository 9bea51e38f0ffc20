"""Retention and GC: after GC drops what no branch and no instant in the window needs, every
branch still materializes, from the store alone, with exactly its rows."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tests.storage.conftest import Lake, branch_at_head, from_store_only, rows, sql, suspend_all

FILLER = "INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"  # a few MB of WAL


async def test_gc_keeps_every_branch_materializable(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE g (n int)")
    await sql(lake, "main", "CREATE TABLE filler (n int, pad text)")
    await sql(lake, "main", FILLER)
    await sql(lake, "main", "INSERT INTO g VALUES (1)")
    await lake.endpoints.suspend("main")  # image 1
    await sql(lake, "main", FILLER)
    await sql(lake, "main", "INSERT INTO g VALUES (2)")
    await lake.endpoints.suspend("main")  # image 2: the head 'a' is made at
    await asyncio.to_thread(lake.store.create_branch, "a", "main")
    moment = await sql(lake, "main", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                     "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    await sql(lake, "main", "INSERT INTO g VALUES (3)")
    await lake.endpoints.suspend("main")  # image 3; 'past' is made before it, from image 2 + WAL
    await asyncio.to_thread(lake.store.create_branch, "past", "main", at=str(moment))
    # 'a' runs and writes WAL, 'b' branches from it mid-run, then 'a' images past that point:
    # 'b' needs 'a''s WAL from its very start, whatever 'a''s own images say.
    await sql(lake, "a", "INSERT INTO g VALUES (10)")
    await sql(lake, "a", FILLER)
    await branch_at_head(lake, "b", "a")
    await sql(lake, "a", "INSERT INTO g VALUES (11)")
    await sql(lake, "a", FILLER)
    await lake.endpoints.suspend("a")
    await sql(lake, "a", "INSERT INTO g VALUES (12)")
    await suspend_all(lake)
    expected = {"main": [1, 2, 3], "a": [1, 2, 10, 11, 12], "b": [1, 2, 10], "past": [1, 2]}

    lake.store.retention = timedelta(0)  # every image is outside the window: the most GC can drop
    try:
        report = await asyncio.to_thread(lake.store.gc)
        assert report.images_deleted >= 2 and report.wal_files_deleted > 0 and report.bytes_freed > 0
        for image in lake.store.catalog.images():
            assert lake.store.objects.exists(image.manifest_key)
        await from_store_only(lake, *expected)
        for branch, want in expected.items():
            assert await rows(lake, branch, "g") == want, branch
        # Running again drops nothing anything needs, and each branch still builds from the store.
        await suspend_all(lake)
        await asyncio.to_thread(lake.store.gc)
        await from_store_only(lake, *expected)
        for branch, want in expected.items():
            assert await rows(lake, branch, "g") == want, branch
    finally:
        lake.store.retention = timedelta(days=7)
        await suspend_all(lake)


async def test_gc_removes_checkpoint_copies_of_deleted_images(lake: Lake) -> None:
    await suspend_all(lake)
    lake.store.retention = timedelta(0)
    try:
        await asyncio.to_thread(lake.store.gc)
    finally:
        lake.store.retention = timedelta(days=7)
    kept = {lake.store._ckpt_dir(i.manifest_key).name for i in lake.store.catalog.images()}
    on_disk = {p.name for p in lake.store.ckpt_root.iterdir()}
    assert on_disk == kept
    assert {k for k in lake.store.objects.list("images/")} == {i.manifest_key for i in lake.store.catalog.images()}
