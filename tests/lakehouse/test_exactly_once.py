"""Exactly once, tested by killing: the syncer is SIGKILLed at random points while a writer commits
a stream of inserts, updates and deletes; afterwards the Delta history equals the list of changes
the writer made, row by row — no gap, no duplicate."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from tests.lakehouse.conftest import Worker, connect, history, make_spec, wait_for, wait_lsn
from tests.storage.conftest import Lake

KILLS = 20


class Writer:
    """Small random transactions on one table; ``expected`` is the history they must produce."""

    def __init__(self, conn: asyncpg.Connection, table: str, seed: int) -> None:
        self.conn = conn
        self.table = table
        self.rng = random.Random(seed)
        self.live: dict[int, str] = {}
        self.next_id = 1
        self.expected: list[tuple[str, int, str]] = []

    async def transaction(self) -> None:
        out: list[tuple[str, int, str]] = []
        async with self.conn.transaction():
            for _ in range(self.rng.randint(1, 4)):
                op = self.rng.random()
                if op < 0.5 or not self.live:
                    i, v = self.next_id, f"v{self.next_id}"
                    self.next_id += 1
                    await self.conn.execute(f"INSERT INTO {self.table} VALUES ($1, $2)", i, v)
                    self.live[i] = v
                    out.append(("insert", i, v))
                elif op < 0.8:
                    i = self.rng.choice(sorted(self.live))
                    old, new = self.live[i], self.live[i] + "+"
                    await self.conn.execute(f"UPDATE {self.table} SET v = $2 WHERE id = $1", i, new)
                    self.live[i] = new
                    out += [("update_preimage", i, old), ("update_postimage", i, new)]
                else:
                    i = self.rng.choice(sorted(self.live))
                    await self.conn.execute(f"DELETE FROM {self.table} WHERE id = $1", i)
                    out.append(("delete", i, self.live.pop(i)))
        self.expected += out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.transaction()
            await asyncio.sleep(self.rng.uniform(0, 0.01))


async def test_kill_syncer_at_random_points(lake: Lake) -> None:
    conn = await connect(lake)
    wconn = await connect(lake)
    rng = random.Random(13)
    try:
        await conn.execute("CREATE SCHEMA killed; CREATE TABLE killed.t (id int PRIMARY KEY, v text)")
        spec = make_spec(lake, "killed", flush_interval=0.02)
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming", "first snapshot")
        writer = Writer(wconn, "killed.t", seed=7)
        stop = asyncio.Event()
        writing = asyncio.create_task(writer.run(stop))
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.05, 0.8))
                worker.kill()
                assert not writing.done()
                worker = Worker(spec)
                # Half the kills land before the restarted worker is even streaming again.
                if rng.random() < 0.5:
                    await wait_for(lambda w=worker: w.status().get("state") == "streaming", "restart")
        finally:
            stop.set()
            await writing
        await wait_lsn(worker, conn)
        worker.stop()
        got = [(r["_pg_change_type"], r["id"], r["v"]) for r in history(spec, "t")]
        assert len(writer.expected) > 100
        assert got == writer.expected
    finally:
        await wconn.close()
        await conn.close()
