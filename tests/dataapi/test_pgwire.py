"""The Data API's own pipelined Postgres connection (dataapi/pgwire.py) against a real compute:
bound values round-trip exactly, an error stops the pipeline where it happens and leaves the
connection usable, a failed Parse is not cached, the statement cache stays bounded on the server,
and a connection the server kills or a cancelled exchange never goes back into service."""

from __future__ import annotations

import asyncio

import pytest

from dataapi import pgwire
from tests.conftest import poll_until
from tests.dataapi.conftest import Api

pytestmark = pytest.mark.timeout(240)


async def connect(api: Api) -> pgwire.Connection:
    addr = await api.endpoints.ensure_ready("main")
    return await pgwire.Connection.connect(f"{addr.socket_dir}/.s.PGSQL.{addr.port}", "lakelet_admin",
                                           "postgres", "lakelet-pgwire-test", 10)


async def test_values_round_trip_as_bound_text(api: Api) -> None:
    conn = await connect(api)
    try:
        tricky = ['a,b', 'quote"d', "back\\slash", "NULL", "", None, "{braces}", "ünïcødé ✓", "x' OR '1'='1"]
        row = await conn.fetchrow("SELECT array_length($1::text[], 1) AS n, ($1::text[])[6] IS NULL AS sixth_null, "
                                  "to_json($1::text[])::text AS j, $2::int + 1 AS next, $3::text AS none",
                                  tricky, 41, None)
        assert row is not None
        assert row["n"] == "9" and row["sixth_null"] == "t" and row["next"] == "42" and row["none"] is None
        import json
        assert json.loads(row["j"] or "") == tricky
        rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", 3)
        assert [r["g"] for r in rows] == ["1", "2", "3"]
        assert await conn.fetch("SELECT 1 WHERE false") == []
    finally:
        conn.terminate()


async def test_an_error_stops_the_pipeline_and_the_connection_recovers(api: Api) -> None:
    conn = await connect(api)
    try:
        await conn.execute("CREATE TEMP TABLE seen (n int)")
        conn.defer("BEGIN")
        conn.defer("INSERT INTO seen VALUES (1)")
        conn.defer("SELECT 1 / $1::int", (0,))
        conn.tail("INSERT INTO seen VALUES (2)")
        with pytest.raises(pgwire.PgError) as e:
            await conn.fetchrow("INSERT INTO seen VALUES (3) RETURNING n")
        assert e.value.sqlstate == "22012" and conn.status == "E"
        await conn.execute("ROLLBACK")
        assert conn.status == "I" and not conn.in_transaction
        assert await conn.fetch("SELECT n FROM seen") == []  # nothing after the error ran, the rest rolled back
        # Without BEGIN the statements before Sync are one implicit transaction: all or nothing too.
        conn.defer("INSERT INTO seen VALUES (4)")
        with pytest.raises(pgwire.PgError):
            await conn.fetchrow("SELECT 1 / 0")
        assert conn.status == "I" and await conn.fetch("SELECT n FROM seen") == []
    finally:
        conn.terminate()


async def test_a_failed_parse_is_not_cached_and_the_cache_is_bounded(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await connect(api)
    try:
        for _ in range(2):  # the same broken text fails the same way twice (no "statement does not exist")
            with pytest.raises(pgwire.PgError) as e:
                await conn.fetch("SELEC 1")
            assert e.value.sqlstate == "42601"
        monkeypatch.setattr(pgwire, "STATEMENT_CACHE", 3)
        for n in range(12):
            assert (await conn.fetchval(f"SELECT {n} + $1::int", 1)) == str(n + 1)
        prepared = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert prepared is not None and int(prepared) <= 4  # 3 kept + this one
        assert (await conn.fetchval("SELECT 11 + $1::int", 1)) == "12"  # a kept one is reused
    finally:
        conn.terminate()


async def test_a_cancelled_exchange_retires_the_connection(api: Api) -> None:
    addr = await api.endpoints.ensure_ready("main")
    pool = pgwire.Pool(f"{addr.socket_dir}/.s.PGSQL.{addr.port}", "lakelet_admin", "postgres", size=1,
                       idle_timeout=60, connect_timeout=10, application_name="lakelet-pgwire-test")
    try:
        first: list[pgwire.Connection] = []

        async def slow() -> None:
            async with pool.acquire() as conn:
                first.append(conn)
                await conn.fetch("SELECT pg_sleep(30)")

        task = asyncio.create_task(slow())
        await poll_until(lambda: first, "the slow statement sent", timeout=30, every=0.05)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert first[0].broken  # its answer is still coming: never reused
        async with pool.acquire() as conn:  # the one slot is free again, with a fresh connection
            assert conn is not first[0]
            assert await conn.fetchval("SELECT $1::int * 2", 21) == "42"
    finally:
        pool.close()


async def test_killed_backends_leave_the_pool_and_requests_go_on(api: Api) -> None:
    for _ in range(3):
        status, _, _ = await api.get("books?id=eq.1")
        assert status == 200
    killed = await api.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'lakelet-data-api'")
    assert killed
    statuses = []
    for _ in range(6):
        status, _, body = await api.get("books?id=eq.1")
        statuses.append((status, body if status != 200 else None))
    # A dead connection is noticed when the server closes it; at worst one request meets it (503
    # PGRST001, "retry"), never a 500, and the pool opens fresh ones.
    assert all(s == 200 for s, _ in statuses[1:]), statuses
    assert statuses[0][0] in (200, 503), statuses
    if statuses[0][0] == 503:
        assert statuses[0][1]["code"] == "PGRST001"
