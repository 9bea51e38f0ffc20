"""Transaction pooling with protocol-level prepared statements (issue #16): asyncpg and psycopg
with their statement caches (psycopg's pipeline mode too), the same statement name with different
texts in two clients, Close / DEALLOCATE / DISCARD ALL, the per-backend LRU, descriptions as from
Postgres, and pgbench -M prepared."""

from __future__ import annotations

import asyncio
import os
import shutil

import asyncpg
import psycopg
import pytest

from tests.proxy.harness import PASSWORD, Harness

PGBENCH = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"


def _dsn(harness: Harness, options: str = "pool=transaction") -> str:
    return (f"host=127.0.0.1 port={harness.proxy.port} dbname=postgres user=app password={PASSWORD} "
            f"sslmode=disable options='{options}'")


async def apg(harness: Harness, options: str = "pool=transaction", **kw: object) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                 database="postgres", ssl=False, server_settings={"options": options}, **kw)


async def pg3(harness: Harness, **kw: object) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(_dsn(harness), autocommit=True, **kw)


@pytest.fixture
def pool_config(harness: Harness):
    cfg = harness.proxy.pooler.config
    saved = (cfg.size, cfg.max_prepared)
    yield cfg
    cfg.size, cfg.max_prepared = saved


async def test_same_statement_name_different_texts_on_one_backend(harness: Harness, pool_config) -> None:
    pool_config.size = 1  # every transaction of both clients on the same backend
    a, b = await pg3(harness), await pg3(harness)
    try:
        for i in range(4):
            ra = await (await a.execute("SELECT %s::int + 1000", (i,), prepare=True)).fetchone()
            rb = await (await b.execute("SELECT 'b' || %s::text", (str(i),), prepare=True)).fetchone()
            assert ra == (i + 1000,) and rb == (f"b{i}",)
        # Both clients named their statement _pg3_0; each got its own text.
        names = {c: set(c._prepared._names.values()) for c in (a, b)}  # psycopg's own cache
        assert names[a] == names[b] == {b"_pg3_0"}
        assert await (await a.execute("SELECT count(*) FROM pg_prepared_statements")).fetchone() >= (2,)
    finally:
        await a.close()
        await b.close()


async def test_asyncpg_statement_cache_and_descriptions_match_postgres(harness: Harness, pool_config) -> None:
    pool_config.size = 3
    direct = await apg(harness, "endpoint=main")  # session mode: plain Postgres behind a relay
    clients = [await apg(harness) for _ in range(6)]
    try:
        sql = "SELECT id, pad, $1::numeric(10,2) AS n, $2::timestamptz AS t FROM big WHERE id = $3"
        want = await direct.prepare(sql)
        for c in clients:
            got = await c.prepare(sql)  # Parse, Describe, Flush: the backend stays lent until a Sync
            assert (await got.fetchrow(1, None, 5))["id"] == 5
            assert [p.name for p in got.get_parameters()] == [p.name for p in want.get_parameters()]
            assert [(a.name, a.type.name) for a in got.get_attributes()] == \
                   [(a.name, a.type.name) for a in want.get_attributes()]
        # Many clients, many transactions, statements landing on backends that never saw them.
        async def work(c: asyncpg.Connection, k: int) -> None:
            for i in range(1, 30):
                row = await c.fetchrow(sql, i, None, (i * k) % 1000 + 1)
                assert row["id"] == (i * k) % 1000 + 1
                assert await c.fetchval("SELECT $1::text || $2::text", str(k), str(i)) == f"{k}{i}"
                async with c.transaction():
                    assert await c.fetchval("SELECT $1::int * 2", i) == 2 * i
        await asyncio.gather(*(work(c, k) for k, c in enumerate(clients, 1)))
    finally:
        for c in (direct, *clients):
            await c.close()


async def test_psycopg_prepared_and_pipeline_mode(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    conns = [await pg3(harness, prepare_threshold=0) for _ in range(4)]  # every query prepared
    try:
        async def work(conn: psycopg.AsyncConnection, k: int) -> None:
            for i in range(10):
                async with conn.pipeline():
                    cur1 = await conn.execute("SELECT %s::int + %s::int", (k, i))
                    cur2 = await conn.execute("SELECT %s::text", (f"x{i}",))
                    async with conn.transaction():
                        cur3 = await conn.execute("SELECT count(*) FROM big WHERE id <= %s", (i + 1,))
                assert await cur1.fetchone() == (k + i,)
                assert await cur2.fetchone() == (f"x{i}",)
                assert await cur3.fetchone() == (i + 1,)
                # An error in the pipeline: the rest up to the Sync is skipped, as on Postgres.
                with pytest.raises(psycopg.errors.DivisionByZero):
                    async with conn.pipeline():
                        await conn.execute("SELECT 1 / %s::int", (0,))
                        await conn.execute("SELECT %s::int", (1,))
                assert await (await conn.execute("SELECT %s::int", (7,))).fetchone() == (7,)
        await asyncio.gather(*(work(c, k) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()


async def test_close_deallocate_and_discard_all(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    c = await apg(harness, statement_cache_size=0)
    try:
        stmt = await c.prepare("SELECT 41 + $1::int", name="Mine")
        assert await stmt.fetchval(1) == 42
        await c.execute('DEALLOCATE "Mine"')
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await stmt.fetchval(1)
        stmt = await c.prepare("SELECT 40 + $1::int", name="mine2")
        assert await stmt.fetchval(2) == 42
        await c.execute("DISCARD ALL")
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await stmt.fetchval(1)
        # DISCARD ALL inside a transaction block fails as on Postgres.
        with pytest.raises(asyncpg.ActiveSQLTransactionError):
            async with c.transaction():
                await c.execute("DISCARD ALL")
        # A Parse that fails leaves no statement behind; the name can be parsed again.
        with pytest.raises(asyncpg.UndefinedTableError):
            await c.prepare("SELECT * FROM no_such_table")
        assert await c.fetchval("SELECT 1") == 1
    finally:
        await c.close()
    # psycopg (libpq 17+) closes evicted statements with a protocol Close.
    p = await pg3(harness, prepare_threshold=0)
    try:
        p.prepared_max = 2
        for i in range(6):
            assert await (await p.execute(f"SELECT {i} + %s::int", (1,))).fetchone() == (i + 1,)
        assert await (await p.execute("SELECT 0 + %s::int", (5,))).fetchone() == (5,)
    finally:
        await p.close()


async def test_a_small_lru_per_backend(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    pool_config.max_prepared = 3
    # A fresh pool (another database), so its backend starts with the small LRU.
    conns = [await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                   database="template1", ssl=False,
                                   server_settings={"options": "pool=transaction"}) for _ in range(2)]
    try:
        for rnd in range(3):
            for i in range(8):
                for k, c in enumerate(conns):
                    assert await c.fetchval(f"SELECT {i} * 10 + $1::int", k) == i * 10 + k, (rnd, i, k)
        pool = harness.proxy.pooler.pools[("main", "app", "template1")]
        server = pool.idle[0]
        assert len(server.prepared) <= 3
        count = await conns[0].fetchval("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'lakelet_s%'")
        assert count <= 4  # the three kept plus the one this query prepared
    finally:
        for c in conns:
            await c.close()


async def test_pgbench_prepared_through_the_pooled_string(harness: Harness, pool_config) -> None:
    pool_config.size = 4
    env = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"}
    common = ["-h", "127.0.0.1", "-p", str(harness.proxy.port), "-U", "app"]
    init = await asyncio.create_subprocess_exec(PGBENCH, "-i", "-q", "-s", "1", *common, "postgres", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await init.communicate()
    assert init.returncode == 0, out.decode()
    run = await asyncio.create_subprocess_exec(
        # One thread per client: pgbench prepares with a blocking call, which in a thread shared by
        # several clients would wait for a backend held by a client of that same, blocked thread.
        PGBENCH, "-M", "prepared", "-c", "16", "-j", "16", "-t", "40", "-n", *common, "postgres",
        env={**env, "PGOPTIONS": "pool=transaction"}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await run.communicate()
    text = out.decode()
    assert run.returncode == 0, text
    assert "number of transactions actually processed: 640/640" in text, text
    c = await apg(harness)
    try:
        assert await c.fetchval("SELECT count(*) FROM pgbench_history") == 640
    finally:
        await c.close()


async def test_copy_both_ways(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    c = await apg(harness)
    try:
        await c.execute("CREATE TABLE pool_copy (a int, b text)")
        await c.copy_records_to_table("pool_copy", records=[(i, f"r{i}") for i in range(1000)])
        out = await c.copy_from_query("SELECT * FROM pool_copy WHERE a < 3 ORDER BY a", output=_Sink(),
                                      format="csv")
        assert out == "COPY 3"
        assert await c.fetchval("SELECT count(*) FROM pool_copy") == 1000
        await c.execute("DROP TABLE pool_copy")
    finally:
        await c.close()


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    async def __call__(self, chunk: bytes) -> None:
        self.data += chunk


async def test_cursors_errors_and_notices_inside_transactions(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    a, b = await apg(harness), await apg(harness)
    try:
        async with a.transaction():  # a portal fetched in pieces (PortalSuspended) keeps the backend
            got = [r["id"] async for r in a.cursor("SELECT id FROM big WHERE id <= $1 ORDER BY id", 250,
                                                   prefetch=50)]
        assert got == list(range(1, 251))
        tr = a.transaction()
        await tr.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await a.fetchval("SELECT 1 / $1::int", 0)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):  # still its backend, in a failed transaction
            await a.fetchval("SELECT 1")
        await tr.rollback()
        notices: list[str] = []
        b.add_log_listener(lambda _c, msg: notices.append(msg.message))
        await b.execute("DO $$ BEGIN RAISE NOTICE 'hello from the backend'; END $$")
        assert await b.fetchval("SELECT 2") == 2
        assert notices == ["hello from the backend"]
    finally:
        await a.close()
        await b.close()
