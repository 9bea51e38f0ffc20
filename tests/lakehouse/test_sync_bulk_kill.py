"""Exactly once through the bulk insert path: transactions of many inserts into one table (decoded
column by column, ``pgoutput.InsertRun``), some with an update or a delete in the middle of the
run, NULLs and multi-byte text, while the syncer is SIGKILLed at random points; afterwards the
Delta history equals the writer's change list row by row, with each change at its own WAL position."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from lakehouse.pgoutput import BULK_MIN
from tests.lakehouse.conftest import Worker, connect, history, kill_while_writing, make_spec, wait_for, wait_lsn
from tests.storage.conftest import Lake

KILLS = 8


class BulkWriter:
    """Transactions of BULK_MIN..300 inserts (one statement), sometimes split by an UPDATE or a DELETE
    of an earlier row, and small ones between; ``expected`` is the history they must produce."""

    def __init__(self, conn: asyncpg.Connection, seed: int) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.next_id = 1
        self.live: dict[int, str | None] = {}
        self.expected: list[tuple[str, int, str | None]] = []
        self.transactions = 0

    def _value(self, i: int) -> str | None:
        return None if i % 7 == 0 else f"ü{i}€" * (i % 3 + 1)

    async def _insert(self, n: int, out: list[tuple[str, int, str | None]]) -> None:
        first = self.next_id
        self.next_id += n
        await self.conn.execute(
            "INSERT INTO bulk.t SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE repeat('ü' || g || '€', g % 3 + 1) END "
            "FROM generate_series($1::int, $2::int) g", first, first + n - 1)
        for i in range(first, first + n):
            self.live[i] = self._value(i)
            out.append(("insert", i, self.live[i]))

    async def transaction(self) -> None:
        out: list[tuple[str, int, str | None]] = []
        async with self.conn.transaction():
            await self._insert(self.rng.randint(BULK_MIN, 300) if self.rng.random() < 0.7 else 2, out)
            if self.live and self.rng.random() < 0.4:
                i = self.rng.choice(sorted(self.live))
                if self.rng.random() < 0.5:
                    new = f"{self.live[i]}+"
                    await self.conn.execute("UPDATE bulk.t SET v = $2 WHERE id = $1", i, new)
                    out += [("update_preimage", i, self.live[i]), ("update_postimage", i, new)]
                    self.live[i] = new
                else:
                    await self.conn.execute("DELETE FROM bulk.t WHERE id = $1", i)
                    out.append(("delete", i, self.live.pop(i)))
                await self._insert(self.rng.randint(BULK_MIN, 100), out)
        self.expected += out
        self.transactions += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.transaction()
            await asyncio.sleep(self.rng.uniform(0, 0.02))


async def test_kill_syncer_during_bulk_inserts(lake: Lake) -> None:
    conn = await connect(lake)
    wconn = await connect(lake)
    rng = random.Random(31)
    try:
        await conn.execute("CREATE SCHEMA bulk; CREATE TABLE bulk.t (id int PRIMARY KEY, v text)")
        spec = make_spec(lake, "bulk", flush_interval=0.02)
        worker = Worker(spec)
        await wait_for(lambda: worker.status().get("state") == "streaming" or worker.proc.poll() is not None,
                       "first snapshot")
        assert worker.proc.poll() is None, worker.log_text()
        writer = BulkWriter(wconn, seed=5)
        worker = await kill_while_writing(worker, spec, writer, KILLS, rng)
        await wait_lsn(worker, conn)
        worker.stop()
        rows = history(spec, "t")
        got = [(r["_pg_change_type"], r["id"], r["v"]) for r in rows]
        assert writer.transactions > 10 and len(writer.expected) > 20 * BULK_MIN
        assert got == writer.expected
        # Every change has its own WAL position, in change order within each transaction.
        by_tx: dict[int, list[int]] = {}
        for r in rows:
            by_tx.setdefault(r["_pg_xid"], []).append(r["_pg_lsn"])
        assert all(lsns == sorted(lsns) for lsns in by_tx.values())
        inserts = [r["_pg_lsn"] for r in rows if r["_pg_change_type"] == "insert"]
        assert len(set(inserts)) == len(inserts)
    finally:
        await wconn.close()
        await conn.close()
