"""Shared by the synced-table tests: a real compute, real Delta tables, and the comparison that
every test ends with — the Postgres table equals the Delta table at the version it records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from compute import ComputeAddress
from lakehouse.synced import target
from lakehouse.synced.spec import SyncedTableSpec
from storage import ADMIN_ROLE

CDF = {"delta.enableChangeDataFeed": "true"}


async def admin(addr: ComputeAddress, database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN_ROLE, database=database)


def write(uri: Path | str, table: pa.Table, mode: str = "append", **kw: Any) -> int:
    fresh = not Path(uri, "_delta_log").exists()
    kw.setdefault("configuration", CDF if fresh else None)
    write_deltalake(str(uri), table, mode=mode, **kw)
    return DeltaTable(str(uri)).version()


def _normal(value: Any) -> Any:
    """Delta's Python values as the synced table's: a map (a list of pairs) is a JSON object."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return dict(value)
    return value


def delta_rows(uri: Path | str, version: int, columns: list[str], keys: tuple[str, ...],
               timeseries_key: str | None = None) -> list[tuple]:
    """The rows a synced table of this Delta version must hold, in key order: with a timeseries
    key, the row with the greatest value per key (NULL lowest; equal values must be equal rows)."""
    table = DeltaTable(str(uri), version=version).to_pyarrow_table(columns=columns)
    rows = [tuple(_normal(r[c]) for c in columns) for r in table.to_pylist()]
    positions = [columns.index(k) for k in keys]
    if timeseries_key is not None:
        ts = columns.index(timeseries_key)
        newest: dict[tuple, tuple] = {}
        for row in rows:
            key = tuple(row[p] for p in positions)
            best = newest.get(key)
            if best is None or (row[ts] is not None and (best[ts] is None or row[ts] > best[ts])):
                newest[key] = row
            elif row[ts] == best[ts]:
                assert row == best, f"key {key}: two different rows with the same {timeseries_key}"
        rows = list(newest.values())
    return sorted(rows, key=lambda r: tuple(r[p] for p in positions))


async def pg_rows(conn: asyncpg.Connection, spec: SyncedTableSpec, columns: list[str]) -> list[tuple]:
    cols = ", ".join(target.quote_ident(c) for c in columns)
    order = ", ".join(target.quote_ident(k) for k in spec.primary_key)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        records = await conn.fetch(f"SELECT {cols} FROM {target.qualified(spec.schema, spec.table)} ORDER BY {order}")
    finally:
        await conn.reset_type_codec("jsonb", schema="pg_catalog")
    return [tuple(r) for r in records]


async def assert_equal_at_recorded_version(conn: asyncpg.Connection, spec: SyncedTableSpec,
                                           columns: list[str]) -> int:
    """The Postgres table equals the Delta table at the version recorded beside it; returns it."""
    applied = await target.read_applied(conn, spec.name)
    assert applied is not None, f"{spec.name} has no recorded version"
    expected = delta_rows(spec.source, applied.version, columns, spec.primary_key, spec.timeseries_key)
    got = await pg_rows(conn, spec, columns)
    assert got == expected, f"{spec.name} differs from version {applied.version}"
    assert applied.rows == len(got)
    return applied.version
