"""Synced tables against a real compute and real Delta tables: every kind of Delta change, every
mapped type, keys, schema changes, read-only enforcement and readers during a refresh."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from compute import ComputeAddress, EndpointConfig, Endpoints
from lakehouse.synced import source
from lakehouse.synced.applier import SchemaChangeError, sync_once
from lakehouse.synced.changes import DuplicateKey
from lakehouse.synced.spec import SpecError, SyncedTableSpec
from lakehouse.synced.target import TargetError
from storage import Store
from storage.postgres import PgBinaries, ServiceUser
from tests.conftest import environ
from tests.lakehouse.synced_support import admin, assert_equal_at_recorded_version, pg_rows, write
from tests.s3server import moto_server


@pytest.fixture(scope="module")
async def addr(root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[ComputeAddress]:
    store = Store.open(root / "store", user=service_user, pg=pg)
    store.bootstrap()
    eps = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg,
                    config=EndpointConfig(suspend_timeout=600))
    await eps.start()
    yield await eps.ensure_ready("main")
    await eps.close()
    store.close()


@pytest.fixture
async def conn(addr: ComputeAddress) -> AsyncIterator[asyncpg.Connection]:
    c = await admin(addr)
    yield c
    await c.close()


def spec(uri: Path, target: str, mode: str = "triggered", key: str = "id", ts: str | None = None) -> SyncedTableSpec:
    return SyncedTableSpec.make(source=str(uri), branch="main", target=target, primary_key=key, mode=mode,
                                timeseries_key=ts)


def rows(ids: list[int], tag: str) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array([f"{tag}{i}" for i in ids]),
                     "n": pa.array([i * 10 for i in ids], pa.int32())})


COLS = ["id", "v", "n"]


async def test_every_kind_of_delta_change_lands_exactly(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "items"
    write(uri, rows(list(range(100)), "a"))
    s = spec(uri, "public.items")
    first = await sync_once(conn, s)
    assert (first.kind, first.version, first.rows) == ("snapshot", 0, 100)
    await assert_equal_at_recorded_version(conn, s, COLS)

    table = DeltaTable(str(uri))
    write(uri, rows(list(range(100, 150)), "b"))  # insert
    table.update(updates={"v": "'updated'"}, predicate="id < 10")
    table = DeltaTable(str(uri))
    table.delete("id >= 140")
    table = DeltaTable(str(uri))
    (table.merge(rows([5, 6, 500, 501], "m"), predicate="t.id = s.id", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())
    run = await sync_once(conn, s)  # four versions in one run
    assert (run.kind, run.version) == ("incremental", 4)
    assert await assert_equal_at_recorded_version(conn, s, COLS) == 4

    write(uri, rows([1, 2, 3, 700], "o"), mode="overwrite")  # every old row deleted, new ones in
    run = await sync_once(conn, s)
    assert (run.kind, run.rows, run.deleted) == ("incremental", 4, 139)  # keys 1-3 stay (rewritten)
    await assert_equal_at_recorded_version(conn, s, COLS)

    assert (await sync_once(conn, s)).kind == "none"  # nothing new: nothing done

    # Vacuum removes data files of old versions: an append whose file a later delete rewrote can no
    # longer be read back from the feed, so the run copies everything, and says why.
    write(uri, rows([8, 9], "x"))
    DeltaTable(str(uri)).delete("id = 8")
    DeltaTable(str(uri)).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    run = await sync_once(conn, s)
    assert run.kind == "snapshot" and "unreadable" in (run.fallback or ""), run
    assert run.version == DeltaTable(str(uri)).version()
    await assert_equal_at_recorded_version(conn, s, COLS)
    # Afterwards the feed is used again from the version the snapshot recorded.
    DeltaTable(str(uri)).delete("id = 9")
    assert (await sync_once(conn, s)).kind == "incremental"
    await assert_equal_at_recorded_version(conn, s, COLS)


async def test_history_gone_falls_back_to_snapshot_and_says_why(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "nocdf"
    write(uri, rows([1, 2, 3], "a"), configuration={})
    s = spec(uri, "public.nocdf")
    await sync_once(conn, s)
    DeltaTable(str(uri)).delete("id = 2")
    run = await sync_once(conn, s)
    assert run.kind == "snapshot" and "no change data feed" in (run.fallback or "")
    await assert_equal_at_recorded_version(conn, s, COLS)


async def test_a_change_set_larger_than_the_limit_is_a_full_copy(conn: asyncpg.Connection, workdir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = workdir / "churn"
    write(uri, rows(list(range(10)), "a"))
    s = spec(uri, "public.churn")
    await sync_once(conn, s)
    monkeypatch.setattr(source, "FEED_MIN_LIMIT", 15)  # the limit is max(this, 2 x rows held)
    write(uri, rows(list(range(5)), "b"), mode="overwrite")  # 10 deletes + 5 inserts: within
    assert (await sync_once(conn, s)).kind == "incremental"
    write(uri, rows(list(range(30)), "c"), mode="overwrite")  # 5 deletes + 30 inserts: beyond
    run = await sync_once(conn, s)
    assert run.kind == "snapshot" and "changed more than 15 rows" in (run.fallback or "")
    await assert_equal_at_recorded_version(conn, s, COLS)


async def test_snapshot_mode_copies_each_new_version(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "snap"
    write(uri, rows([1, 2], "a"))
    s = spec(uri, "public.snap", mode="snapshot")
    assert (await sync_once(conn, s)).kind == "snapshot"
    assert (await sync_once(conn, s)).kind == "none"
    DeltaTable(str(uri)).delete("id = 1")
    run = await sync_once(conn, s)
    assert (run.kind, run.rows, run.fallback) == ("snapshot", 1, None)
    await assert_equal_at_recorded_version(conn, s, COLS)


ALL_TYPES = pa.table({
    "id": pa.array([1, 2, 3], pa.int64()),
    "b": pa.array([True, False, None]),
    "i8": pa.array([-128, 127, None], pa.int8()),
    "i16": pa.array([-32768, 32767, None], pa.int16()),
    "i32": pa.array([-2**31, 2**31 - 1, None], pa.int32()),
    "i64": pa.array([-2**63, 2**63 - 1, None], pa.int64()),
    "f32": pa.array([1.5, float("inf"), None], pa.float32()),
    "f64": pa.array([-0.25, 1e300, None], pa.float64()),
    "dec": pa.array([decimal.Decimal("12345.67"), decimal.Decimal("-0.01"), None], pa.decimal128(9, 2)),
    "s": pa.array(["", 'quote " comma , newline \n backslash \\ tab \t', None]),
    "bin": pa.array([b"", b"\x00\xff\\x", None], pa.binary()),
    "d": pa.array([dt.date(1, 1, 1), dt.date(9999, 12, 31), None], pa.date32()),
    "ts": pa.array([dt.datetime(2000, 1, 1, 0, 0, 0, 1), dt.datetime(1970, 1, 1), None], pa.timestamp("us")),
    "tstz": pa.array([dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC), None, None],
                     pa.timestamp("us", tz="UTC")),
    "ints": pa.array([[1, None, 3], [], None], pa.list_(pa.int64())),
    "texts": pa.array([["a", "b,c", 'd"e', None, "NULL", "\\"], [""], None], pa.list_(pa.string())),
    "rec": pa.array([{"x": 1, "y": "z"}, None, {"x": None, "y": 'q"\\'}],
                    pa.struct([("x", pa.int64()), ("y", pa.string())])),
    "map": pa.array([[("a", 1), ("b", None)], None, []], pa.map_(pa.string(), pa.int64())),
    "nested": pa.array([[[1, 2], [3]], None, [[]]], pa.list_(pa.list_(pa.int64()))),
    "bools": pa.array([[True, None, False], None, []], pa.list_(pa.bool_())),
    "floats": pa.array([[1.25, -0.5], None, [None]], pa.list_(pa.float64())),
    "dates": pa.array([[dt.date(2020, 2, 29)], None, [None, dt.date(1, 1, 1)]], pa.list_(pa.date32())),
    "stamps": pa.array([[dt.datetime(2021, 1, 1, 12, tzinfo=dt.UTC)], None, []],
                       pa.list_(pa.timestamp("us", tz="UTC"))),
    "decs": pa.array([[decimal.Decimal("1.50"), None], None, []], pa.list_(pa.decimal128(5, 2))),
    "blobs": pa.array([[b"\x00\\", b""], None, [None]], pa.list_(pa.binary())),
})


async def test_every_mapped_type_round_trips(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "types"
    write(uri, ALL_TYPES)
    s = spec(uri, "public.types")
    await sync_once(conn, s)
    pg_types = dict(await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'public.types'::regclass AND attnum > 0"))
    assert pg_types["dec"] == "numeric(9,2)" and pg_types["ints"] == "bigint[]" and pg_types["rec"] == "jsonb"
    assert pg_types["tstz"] == "timestamp with time zone" and pg_types["ts"] == "timestamp without time zone"
    await assert_equal_at_recorded_version(conn, s, ALL_TYPES.column_names)
    # The incremental path (upserts through a temporary table) encodes the same way.
    table = DeltaTable(str(uri))
    table.update(updates={"i64": "i64 - 1"}, predicate="id = 2")
    assert (await sync_once(conn, s)).kind == "incremental"
    await assert_equal_at_recorded_version(conn, s, ALL_TYPES.column_names)


async def test_null_keys_are_skipped_and_counted(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "nulls"
    write(uri, pa.table({"id": pa.array([1, None, 3], pa.int64()), "v": ["a", "b", "c"]}))
    s = spec(uri, "public.nulls")
    run = await sync_once(conn, s)
    assert (run.rows, run.null_keys) == (2, 1)
    write(uri, pa.table({"id": pa.array([None, 4], pa.int64()), "v": ["d", "e"]}))
    run = await sync_once(conn, s)
    assert (run.rows, run.null_keys) == (3, 2)


async def test_duplicate_keys_are_refused_without_a_timeseries_key(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "dups"
    write(uri, pa.table({"id": pa.array([1, 2, 2], pa.int64()), "v": ["a", "b", "c"]}))
    with pytest.raises(DuplicateKey, match=r"two rows with key \(id\)=\(2\).*--timeseries-key"):
        await sync_once(conn, spec(uri, "public.dups"))
    assert not await conn.fetchval("SELECT to_regclass('public.dups') IS NOT NULL")  # nothing half-made
    # Incrementally: one version inserting a key twice.
    uri2 = workdir / "dups2"
    write(uri2, pa.table({"id": pa.array([1], pa.int64()), "v": ["a"]}))
    s = spec(uri2, "public.dups2")
    await sync_once(conn, s)
    write(uri2, pa.table({"id": pa.array([7, 7], pa.int64()), "v": ["x", "y"]}))
    with pytest.raises(DuplicateKey, match=r"version 1 has two rows with key \(id\)=\(7\)"):
        await sync_once(conn, s)
    assert await conn.fetchval("SELECT version FROM lakelet_synced.applied WHERE target = 'public.dups2'") == 0


async def test_timeseries_key_keeps_the_newest_row_per_key(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "series"

    def t(ids: list[int], ts: list[int], v: list[str]) -> pa.Table:
        return pa.table({"id": pa.array(ids, pa.int64()), "ts": pa.array(ts, pa.int64()), "v": v})

    write(uri, t([1, 1, 2], [5, 9, 1], ["old", "new", "two"]))
    s = spec(uri, "public.series", ts="ts")
    await sync_once(conn, s)
    assert await conn.fetch("SELECT id, v FROM series ORDER BY id") == [(1, "new"), (2, "two")]
    write(uri, t([1, 2], [7, 3], ["older than 9", "newer"]))
    await sync_once(conn, s)
    assert await conn.fetch("SELECT id, v FROM series ORDER BY id") == [(1, "new"), (2, "newer")]
    DeltaTable(str(uri)).delete("ts = 9")  # the newest of key 1 goes: the next newest takes its place
    await sync_once(conn, s)
    assert await conn.fetch("SELECT id, v FROM series ORDER BY id") == [(1, "older than 9"), (2, "newer")]
    DeltaTable(str(uri)).delete("id = 2")
    run = await sync_once(conn, s)
    assert await conn.fetch("SELECT id, v FROM series ORDER BY id") == [(1, "older than 9")]
    assert run.rows == 1


async def test_synced_table_is_read_only_for_everyone_else(conn: asyncpg.Connection, addr: ComputeAddress,
                                                           workdir: Path) -> None:
    uri = workdir / "ro"
    write(uri, rows([1], "a"))
    await sync_once(conn, spec(uri, "public.ro"))
    await conn.execute("CREATE ROLE app LOGIN; CREATE ROLE boss LOGIN SUPERUSER")
    for role, message in (("app", "permission denied for table ro"), ("boss", "synced table public.ro is read-only")):
        other = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=role, database="postgres")
        try:
            assert await other.fetchval("SELECT v FROM ro") == "a1"  # reading is fine
            for sql in ("INSERT INTO ro VALUES (2, 'x', 1)", "UPDATE ro SET v = 'x'", "DELETE FROM ro",
                        "TRUNCATE ro"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match=message):
                    await other.execute(sql)
        finally:
            await other.close()


async def test_names_and_keys_are_checked_before_anything_happens(conn: asyncpg.Connection, workdir: Path) -> None:
    uri = workdir / "checked"
    write(uri, rows([1], "a"))
    for kwargs, message in (
        ({"target": "Public.x"}, "schema 'Public' is not allowed"),
        ({"target": "lakelet_synced.x"}, "reserved"),
        ({"target": "public.x; drop"}, "table 'x; drop' is not allowed"),
        ({"target": "public.x", "mode": "sometimes"}, "mode 'sometimes'"),
        ({"target": "public.x", "primary_key": ""}, "a primary key is needed"),
    ):
        args = {"source": str(uri), "branch": "main", "primary_key": "id", "mode": "triggered", **kwargs}
        with pytest.raises(SpecError, match=message):
            SyncedTableSpec.make(**args)
    with pytest.raises(SpecError, match="primary key column 'nope' is not in the source"):
        await sync_once(conn, spec(uri, "public.checked", key="nope"))
    await conn.execute("CREATE TABLE mine (id int)")
    with pytest.raises(TargetError, match="table public.mine already exists and is not a synced table"):
        await sync_once(conn, spec(uri, "public.mine"))


async def test_additive_schema_change_adds_a_column_and_a_type_change_stops(conn: asyncpg.Connection,
                                                                            workdir: Path) -> None:
    uri = workdir / "evolve"
    write(uri, rows([1, 2], "a"))
    s = spec(uri, "public.evolve")
    await sync_once(conn, s)
    wider = rows([3], "b").append_column("extra", pa.array(["new"]))
    write(uri, wider, schema_mode="merge")
    await sync_once(conn, s)
    await assert_equal_at_recorded_version(conn, s, COLS + ["extra"])
    changed = pa.table({"id": pa.array([4], pa.int64()), "v": ["c"], "n": pa.array(["not a number"]),
                        "extra": ["x"]})
    write(uri, changed, mode="overwrite", schema_mode="overwrite")
    with pytest.raises(SchemaChangeError, match="column 'n' changed type from integer to text"):
        await sync_once(conn, s)


async def test_readers_never_see_a_partial_table_during_a_refresh(conn: asyncpg.Connection, addr: ComputeAddress,
                                                                   workdir: Path) -> None:
    uri = workdir / "big"
    write(uri, rows(list(range(200_000)), "a"))
    s = spec(uri, "public.big", mode="snapshot")
    await sync_once(conn, s)
    write(uri, rows(list(range(200_000, 500_000)), "b"))  # 500k rows after
    reader = await admin(addr)
    seen: set[int] = set()
    done = asyncio.Event()

    async def read() -> None:
        while not done.is_set():
            seen.add(await reader.fetchval("SELECT count(*) FROM big"))

    task = asyncio.create_task(read())
    run = await sync_once(conn, s)
    await asyncio.sleep(0.2)
    done.set()
    await task
    await reader.close()
    assert run.rows == 500_000
    assert seen <= {200_000, 500_000} and 500_000 in seen, seen
    assert await pg_rows(conn, s, ["id"]) == [(i,) for i in range(500_000)]


async def test_an_s3_source_is_read_with_the_standard_aws_settings(conn: asyncpg.Connection) -> None:
    """``s3://`` sources through a real S3 API (moto's server on loopback), found by deltalake from
    the environment like any AWS client (plus ``AWS_ALLOW_HTTP`` for a plain-HTTP endpoint)."""
    with moto_server() as server, environ({**server.env(), "AWS_ALLOW_HTTP": "true"}):
        uri = f"s3://{server.new_bucket()}/lake/items"
        write_deltalake(uri, rows([1, 2, 3], "s"), configuration={"delta.enableChangeDataFeed": "true"})
        s = SyncedTableSpec.make(source=uri, branch="main", target="public.from_s3", primary_key="id",
                                 mode="triggered")
        assert (await sync_once(conn, s)).kind == "snapshot"
        DeltaTable(uri).update(updates={"v": "'changed'"}, predicate="id = 2")
        DeltaTable(uri).delete("id = 3")
        run = await sync_once(conn, s)
        assert (run.kind, run.version, run.rows) == ("incremental", 2, 2)
        await assert_equal_at_recorded_version(conn, s, COLS)
