"""One source table's SCD type 2 history in Delta: buffering changes and committing them exactly once.

Every change becomes one row: the source columns (mapped by ``lakehouse.types``), plus

==================  =================================================================================
``_pg_change_type``  ``insert``, ``update_preimage``, ``update_postimage``, ``delete``, ``truncate``
``_pg_lsn``          the WAL position of the change (int64; the consistent point for snapshot rows)
``_pg_xid``          the transaction id (null for snapshot rows)
``_timestamp``       commit time (UTC; the snapshot time for snapshot rows)
``_sort_by``         a total order of changes: commit LSN then position in the transaction, as
                     32 hex digits, so ``ORDER BY _sort_by`` sorts them in any reader
==================  =================================================================================

Exactly once: a flush is one Delta commit per table carrying ``Transaction(app_id, version)`` with
the greatest commit LSN it holds; transactions are never split across flushes. After a restart the
table's recorded version is read back, and any change of a transaction committed at or below it
is dropped (``HistoryTable.seen``), so a redelivered transaction lands once. The syncer is the only
writer of these tables and checks the version before each commit (delta-rs does not enforce it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from lakehouse import types as t
from lakehouse.pgoutput import UNCHANGED, Relation, Value
from lakehouse.values import to_arrow

META_FIELDS = [
    pa.field("_pg_change_type", pa.string()),
    pa.field("_pg_lsn", pa.int64()),
    pa.field("_pg_xid", pa.int64()),
    pa.field("_timestamp", pa.timestamp("us", tz="UTC")),
    pa.field("_sort_by", pa.string()),
]
META_NAMES = {f.name for f in META_FIELDS}


class TableSyncError(Exception):
    """This table cannot go on syncing (a type change, an unsupported value); the others keep going.
    The message names the column and what to do."""


def sort_key(commit_lsn: int, seq: int) -> str:
    return f"{commit_lsn:016X}{seq:016X}"


def history_uri(base: str, table: str) -> str:
    return f"{base.rstrip('/')}/lb_{table}_history"


@dataclass
class _Column:
    type_oid: int
    typmod: int
    arrow: pa.DataType
    values: list[str | None] = field(default_factory=list)


class HistoryTable:
    """Buffered changes of one source table plus its Delta table's committed position."""

    def __init__(self, uri: str, app_id: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.app_id = app_id
        self.storage_options = storage_options
        self.committed: int | None = None  # the app transaction version in the Delta log
        self.delta_fields: dict[str, pa.DataType] = {}
        self.columns: dict[str, _Column] = {}
        self.meta: dict[str, list[Any]] = {f.name: [] for f in META_FIELDS}
        self.rows = 0
        self.max_commit_lsn = 0
        self.first_commit_time: datetime | None = None
        self.error: str | None = None
        self._load()

    def _load(self) -> None:
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            return
        dt = DeltaTable(self.uri, storage_options=self.storage_options)
        self.committed = dt.transaction_version(self.app_id)
        schema = pa.schema(dt.schema().to_arrow())  # type: ignore[arg-type]
        self.delta_fields = {f.name: f.type for f in schema if f.name not in META_NAMES}

    # -- buffering --------------------------------------------------------------------------------

    def seen(self, commit_lsn: int) -> bool:
        """True when the transaction committed at ``commit_lsn`` is already in Delta."""
        return self.committed is not None and commit_lsn <= self.committed

    def _column(self, name: str, type_oid: int, typmod: int) -> _Column:
        arrow = t.arrow_type(type_oid, typmod)
        col = self.columns.get(name)
        known = col.arrow if col is not None else self.delta_fields.get(name)
        if known is not None and known != arrow:
            raise TableSyncError(
                f"column {name!r} changed type (Delta holds {known}, the source now sends {arrow}): Delta "
                f"cannot change a column's type in place; disable and re-enable the sync to rebuild {self.uri}")
        if col is None:
            col = self.columns[name] = _Column(type_oid, typmod, arrow, [None] * self.rows)
        return col

    def add(self, relation: Relation, values: tuple[Value, ...] | None, change_type: str, *, lsn: int,
            xid: int | None, commit_lsn: int, seq: int, commit_time: datetime,
            fill: tuple[Value, ...] | None = None) -> None:
        """Buffer one history row. ``values`` None means a truncate marker (all source columns null);
        an UNCHANGED value is taken from ``fill`` (the old row of the same UPDATE) when it has one."""
        if values is not None:
            for i, c in enumerate(relation.columns):
                col = self._column(c.name, c.type_oid, c.typmod)
                v = values[i]
                if v is UNCHANGED:
                    v = fill[i] if fill is not None and fill[i] is not UNCHANGED else None
                col.values.append(v)  # type: ignore[arg-type]
        for col in self.columns.values():
            if len(col.values) == self.rows:  # not in this relation version (dropped), or a marker
                col.values.append(None)
        self.meta["_pg_change_type"].append(change_type)
        self.meta["_pg_lsn"].append(lsn)
        self.meta["_pg_xid"].append(xid)
        self.meta["_timestamp"].append(commit_time)
        self.meta["_sort_by"].append(sort_key(commit_lsn, seq))
        self.rows += 1
        self.max_commit_lsn = max(self.max_commit_lsn, commit_lsn)
        if self.first_commit_time is None:
            self.first_commit_time = commit_time

    def declare(self, relation: Relation) -> None:
        """Make every column of ``relation`` known (so an empty snapshot still creates them)."""
        for c in relation.columns:
            self._column(c.name, c.type_oid, c.typmod)

    def build(self) -> pa.Table:
        arrays: list[pa.Array] = []
        fields: list[pa.Field] = []
        for name, col in self.columns.items():
            try:
                arrays.append(to_arrow(col.values, col.type_oid, col.typmod))
            except ValueError as e:
                raise TableSyncError(f"column {name!r}: {e}") from None
            fields.append(pa.field(name, col.arrow))
        for name, typ in self.delta_fields.items():  # dropped from the source: nulls from now on
            if name not in self.columns:
                arrays.append(pa.nulls(self.rows, typ))
                fields.append(pa.field(name, typ))
        for f in META_FIELDS:
            arrays.append(pa.array(self.meta[f.name], f.type))
            fields.append(f)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def clear(self) -> None:
        for col in self.columns.values():
            col.values = []
        for values in self.meta.values():
            values.clear()
        self.rows = 0
        self.max_commit_lsn = 0
        self.first_commit_time = None

    # -- committing -------------------------------------------------------------------------------

    def commit(self, version: int, *, overwrite: bool = False) -> int:
        """Write the buffer as one Delta commit tagged ``version``; returns the bytes of data built.

        Refuses to go backwards: a version at or below the recorded one would mean a second writer
        or a replay bug, and writing it would duplicate history."""
        if not overwrite and self.committed is not None and version <= self.committed:
            raise TableSyncError(f"{self.uri} already holds changes through LSN {version:X} "
                                 f"(recorded {self.committed:X}): is another syncer writing it?")
        data = self.build()
        write_deltalake(
            self.uri, data, mode="overwrite" if overwrite else "append",
            schema_mode="overwrite" if overwrite else "merge",
            storage_options=self.storage_options,
            commit_properties=CommitProperties(app_transactions=[Transaction(self.app_id, version)]),
        )
        self.committed = version
        self.delta_fields = {f.name: f.type for f in data.schema if f.name not in META_NAMES}
        nbytes = data.nbytes
        self.clear()
        return nbytes
