"""Lakehouse sync end to end: real Postgres (a Lakelet compute), a syncer child process, Delta
history read back with deltalake and compared row by row."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder

from tests.lakehouse.conftest import Worker, connect, history, make_spec, wait_for, wait_lsn
from tests.storage.conftest import Lake

# The SCD2 "current rows" query from README.md (Lakehouse sync), verbatim.
CURRENT_ROWS = """
WITH h AS (
  SELECT * FROM lb_orders_history
  WHERE _sort_by > (SELECT coalesce(max(_sort_by), '') FROM lb_orders_history
                    WHERE _pg_change_type = 'truncate')
), latest AS (
  SELECT *, row_number() OVER (PARTITION BY id ORDER BY _sort_by DESC) AS rn FROM h
)
SELECT * FROM latest WHERE rn = 1 AND _pg_change_type IN ('insert', 'update_postimage')
"""


def _rows(spec, table: str, *cols: str) -> list[tuple]:
    return [(r["_pg_change_type"], *(r[c] for c in cols)) for r in history(spec, table)]


async def test_snapshot_then_every_change_kind(lake: Lake) -> None:
    conn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA kinds; CREATE TABLE kinds.t (id int PRIMARY KEY, v text, big text);"
                           "INSERT INTO kinds.t VALUES (1, 'one', NULL), (2, 'two', NULL)")
        spec = make_spec(lake, "kinds")
        worker = Worker(spec)
        try:
            await wait_for(lambda: worker.status().get("state") == "streaming", "streaming")
            big = "".join(f"{i:06d}" for i in range(20000))  # 120 kB: TOASTed out of line
            await conn.execute("INSERT INTO kinds.t VALUES (3, 'three', $1)", big)
            await conn.execute("UPDATE kinds.t SET v = 'THREE' WHERE id = 3")  # big unchanged: TOAST 'u'
            await conn.execute("UPDATE kinds.t SET v = 'uno' WHERE id = 1")
            await conn.execute("DELETE FROM kinds.t WHERE id = 2")
            await conn.execute("TRUNCATE kinds.t")
            await conn.execute("INSERT INTO kinds.t VALUES (4, 'four', NULL)")
            await wait_lsn(worker, conn)
            got = _rows(spec, "t", "id", "v", "big")
            assert got == [
                ("insert", 1, "one", None), ("insert", 2, "two", None),
                ("insert", 3, "three", big),
                ("update_preimage", 3, "three", big), ("update_postimage", 3, "THREE", big),
                ("update_preimage", 1, "one", None), ("update_postimage", 1, "uno", None),
                ("delete", 2, "two", None),
                ("truncate", None, None, None),
                ("insert", 4, "four", None),
            ]
            rows = history(spec, "t")
            assert rows[0]["_pg_xid"] is None and rows[2]["_pg_xid"] is not None
            assert rows[2]["_pg_lsn"] > rows[0]["_pg_lsn"]
            assert rows[3]["_pg_xid"] == rows[4]["_pg_xid"]
            status = worker.status()
            assert status["tables"]["t"]["state"] == "streaming"
            assert "REPLICA IDENTITY set to FULL" in status["tables"]["t"]["note"]

            # The README's "current rows" query, run by another Delta reader (DataFusion), gives the
            # table as it is now — also across a key change.
            await conn.execute("INSERT INTO kinds.t VALUES (5, 'five', NULL), (6, 'six', NULL)")
            await conn.execute("UPDATE kinds.t SET id = 7 WHERE id = 5")
            await conn.execute("UPDATE kinds.t SET v = 'SIX' WHERE id = 6")
            await conn.execute("DELETE FROM kinds.t WHERE id = 4")
            await wait_lsn(worker, conn)
            reader = QueryBuilder().register("lb_t_history", DeltaTable(f"{spec.base_uri}/lb_t_history"))
            current = pa.table(reader.execute(CURRENT_ROWS.replace("lb_orders_history", "lb_t_history")).read_all())
            assert sorted((r["id"], r["v"]) for r in current.to_pylist()) == \
                [(r["id"], r["v"]) for r in await conn.fetch("SELECT id, v FROM kinds.t ORDER BY id")]
        finally:
            worker.stop()
    finally:
        await conn.close()


async def test_mapped_types_round_trip(lake: Lake) -> None:
    conn = await connect(lake)
    try:
        await conn.execute("""
            CREATE SCHEMA typed;
            CREATE TABLE typed.t (id int PRIMARY KEY, b bool, s smallint, i bigint, r real, d double precision,
              n numeric(10,2), nu numeric, tx text, vc varchar(5), by bytea, dt date, ts timestamp,
              tz timestamptz, ia int[], ta text[], j jsonb, u uuid, iv interval);
            INSERT INTO typed.t VALUES (1, true, -3, 9000000000, 1.5, 'NaN', 12.34, 1e40, 'x', 'ab', '\\x00ff',
              '2024-02-29', '2024-01-02 03:04:05.678901', '2024-01-02 03:04:05+02', '{1,NULL,3}',
              '{"a b","c\\"d",NULL}', '{"k": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 day 02:00:00');
        """)
        spec = make_spec(lake, "typed")
        worker = Worker(spec)
        try:
            await wait_for(lambda: worker.status().get("state") == "streaming", "streaming")
            await conn.execute("INSERT INTO typed.t SELECT 2, b, s, i, r, d, n, nu, tx, vc, by, dt, ts, tz, ia, ta, "
                               "j, u, iv FROM typed.t WHERE id = 1")
            await conn.execute("INSERT INTO typed.t (id) VALUES (3)")
            await wait_lsn(worker, conn)
            rows = history(spec, "t")
            assert len(rows) == 3
            snap, streamed, nulls = rows
            for row in (snap, streamed):
                assert row["b"] is True and row["s"] == -3 and row["i"] == 9000000000 and row["r"] == 1.5
                assert row["d"] != row["d"]  # NaN
                assert row["n"] == Decimal("12.34") and row["nu"] == "1" + "0" * 40
                assert row["tx"] == "x" and row["vc"] == "ab" and row["by"] == b"\x00\xff"
                assert str(row["dt"]) == "2024-02-29"
                assert row["ts"].isoformat() == "2024-01-02T03:04:05.678901"
                assert row["tz"].isoformat() == "2024-01-02T01:04:05+00:00"
                assert row["ia"] == [1, None, 3] and row["ta"] == ["a b", 'c"d', None]
                assert row["j"] == '{"k": [1, 2]}' and row["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
                assert row["iv"] == "1 day 02:00:00"
            assert {k for k, v in nulls.items() if v is not None} == {"id"} | {k for k in nulls if k.startswith("_")}
        finally:
            worker.stop()
    finally:
        await conn.close()


async def test_schema_changes_new_tables_and_refusals(lake: Lake) -> None:
    conn = await connect(lake)
    try:
        await conn.execute("""
            CREATE SCHEMA evolve;
            CREATE TABLE evolve.t (id int PRIMARY KEY, a int);
            CREATE TABLE evolve.other (id int PRIMARY KEY);
            CREATE TABLE evolve.parted (id int, at date) PARTITION BY RANGE (at);
            CREATE TABLE evolve.parted_2024 PARTITION OF evolve.parted FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
            INSERT INTO evolve.parted VALUES (1, '2024-05-01');
            INSERT INTO evolve.t VALUES (1, 10);
        """)
        spec = make_spec(lake, "evolve")
        worker = Worker(spec)
        try:
            await wait_for(lambda: worker.status().get("state") == "streaming", "streaming")
            status = worker.status()["tables"]
            assert status["parted"]["state"] == "error" and "partitioned" in status["parted"]["error"]
            await conn.execute("INSERT INTO evolve.parted VALUES (2, '2024-06-01')")
            await conn.execute("ALTER TABLE evolve.t ADD COLUMN b text")
            await conn.execute("INSERT INTO evolve.t VALUES (2, 20, 'x')")
            await conn.execute("ALTER TABLE evolve.t DROP COLUMN a")
            await conn.execute("INSERT INTO evolve.t VALUES (3, 'y')")
            # A table created after enabling: picked up, and REPLICA IDENTITY FULL from its first change.
            await conn.execute("CREATE TABLE evolve.later (id int PRIMARY KEY, v text);"
                               "INSERT INTO evolve.later VALUES (1, 'new')")
            await conn.execute("UPDATE evolve.later SET id = 2 WHERE id = 1")
            await conn.execute("UPDATE evolve.later SET v = 'newer'")
            await wait_lsn(worker, conn)
            assert _rows(spec, "t", "id", "a", "b") == [
                ("insert", 1, 10, None), ("insert", 2, 20, "x"), ("insert", 3, None, "y")]
            assert _rows(spec, "later", "id", "v") == [
                ("insert", 1, "new"), ("update_preimage", 1, "new"), ("update_postimage", 2, "new"),
                ("update_preimage", 2, "new"), ("update_postimage", 2, "newer")]

            # A type change stops that table with a reason; the others keep flowing.
            await conn.execute("ALTER TABLE evolve.t ALTER COLUMN b TYPE int USING length(b)")
            await conn.execute("INSERT INTO evolve.t VALUES (4, 4)")
            await conn.execute("INSERT INTO evolve.other VALUES (1)")
            await wait_lsn(worker, conn)
            status = worker.status()["tables"]
            assert status["t"]["state"] == "error"
            assert "column 'b' changed type" in status["t"]["error"] and "re-enable" in status["t"]["error"]
            assert _rows(spec, "other", "id") == [("insert", 1)]
            assert _rows(spec, "parted_2024", "id") == [("insert", 1), ("insert", 2)]  # snapshot, then streamed
            assert len(history(spec, "t")) == 3
        finally:
            worker.stop()
    finally:
        await conn.close()


async def test_one_transaction_of_100k_rows(lake: Lake) -> None:
    conn = await connect(lake)
    try:
        await conn.execute("CREATE SCHEMA bulk; CREATE TABLE bulk.t (id int PRIMARY KEY, v text)")
        spec = make_spec(lake, "bulk")
        worker = Worker(spec)
        try:
            await wait_for(lambda: worker.status().get("state") == "streaming", "streaming")
            await conn.execute("INSERT INTO bulk.t SELECT g, 'row ' || g FROM generate_series(1, 100000) g")
            await wait_lsn(worker, conn, timeout=180)
            rows = history(spec, "t")
            assert [r["id"] for r in rows] == list(range(1, 100001))
            assert all(r["v"] == f"row {r['id']}" and r["_pg_change_type"] == "insert" for r in rows)
            assert len({r["_pg_xid"] for r in rows}) == 1
            from deltalake import DeltaTable

            # One transaction is never split: it lands as one Delta commit.
            dt = DeltaTable(f"{spec.base_uri}/lb_t_history")
            assert [h["operation"] for h in dt.history()].count("WRITE") == 2  # the (empty) snapshot + this
        finally:
            worker.stop()
    finally:
        await conn.close()
