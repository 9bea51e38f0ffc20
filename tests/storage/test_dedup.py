"""Images share pages: a child of a ~150 MB database that changes 1,000 rows adds a few MB to the
store, not another copy."""

from __future__ import annotations

import asyncio

from tests.storage.conftest import Lake, sql

ROWS = 150_000
# ~1 KB of hex text per row: 8 rows fill a page (an updated row moves to a new page at the end),
# ~150 MB of heap, one statement.
MAKE_BIG = (f"CREATE TABLE big AS SELECT g AS n, "
            f"(SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 30) i) AS pad "
            f"FROM generate_series(1, {ROWS}) g")
MB = 1 << 20


async def test_child_of_a_large_database_stores_only_what_it_changed(lake: Lake) -> None:
    await sql(lake, "main", MAKE_BIG)
    size = int(await sql(lake, "main", "SELECT pg_total_relation_size('big')"))  # type: ignore[call-overload]
    assert size >= 140 * MB
    # As autovacuum would in a database in use: set hint bits and the visibility map once, or the
    # first reader anywhere (here: the child's UPDATE) rewrites every page to set them.
    await sql(lake, "main", "VACUUM big")
    await lake.endpoints.suspend("main")  # main's image holds the table
    before = await asyncio.to_thread(lake.store.physical_bytes)
    await asyncio.to_thread(lake.store.create_branch, "child", "main")
    await sql(lake, "child", "UPDATE big SET pad = upper(pad) WHERE n <= 1000")
    await lake.endpoints.suspend("child")  # the child's image: its changed pages, the rest shared
    grown = await asyncio.to_thread(lake.store.physical_bytes) - before
    assert len(lake.store.catalog.images(lake.store.get_branch("child").id)) == 1
    assert grown <= 10 * MB, f"the store grew by {grown / MB:.1f} MB"
    assert await sql(lake, "child", "SELECT count(*) FROM big WHERE pad = upper(pad)") == 1000
    assert await sql(lake, "main", "SELECT count(*) FROM big WHERE pad = upper(pad)") == 0
    await lake.endpoints.suspend("main")
    await lake.endpoints.suspend("child")
