"""kill -9 of a compute while it writes a WAL record larger than a segment: the branch comes back.

The receiver may have stored whole segments of the old timeline past the point where recovery
ends (the torn record's start), and the restarted server forks its new timeline there. Each kill
lands at a random offset inside the record (measured by what the store already holds); after each
one the branch must wake and every acknowledged row must be there. One store and one compute are
reused across the points: each point costs a crash recovery, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import poll_until
from tests.storage.conftest import ADMIN, Lake, close_lake, connect, open_lake

POINTS = 20
RECORD = 5 << 20  # five 1 MB segments: a kill can leave several whole segments past the fork
WAKE = 120.0  # a hang, not a slow machine, should ever reach it


@pytest.fixture(scope="module")
async def lake(root, service_user, pg) -> AsyncIterator[Lake]:  # noqa: ANN001 - fixtures
    opened = await open_lake(root, service_user, pg)
    yield opened
    await close_lake(opened)


async def _flushed(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval(
        "SELECT flush_lsn - '0/0'::pg_lsn FROM pg_stat_replication WHERE application_name = 'lakelet_wal'")
    return int(value or 0)


async def _kill_mid_record(lake: Lake, branch: str, offset: int) -> None:
    """Start writing one RECORD-byte record and kill -9 the postmaster once the store holds
    ``offset`` bytes of it (or once the record is done, for offsets past its end)."""
    addr = await asyncio.wait_for(lake.endpoints.ensure_ready(branch), WAKE)
    writer = await connect(addr)
    watcher = await connect(addr)
    try:
        start = int(await watcher.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))
        emit = asyncio.create_task(writer.execute(
            f"SELECT pg_logical_emit_message(false, 'p', repeat('x', {RECORD}))"))
        while not emit.done() and await _flushed(watcher) < start + offset:
            await asyncio.sleep(0.002)
        os.kill(addr.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await emit
    finally:
        writer.terminate()
        watcher.terminate()
    await poll_until(lambda: lake.endpoints.active_node(branch) is None, "the crash to be noticed",
                     timeout=30, every=0.05)


async def test_kill_9_during_a_large_record_never_strands_the_branch(lake: Lake) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4)))
    branch = "main"
    addr = await asyncio.wait_for(lake.endpoints.ensure_ready(branch), WAKE)
    conn = await connect(addr)
    await conn.execute("CREATE TABLE acked (n int PRIMARY KEY)")
    await conn.close()
    acked: list[int] = []
    for point in range(POINTS):
        addr = await asyncio.wait_for(lake.endpoints.ensure_ready(branch), WAKE)
        conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN, database="postgres")
        try:
            await conn.execute("INSERT INTO acked VALUES ($1)", point)
        finally:
            await conn.close()
        acked.append(point)
        offset = rng.randrange(0, RECORD + (1 << 20))
        await _kill_mid_record(lake, branch, offset)
        try:
            addr = await asyncio.wait_for(lake.endpoints.ensure_ready(branch), WAKE)
        except Exception as e:
            raise AssertionError(f"point {point} (kill {offset} bytes into the record): {e}") from e
        conn = await connect(addr)
        try:
            got = await conn.fetchval("SELECT coalesce(array_agg(n ORDER BY n), '{}') FROM acked")
        finally:
            await conn.close()
        assert list(got) == acked, f"point {point}: acknowledged rows lost"
