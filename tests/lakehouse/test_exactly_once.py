"""Exactly once, tested by killing: the syncer is SIGKILLed at random points while a writer commits
a stream of inserts, updates and deletes; afterwards the Delta history equals the list of changes
the writer made, row by row — no gap, no duplicate."""

from __future__ import annotations

import asyncio
import random

from tests.lakehouse.conftest import Worker, Writer, connect, history, kill_while_writing, make_spec, wait_for, wait_lsn
from tests.storage.conftest import Lake

KILLS = 20


async def test_kill_syncer_at_random_points(lake: Lake) -> None:
    conn = await connect(lake)
    wconn = await connect(lake)
    rng = random.Random(13)
    try:
        await conn.execute("CREATE SCHEMA killed; CREATE TABLE killed.t (id int PRIMARY KEY, v text);"
                           "INSERT INTO killed.t SELECT g, 'v' || g FROM generate_series(1, 2000) g")
        spec = make_spec(lake, "killed", flush_interval=0.02)
        # Killed while taking the snapshot (or starting up): the next run takes it again, whole.
        for delay in (0.4, 0.8, 1.2):
            worker = Worker(spec)
            await asyncio.sleep(delay)
            worker.kill()
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming" or worker.proc.poll() is not None,
                       "first snapshot")
        assert worker.proc.poll() is None, worker.log_text()
        writer = Writer(wconn, "killed.t", seed=7)
        writer.next_id = 2001
        writer.live = {i: f"v{i}" for i in range(1, 2001)}
        writer.expected = [("insert", i, f"v{i}") for i in range(1, 2001)]
        worker = await kill_while_writing(worker, spec, writer, KILLS, rng)
        await wait_lsn(worker, conn)
        worker.stop()
        got = [(r["_pg_change_type"], r["id"], r["v"]) for r in history(spec, "t")]
        assert len(writer.expected) > 100
        assert got == writer.expected
    finally:
        await wconn.close()
        await conn.close()
