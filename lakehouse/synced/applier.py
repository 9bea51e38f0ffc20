"""One run of a synced table: bring the Postgres table to the source's latest Delta version.

``sync_once`` is the only thing that writes a synced table, whatever the mode: the first run and
every run of a snapshot table load a full copy (``_snapshot``); later runs of triggered and
continuous tables apply the change data feed since the recorded version (``_incremental``), and
fall back to a full copy when the feed cannot say what changed. Each run is one Postgres
transaction that also records the version (see ``target``), so a run killed anywhere is as if it
never started and the next run does it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from lakehouse.synced import changes as ch
from lakehouse.synced import source as src
from lakehouse.synced import target as tgt
from lakehouse.synced.encode import csv_bytes
from lakehouse.synced.spec import Mode, SpecError, SyncedTableSpec
from lakehouse.types import compatible

log = logging.getLogger("lakelet.synced")

_WIDENING = {"smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(), "real": pa.float32(),
             "double precision": pa.float64()}


class SchemaChangeError(RuntimeError):
    """The source's schema changed in a way the synced table cannot follow; names the column."""


@dataclass(frozen=True)
class RunResult:
    kind: str  # "snapshot", "incremental" or "none" (already at the latest version)
    version: int
    commit_time: datetime | None
    rows: int  # rows in the synced table afterwards
    loaded: int = 0  # snapshot: rows copied
    upserted: int = 0
    deleted: int = 0
    null_keys: int = 0  # source rows skipped because a key column was NULL
    fallback: str | None = None  # why a triggered/continuous run had to copy everything


async def sync_once(conn: asyncpg.Connection, spec: SyncedTableSpec, *, full: bool = False) -> RunResult:
    """Bring ``spec``'s table to the latest source version over ``conn`` (as Lakelet's own role)."""
    await tgt.ensure_setup(conn)
    applied = await tgt.read_applied(conn, spec.name)
    dt = await asyncio.to_thread(src.open_table, spec.source)
    latest = await asyncio.to_thread(src.describe, dt)
    types = src.check_schema(latest.schema, spec.primary_key, spec.timeseries_key)
    if applied is None:
        if await tgt.table_exists(conn, spec.schema, spec.table):
            raise tgt.TargetError(f"table {spec.name} already exists and is not a synced table: choose another "
                                  "--target, or drop that table first")
        return await _snapshot(conn, spec, dt, latest, types, None)
    if applied.source != spec.source:
        return await _snapshot(conn, spec, dt, latest, types, f"the table was synced from {applied.source} before")
    if spec.mode is Mode.SNAPSHOT or full:
        if applied.version == latest.version and not full:
            return RunResult("none", applied.version, applied.commit_time, applied.rows, null_keys=applied.null_keys)
        return await _snapshot(conn, spec, dt, latest, types, None)
    if applied.version == latest.version:
        return RunResult("none", applied.version, applied.commit_time, applied.rows, null_keys=applied.null_keys)
    plan = plan_columns(applied.columns, types, spec.primary_key, latest.version)
    reason = await asyncio.to_thread(_feed_unusable, spec.source, applied.version, latest)
    feed = None
    if reason is None:
        try:
            limit = max(src.FEED_MIN_LIMIT, 2 * applied.rows)
            feed = await asyncio.to_thread(src.changes, dt, applied.version + 1, latest.version, limit)
        except src.SourceError as e:
            reason = str(e)
    if feed is None:
        return await _snapshot(conn, spec, dt, latest, types, reason)
    return await _incremental(conn, spec, dt, applied, latest, types, plan, feed)


def _feed_unusable(uri: str, applied: int, latest: src.SourceVersion) -> str | None:
    """Why the change data feed cannot take the table from ``applied`` to ``latest`` (None: it can)."""
    if latest.version < applied:
        return f"the source went back from version {applied} to {latest.version} (re-created or restored)"
    if not latest.cdf:
        return f"the source has no change data feed (set {src.CDF_SETTING} = true on it for incremental syncs)"
    try:
        before = src.open_table(uri, applied)
    except src.SourceError:
        return f"the source's history at version {applied} is gone (log cleaned up)"
    if not src.describe(before).cdf:
        return f"the change data feed was off at version {applied}"
    return None


def plan_columns(current: list[tuple[str, str]], source: dict[str, str], keys: tuple[str, ...],
                 version: int) -> list[str]:
    """SQL (ALTER TABLE clauses) that makes the table's columns follow the source's: new columns are
    added, a widening (int → bigint, real → double) is applied; anything else stops the table."""
    have = dict(current)
    clauses = []
    for name, pg_type in source.items():
        old = have.get(name)
        if old is None:
            clauses.append(f"ADD COLUMN {tgt.quote_ident(name)} {pg_type}")
        elif old != pg_type:
            what = "primary key column" if name in keys else "column"
            if old in _WIDENING and pg_type in _WIDENING and compatible(_WIDENING[old], _WIDENING[pg_type]):
                clauses.append(f"ALTER COLUMN {tgt.quote_ident(name)} TYPE {pg_type}")
                continue
            raise SchemaChangeError(f"{what} {name!r} changed type from {old} to {pg_type} in source version "
                                    f"{version}: the synced table stopped; delete it and create it again")
    for k in keys:
        if k in have and k not in source:
            raise SchemaChangeError(f"primary key column {k!r} is gone from source version {version}: the synced "
                                    "table stopped; delete it and create it again")
    return clauses


async def _chunks(items: src.Prefetch) -> AsyncIterator[bytes]:
    while True:
        chunk = await asyncio.to_thread(items.get)
        if chunk is None:
            return
        assert isinstance(chunk, bytes)
        yield chunk


class _Counter:
    def __init__(self) -> None:
        self.null_keys = 0


def _encoded(batches: Iterator[pa.RecordBatch], keys: tuple[str, ...], pg_types: list[str],
             counter: _Counter) -> Iterator[bytes]:
    for batch in batches:
        table, nulls = ch.drop_null_keys(pa.Table.from_batches([batch]), keys)
        counter.null_keys += nulls
        if table.num_rows:
            yield csv_bytes(table, pg_types)


async def _snapshot(conn: asyncpg.Connection, spec: SyncedTableSpec, dt: DeltaTable, latest: src.SourceVersion,
                    types: dict[str, str], fallback: str | None) -> RunResult:
    columns = list(types)
    counter = _Counter()
    stream = src.Prefetch(_encoded(src.snapshot_batches(dt, columns), spec.primary_key, list(types.values()),
                                   counter))
    try:
        async with conn.transaction():
            await tgt.lock(conn, spec.name)
            applied = await tgt.read_applied(conn, spec.name, for_update=True)
            if applied is None and await tgt.table_exists(conn, spec.schema, spec.table):
                raise tgt.TargetError(f"table {spec.name} already exists and is not a synced table: choose "
                                      "another --target, or drop that table first")
            load = await tgt.create_load_table(conn, spec.schema, spec.table, list(types.items()))
            rows = await tgt.copy_csv(conn, spec.schema, load, columns, _chunks(stream), freeze=True)
            if spec.timeseries_key is not None:
                rows -= await tgt.keep_newest(conn, spec.schema, load, spec.primary_key, spec.timeseries_key)
            await tgt.add_primary_key(conn, spec.schema, load, spec.primary_key, latest.version)
            await tgt.make_read_only(conn, spec.schema, load)
            await tgt.swap_in(conn, spec.schema, spec.table, load)
            await tgt.write_applied(conn, tgt.Applied(
                target=spec.name, source=spec.source, version=latest.version, commit_time=latest.commit_time,
                columns=list(types.items()), primary_key=list(spec.primary_key), rows=rows,
                null_keys=counter.null_keys, kind="snapshot"))
    finally:
        await asyncio.to_thread(stream.close)
    log.info("synced table loaded", extra={"table": spec.name, "branch": spec.branch, "version": latest.version,
                                          "rows": rows, "fallback": fallback})
    return RunResult("snapshot", latest.version, latest.commit_time, rows, loaded=rows,
                     null_keys=counter.null_keys, fallback=fallback)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _net(spec: SyncedTableSpec, dt: DeltaTable, feed: pa.Table, columns: list[str]) -> ch.NetChanges:
    if spec.timeseries_key is None:
        return ch.net_changes(feed, spec.primary_key, columns)
    # Several source rows may share a key: the newest of those left at the latest version wins, so
    # the rows of every key the feed touches are read again from that version.
    keys, nulls = ch.changed_keys(feed, spec.primary_key)
    current = ch.newest_per_key(src.rows_for_keys(dt, keys, columns), spec.primary_key, spec.timeseries_key)
    live = pa.array([True] * current.num_rows, pa.bool_())
    still = current.select(list(spec.primary_key)).append_column("_live", live)
    gone = keys.join(still, list(spec.primary_key), join_type="left outer")
    gone = gone.filter(pc.is_null(gone.column("_live"))).select(list(spec.primary_key))
    return ch.NetChanges(upserts=current, deletes=gone, null_keys=nulls)


async def _incremental(conn: asyncpg.Connection, spec: SyncedTableSpec, dt: DeltaTable, applied: tgt.Applied,
                       latest: src.SourceVersion, types: dict[str, str], plan: list[str],
                       feed: pa.Table) -> RunResult:
    columns = list(types)
    net = await asyncio.to_thread(_net, spec, dt, feed, columns)
    key_types = [types[k] for k in spec.primary_key]
    deletes = await asyncio.to_thread(csv_bytes, net.deletes, key_types) if net.deletes.num_rows else None
    upserts = await asyncio.to_thread(csv_bytes, net.upserts, list(types.values())) if net.upserts.num_rows else None
    async with conn.transaction():
        await tgt.lock(conn, spec.name)
        now = await tgt.read_applied(conn, spec.name, for_update=True)
        if now is None or now.version != applied.version:
            # Another run got there first (it held the lock): start again from what it recorded.
            raise Retry(f"{spec.name} moved from version {applied.version} meanwhile")
        if plan:
            await conn.execute(f"ALTER TABLE {tgt.qualified(spec.schema, spec.table)} {', '.join(plan)}")
        deleted, inserted, updated = await tgt.apply_net(
            conn, spec.schema, spec.table, spec.primary_key, columns,
            _once(deletes) if deletes is not None else None, _once(upserts) if upserts is not None else None)
        have = dict(applied.columns)
        have.update(types)
        rows = applied.rows + inserted - deleted
        await tgt.write_applied(conn, tgt.Applied(
            target=spec.name, source=spec.source, version=latest.version, commit_time=latest.commit_time,
            columns=list(have.items()), primary_key=list(spec.primary_key), rows=rows,
            null_keys=applied.null_keys + net.null_keys, kind="incremental"))
    return RunResult("incremental", latest.version, latest.commit_time, rows, upserted=inserted + updated,
                     deleted=deleted, null_keys=applied.null_keys + net.null_keys)


class Retry(RuntimeError):
    """The table moved while this run prepared; running again starts from the new version."""


__all__ = ["RunResult", "Retry", "SchemaChangeError", "SpecError", "sync_once"]
