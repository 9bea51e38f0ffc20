"""The Postgres side: the synced table, its hidden load table, and ``lakelet_synced.applied``.

``lakelet_synced.applied`` holds one row per synced table of the database: the Delta version the
table equals, and the columns it has. Every change to a synced table commits in the same
transaction as its row here, so the version recorded is always the version the table holds — a
crash at any point leaves both as they were before, or both as after, never one of them.
Every writer first takes a transaction-level advisory lock on the table's name: one applier at a
time, and a second one waits for a first that died until Postgres has rolled it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from lakehouse.synced.encode import qualified, quote_ident

STATE_SCHEMA = "lakelet_synced"
STATE_TABLE = f"{STATE_SCHEMA}.applied"
OWNER_ROLE = "lakelet_admin"  # storage.ADMIN_ROLE; only it may write a synced table

_SETUP = f"""
CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA};
REVOKE ALL ON SCHEMA {STATE_SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
    target      text PRIMARY KEY,
    source      text NOT NULL,
    version     bigint NOT NULL,
    commit_time timestamptz,
    columns     jsonb NOT NULL,
    primary_key text[] NOT NULL,
    rows        bigint NOT NULL,
    null_keys   bigint NOT NULL DEFAULT 0,
    kind        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {STATE_SCHEMA}.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF session_user <> '{OWNER_ROLE}' THEN
        RAISE EXCEPTION 'synced table %.% is read-only', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '42501',
                  HINT = 'it is kept equal to its Delta source: change the source, or run '
                         '`lakelet synced-table delete` to stop syncing and take the table over';
    END IF;
    RETURN NULL;
END $$;
"""


class TargetError(RuntimeError):
    """The Postgres side refuses the synced table; the message names the table and the remedy."""


@dataclass(frozen=True)
class Applied:
    """A synced table's row in ``lakelet_synced.applied``."""

    target: str
    source: str
    version: int
    commit_time: datetime | None
    columns: list[tuple[str, str]]  # (name, Postgres type) in table order
    primary_key: list[str]
    rows: int
    null_keys: int
    kind: str


async def ensure_setup(conn: asyncpg.Connection) -> None:
    if await conn.fetchval(f"SELECT to_regclass('{STATE_TABLE}') IS NOT NULL"):
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lakelet_synced setup'))")
        if not await conn.fetchval(f"SELECT to_regclass('{STATE_TABLE}') IS NOT NULL"):
            await conn.execute(_SETUP)


async def lock(conn: asyncpg.Connection, target: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lakelet_synced:' || $1))", target)


async def read_applied(conn: asyncpg.Connection, target: str, *, for_update: bool = False) -> Applied | None:
    row = await conn.fetchrow(
        f"SELECT * FROM {STATE_TABLE} WHERE target = $1" + (" FOR UPDATE" if for_update else ""), target)
    if row is None:
        return None
    return Applied(target=row["target"], source=row["source"], version=row["version"],
                   commit_time=row["commit_time"], columns=[tuple(c) for c in json.loads(row["columns"])],
                   primary_key=list(row["primary_key"]), rows=row["rows"], null_keys=row["null_keys"],
                   kind=row["kind"])


async def write_applied(conn: asyncpg.Connection, a: Applied) -> None:
    await conn.execute(
        f"""INSERT INTO {STATE_TABLE} AS s (target, source, version, commit_time, columns, primary_key, rows,
                                            null_keys, kind, applied_at)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, now())
            ON CONFLICT (target) DO UPDATE SET source = EXCLUDED.source, version = EXCLUDED.version,
                commit_time = EXCLUDED.commit_time, columns = EXCLUDED.columns,
                primary_key = EXCLUDED.primary_key, rows = EXCLUDED.rows, null_keys = EXCLUDED.null_keys,
                kind = EXCLUDED.kind, applied_at = now()""",
        a.target, a.source, a.version, a.commit_time, json.dumps(a.columns), a.primary_key, a.rows,
        a.null_keys, a.kind)


async def table_exists(conn: asyncpg.Connection, schema: str, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified(schema, table)))


def load_name(schema: str, table: str) -> str:
    """The hidden table a snapshot loads into (short: the target name may use all 63 bytes)."""
    return "_lakelet_load_" + hashlib.sha1(f"{schema}.{table}".encode()).hexdigest()[:16]


def _copied(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1]) if status.startswith("COPY") else 0


async def copy_csv(conn: asyncpg.Connection, schema: str | None, table: str, columns: Sequence[str],
                   chunks: AsyncIterator[bytes], *, freeze: bool = False) -> int:
    """COPY CSV chunks in. ``freeze`` (for a table created in this transaction) writes the rows
    already frozen, sparing the first reader and vacuum a pass that would set hint bits."""
    status = await conn.copy_to_table(table, source=chunks, schema_name=schema, columns=list(columns), format="csv",
                                      freeze=freeze)
    return _copied(status)


async def create_load_table(conn: asyncpg.Connection, schema: str, table: str,
                            columns: Sequence[tuple[str, str]]) -> str:
    load = load_name(schema, table)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    await conn.execute(f"DROP TABLE IF EXISTS {qualified(schema, load)}")
    cols = ", ".join(f"{quote_ident(n)} {t}" for n, t in columns)
    await conn.execute(f"CREATE TABLE {qualified(schema, load)} ({cols})")
    return load


async def keep_newest(conn: asyncpg.Connection, schema: str, table: str, keys: Sequence[str], ts: str) -> int:
    """Delete every row but the one with the greatest ``ts`` per key (ties: an arbitrary one)."""
    part = ", ".join(quote_ident(k) for k in keys)
    status = await conn.execute(
        f"""DELETE FROM {qualified(schema, table)} WHERE ctid IN (
              SELECT ctid FROM (SELECT ctid, row_number() OVER (PARTITION BY {part}
                                ORDER BY {quote_ident(ts)} DESC NULLS LAST) AS n
                                FROM {qualified(schema, table)}) ranked WHERE n > 1)""")
    return int(status.rsplit(" ", 1)[-1])


async def add_primary_key(conn: asyncpg.Connection, schema: str, table: str, keys: Sequence[str],
                          version: int) -> None:
    from lakehouse.synced.changes import DuplicateKey

    cols = ", ".join(quote_ident(k) for k in keys)
    try:
        async with conn.transaction():  # a savepoint: the error is ours to word
            await conn.execute(f"ALTER TABLE {qualified(schema, table)} ADD CONSTRAINT "
                               f"{quote_ident(table + '_pkey')} PRIMARY KEY ({cols})")
    except asyncpg.UniqueViolationError as e:
        detail = (e.detail or "").removeprefix("Key ").removesuffix(" is duplicated.")
        raise DuplicateKey(f"source version {version} has two rows with key {detail}: make the primary key "
                           "unique in the source, or pass --timeseries-key to keep the newest") from None


async def make_read_only(conn: asyncpg.Connection, schema: str, table: str) -> None:
    """SELECT for everyone, writes for Lakelet's own role only: a role without the privilege gets
    Postgres' permission error; a superuser, who bypasses privileges, gets the trigger's."""
    name = qualified(schema, table)
    await conn.execute(f"REVOKE ALL ON {name} FROM PUBLIC")
    await conn.execute(f"GRANT SELECT ON {name} TO PUBLIC")
    await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO PUBLIC")
    await conn.execute(f"CREATE TRIGGER lakelet_read_only BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE "
                       f"ON {name} FOR EACH STATEMENT EXECUTE FUNCTION {STATE_SCHEMA}.refuse_write()")


async def swap_in(conn: asyncpg.Connection, schema: str, table: str, load: str) -> None:
    """Replace the synced table by the loaded one. Inside the caller's transaction: readers keep
    the old table until it commits, then see the new one; none sees a half-loaded table."""
    await conn.execute(f"DROP TABLE IF EXISTS {qualified(schema, table)}")
    await conn.execute(f"ALTER TABLE {qualified(schema, load)} RENAME TO {quote_ident(table)}")
    await conn.execute(f"ALTER INDEX {qualified(schema, load + '_pkey')} RENAME TO {quote_ident(table + '_pkey')}")


async def release(conn: asyncpg.Connection, schema: str, table: str, *, drop: bool) -> None:
    """Stop treating the table as synced: drop it, or hand it to the database's owner writable."""
    async with conn.transaction():
        await lock(conn, f"{schema}.{table}")
        await conn.execute(f"DELETE FROM {STATE_TABLE} WHERE target = $1", f"{schema}.{table}")
        if not await table_exists(conn, schema, table):
            return
        name = qualified(schema, table)
        if drop:
            await conn.execute(f"DROP TABLE {name}")
            return
        await conn.execute(f"DROP TRIGGER IF EXISTS lakelet_read_only ON {name}")
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
        await conn.execute(f"ALTER TABLE {name} OWNER TO {quote_ident(owner)}")


async def apply_net(conn: asyncpg.Connection, schema: str, table: str, keys: Sequence[str],
                    columns: Sequence[str], deletes: AsyncIterator[bytes] | None,
                    upserts: AsyncIterator[bytes] | None) -> tuple[int, int, int]:
    """Deletes then upserts through COPY into temporary tables; returns (deleted, inserted, updated)."""
    name = qualified(schema, table)
    match = " AND ".join(f"t.{quote_ident(k)} = d.{quote_ident(k)}" for k in keys)
    deleted = inserted = updated = 0
    if deletes is not None:
        keylist = ", ".join(quote_ident(k) for k in keys)
        await conn.execute(
            f"CREATE TEMP TABLE _lakelet_del ON COMMIT DROP AS SELECT {keylist} FROM {name} WITH NO DATA")
        await copy_csv(conn, None, "_lakelet_del", keys, deletes)
        status = await conn.execute(f"DELETE FROM {name} t USING _lakelet_del d WHERE {match}")
        deleted = int(status.rsplit(" ", 1)[-1])
    if upserts is not None:
        cols = ", ".join(quote_ident(c) for c in columns)
        await conn.execute(f"CREATE TEMP TABLE _lakelet_up ON COMMIT DROP AS SELECT {cols} FROM {name} WITH NO DATA")
        copied = await copy_csv(conn, None, "_lakelet_up", columns, upserts)
        others = [c for c in columns if c not in keys]
        on_conflict = ("DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
                       if others else "DO NOTHING")
        conflict = ", ".join(quote_ident(k) for k in keys)
        inserted = await conn.fetchval(
            f"""WITH written AS (INSERT INTO {name} ({cols}) SELECT {cols} FROM _lakelet_up
                                 ON CONFLICT ({conflict}) {on_conflict} RETURNING (xmax = 0) AS fresh)
                SELECT count(*) FILTER (WHERE fresh) FROM written""")
        updated = copied - inserted
    return deleted, inserted, updated
