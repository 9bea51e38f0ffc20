"""Transaction pooling correctness found by running the drivers' own suites through the pooled
string: a COPY FROM STDIN of rows larger than the read-ahead limit (reading the client was paused
by one owner and never resumed), and a client killed mid-COPY (its backend must leave the COPY)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg

from tests.proxy.harness import PASSWORD, Harness


async def apg(harness: Harness, options: str = "pool=transaction") -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                 database="postgres", ssl=False, server_settings={"options": options})


def _dsn(harness: Harness) -> str:
    return (f"host=127.0.0.1 port={harness.proxy.port} dbname=postgres user=app password={PASSWORD} "
            f"sslmode=disable options='pool=transaction'")


async def test_reprepare_after_ddl_parses_afresh(harness: Harness) -> None:
    """psycopg after DDL: DEALLOCATE ALL, then the same texts prepared again; the new Parse must
    not reuse a server statement whose parameter types came from a dropped type."""
    other = await apg(harness)  # keeps the old server statement alive on some backend
    con = await psycopg.AsyncConnection.connect(_dsn(harness), autocommit=True, prepare_threshold=0)
    try:
        for q in ("DROP TABLE IF EXISTS bugddl", "DROP TYPE IF EXISTS bugmood",
                  "CREATE TYPE bugmood AS ENUM ('sad', 'ok')", "CREATE TABLE bugddl (m bugmood)"):
            await con.execute(q)
        sql = "INSERT INTO bugddl (m) VALUES (%s)"
        await con.execute(sql, ("ok",))
        for q in ("DROP TABLE bugddl", "DROP TYPE bugmood",
                  "CREATE TYPE bugmood AS ENUM ('sad', 'ok', 'happy')", "CREATE TABLE bugddl (m bugmood)"):
            await con.execute(q)
        await con.execute(sql, ("happy",))
        assert await (await con.execute("SELECT m::text FROM bugddl")).fetchall() == [("happy",)]
        # asyncpg: ALTER TABLE … TYPE under a cached SELECT: Postgres answers 0A000 (cached plan
        # must not change result type), asyncpg closes its statement and prepares it again.
        await other.execute("DROP TABLE IF EXISTS bugalter; CREATE TABLE bugalter (a int)")
        await other.execute("INSERT INTO bugalter VALUES (1)")
        for _ in range(3):
            assert await other.fetch("SELECT * FROM bugalter WHERE $1::int > 0", 1) == [(1,)]
        await other.execute("ALTER TABLE bugalter ALTER COLUMN a TYPE text")
        for _ in range(3):
            assert await other.fetch("SELECT * FROM bugalter WHERE $1::int > 0", 1) == [("1",)]
    finally:
        await con.execute("DROP TABLE IF EXISTS bugddl")
        await con.execute("DROP TYPE IF EXISTS bugmood")
        await con.close()
        await other.execute("DROP TABLE IF EXISTS bugalter")
        await other.close()


async def test_reported_settings_set_in_a_transaction_survive(harness: Harness) -> None:
    """A SET client_encoding / TimeZone / DateStyle inside a committed transaction stays, as on
    Postgres, in the client's later transactions on other backends."""
    cfg = harness.proxy.pooler.config
    saved = cfg.size
    cfg.size = 3
    busy = [await apg(harness) for _ in range(2)]
    con = await psycopg.AsyncConnection.connect(_dsn(harness), autocommit=False)
    try:
        await con.execute("SET client_encoding TO 'LATIN9'")
        await con.execute("SET TimeZone TO 'Asia/Tokyo'")
        await con.execute("SET DateStyle TO 'SQL, DMY'")
        await con.commit()
        assert con.info.encoding == "iso8859-15"
        for i in range(6):
            # Other clients hold backends in turn, so this one moves between backends.
            async with busy[i % 2].transaction():
                await busy[i % 2].execute("SELECT 1")
            cur = await con.execute("SELECT chr(8364), current_setting('TimeZone'), "
                                    "'2024-03-05 10:00+00'::timestamptz::text")
            euro, tz, ts = await cur.fetchone()
            await con.commit()
            assert (euro, tz) == ("\u20ac", "Asia/Tokyo")
            assert ts == "05/03/2024 19:00:00 JST"
    finally:
        cfg.size = saved
        await con.close()
        for b in busy:
            await b.close()


async def test_large_copy_from_stdin_does_not_stall(harness: Harness) -> None:
    con = await apg(harness)
    try:
        await con.execute("DROP TABLE IF EXISTS bugcopy; CREATE TABLE bugcopy (a text, b text)")
        rows = [("a" * 1_000_000, str(i) * 1_000_000) for i in range(1, 6)]  # 2 MB CopyData each
        res = await asyncio.wait_for(con.copy_records_to_table("bugcopy", records=rows), 120)
        assert res == "COPY 5"

        async def source():
            for i in range(8):
                yield (f"{i}" * 1_500_000 + "\t" + "x" * 1_000_000 + "\n").encode()
        res = await asyncio.wait_for(con.copy_to_table("bugcopy", source=source()), 120)
        assert res == "COPY 8"
        got = await con.fetch("SELECT length(a) + length(b) AS n FROM bugcopy")
        assert sorted(r["n"] for r in got) == [2_000_000] * 5 + [2_500_000] * 8
        # The client goes on in other transactions, on any backend.
        assert await con.fetchval("SELECT count(*) FROM bugcopy") == 13
    finally:
        await con.execute("DROP TABLE IF EXISTS bugcopy")
        await con.close()


async def test_client_killed_mid_copy_ends_its_backend(harness: Harness) -> None:
    watcher = await apg(harness, "endpoint=main")  # session mode: a plain Postgres session
    con = await apg(harness)
    try:
        await con.execute("DROP TABLE IF EXISTS bugkill; CREATE TABLE bugkill (a text)")
        sent = asyncio.Event()

        async def source():
            for _ in range(4):
                yield b"k" * 1_000_000 + b"\n"
            sent.set()
            await asyncio.sleep(3600)  # never finishes: the client is killed mid-COPY
            yield b""

        copy = asyncio.create_task(con.copy_to_table("bugkill", source=source()))
        await asyncio.wait_for(sent.wait(), 60)
        sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%bugkill%' AND pid <> pg_backend_pid()"
        for _ in range(600):
            if await watcher.fetchval(sql) == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the COPY never reached the backend")
        con.terminate()  # the socket closes under the proxy, mid-COPY
        copy.cancel()
        for _ in range(600):  # generous: a loaded machine
            if await watcher.fetchval(sql) == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the killed client's backend is still in its COPY")
        # Its lock is gone: the table can be dropped at once.
        await asyncio.wait_for(watcher.execute("DROP TABLE bugkill"), 30)
    finally:
        if not con.is_closed():
            con.terminate()
        await watcher.close()


def test_codec_error_code_reported_setting_and_retire() -> None:
    from proxy import codec
    from proxy.statements import StatementNames, error_code, reported_setting

    assert error_code(codec.error_response("ERROR", "XX000", "cache lookup failed for type 1")) == b"XX000"
    assert error_code(codec.encode_message(b"E", b"SERROR\x00Mno code\x00\x00")) == b""
    assert reported_setting(codec.parameter_status("TimeZone", "Asia/Tokyo")) == (
        "timezone", b"SELECT pg_catalog.set_config('timezone', 'Asia/Tokyo', false)")
    assert reported_setting(codec.parameter_status("server_version", "15.0")) is None
    assert reported_setting(codec.parameter_status("application_name", "o'k"))[1].endswith(b"'o''k', false)")
    names = StatementNames()
    first = names.get(b"SELECT $1\x00\x00\x00")
    assert names.get(b"SELECT $1\x00\x00\x00") is first
    names.retire(first)
    fresh = names.get(b"SELECT $1\x00\x00\x00")
    assert fresh.name != first.name and fresh.parse.endswith(b"SELECT $1\x00\x00\x00")
    names.retire(first)  # an old one retired again does not drop the fresh one
    assert names.get(b"SELECT $1\x00\x00\x00") is fresh


async def test_reported_settings_through_simple_queries(harness: Harness) -> None:
    """asyncpg's simple queries: BEGIN, SET TimeZone, a plain COMMIT answered in one chunk."""
    cfg = harness.proxy.pooler.config
    saved = cfg.size
    cfg.size = 2
    other = await apg(harness)
    con = await apg(harness)
    try:
        await con.execute("BEGIN")
        await con.execute("SET TimeZone TO 'America/Lima'")
        await con.execute("COMMIT")
        for _ in range(4):
            async with other.transaction():  # holds a backend while con runs: con moves
                await other.execute("SELECT 1")
                assert await con.fetchval("SHOW TimeZone") == "America/Lima"
            assert await con.fetchval("SHOW TimeZone") == "America/Lima"
    finally:
        cfg.size = saved
        await con.close()
        await other.close()
