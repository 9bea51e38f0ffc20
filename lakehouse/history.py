"""One source table's SCD type 2 history in Delta: buffering changes and committing them exactly once.

Every change becomes one row: the source columns (mapped by ``lakehouse.types``), plus

==================  =================================================================================
``_pg_change_type``  ``insert``, ``update_preimage``, ``update_postimage``, ``delete``, ``truncate``
``_pg_lsn``          the WAL position of the change (int64; the consistent point for snapshot rows)
``_pg_xid``          the transaction id (null for snapshot rows)
``_timestamp``       commit time (UTC; the snapshot time for snapshot rows)
``_sort_by``         a total order of changes: commit LSN then position in the transaction, as
                     40 decimal digits, so ``ORDER BY _sort_by`` sorts them in any reader
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
from itertools import chain, repeat

import pyarrow as pa
import pyarrow.compute as pc
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


CHANGE_TYPES = ("insert", "update_preimage", "update_postimage", "delete", "truncate")
CHANGE_CODE = {name: i for i, name in enumerate(CHANGE_TYPES)}
CHANGE_NAMES = pa.array(CHANGE_TYPES, pa.string())


def sort_key(commit_lsn: int, seq: int) -> str:
    """``_sort_by``: the commit LSN, then the change's place in its transaction, each as 20 decimal
    digits, so comparing the strings compares the pairs."""
    return f"{commit_lsn:020d}{seq:020d}"


def _padded(values: pa.Array) -> pa.Array:
    return pc.utf8_lpad(values.cast(pa.string()), width=20, padding="0")


@dataclass
class _Run:
    """Consecutive buffered rows of one transaction."""

    start: int
    xid: int | None
    commit_lsn: int
    commit_time: datetime


def history_uri(base: str, table: str) -> str:
    return f"{base.rstrip('/')}/lb_{table}_history"


@dataclass
class _Column:
    """One column's buffered text values: ``chunks`` (Arrow string arrays, from bulk-decoded
    insert runs) followed by ``values`` (one ``str``/None per row from the scalar path)."""

    type_oid: int
    typmod: int
    arrow: pa.DataType
    values: list[str | None] = field(default_factory=list)
    chunks: list[pa.Array] = field(default_factory=list)

    def append_array(self, array: pa.Array) -> None:
        if self.values:  # keep row order: what the scalar path buffered so far goes first
            self.chunks.append(pa.array(self.values, pa.string()))
            self.values.clear()  # the same list object: the relation plans append to it
        self.chunks.append(array)

    def texts(self) -> list[str | None] | pa.Array:
        if not self.chunks:
            return self.values
        tail = [pa.array(self.values, pa.string())] if self.values else []
        return pa.concat_arrays(self.chunks + tail)


class HistoryTable:
    """Buffered changes of one source table plus its Delta table's committed position."""

    def __init__(self, uri: str, app_id: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.app_id = app_id
        self.storage_options = storage_options
        self.committed: int | None = None  # the app transaction version in the Delta log
        self.delta_fields: dict[str, pa.DataType] = {}
        self.columns: dict[str, _Column] = {}
        # Per relation OID: (the Relation it was made for, its columns' value lists, the lists of
        # known columns it lacks, those columns themselves). Rebuilt when a new Relation message
        # replaces the description.
        self._plans: dict[int, tuple[Relation, list[list[str | None]], list[list[str | None]],
                                     list[_Column], list[_Column]]] = {}
        # Per row only what varies by row; what a transaction shares is kept once per run of rows.
        self._change: list[int] = []  # index into CHANGE_TYPES
        self._lsn: list[int] = []
        self._seq: list[int] = []
        self._runs: list[_Run] = []
        self.rows = 0
        self.max_commit_lsn = 0
        self.first_commit_time: datetime | None = None
        self.error: str | None = None
        self.dt: DeltaTable | None = None  # kept open: each commit then reads only the log's new entries
        self._load()

    def _load(self) -> None:
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            return
        dt = self.dt = DeltaTable(self.uri, storage_options=self.storage_options)
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
            self._plans.clear()  # every other relation version now lacks this column
        return col

    def declare(self, relation: Relation) -> None:
        """Make every column of ``relation`` known (so an empty snapshot still creates them)."""
        self._plan(relation)

    def _plan(self, relation: Relation) -> tuple[list[list[str | None]], list[list[str | None]]]:
        cached = self._plans.get(relation.oid)
        if cached is None or cached[0] is not relation:
            cached = self._make_plan(relation)
        return cached[1], cached[2]

    def _make_plan(self, relation: Relation) -> tuple[Relation, list[list[str | None]], list[list[str | None]],
                                                      list[_Column], list[_Column]]:
        cols = [self._column(c.name, c.type_oid, c.typmod) for c in relation.columns]
        names = {c.name for c in relation.columns}
        others = [c for n, c in self.columns.items() if n not in names]
        plan = self._plans[relation.oid] = (relation, [c.values for c in cols], [c.values for c in others], cols,
                                            others)
        return plan

    def add(self, relation: Relation, values: tuple[Value, ...] | None, change_type: str, *, lsn: int,
            xid: int | None, commit_lsn: int, seq: int, commit_time: datetime,
            fill: tuple[Value, ...] | None = None) -> None:
        """Buffer one history row. ``values`` None means a truncate marker (all source columns null);
        an UNCHANGED value is taken from ``fill`` (the old row of the same UPDATE) when it has one."""
        lists, others = self._plan(relation)
        if values is None:
            for lst in lists:
                lst.append(None)
        elif UNCHANGED in values:
            for i, lst in enumerate(lists):
                v = values[i]
                if v is UNCHANGED:
                    v = fill[i] if fill is not None and fill[i] is not UNCHANGED else None
                lst.append(v)  # type: ignore[arg-type]
        else:
            for lst, v in zip(lists, values):  # noqa: B905 - the decoder checked the width
                lst.append(v)  # type: ignore[arg-type]
        for lst in others:  # dropped from the source: nulls from now on
            lst.append(None)
        self._change.append(CHANGE_CODE[change_type])
        self._lsn.append(lsn)
        self._seq.append(seq)
        if not self._runs or self._runs[-1].commit_lsn != commit_lsn:
            self._start_run(xid, commit_lsn, commit_time)
        self.rows += 1

    def add_insert(self, relation: Relation, values: tuple[Value, ...], lsn: int, seq: int, xid: int,
                   commit_lsn: int, commit_time: datetime) -> None:
        """``add`` for an insert (never UNCHANGED values): the path bulk loads take, kept short."""
        cached = self._plans.get(relation.oid)
        if cached is None or cached[0] is not relation:
            self.add(relation, values, "insert", lsn=lsn, xid=xid, commit_lsn=commit_lsn, seq=seq,
                     commit_time=commit_time)
            return
        for lst, v in zip(cached[1], values):  # noqa: B905 - the decoder checked the width
            lst.append(v)  # type: ignore[arg-type]
        for lst in cached[2]:
            lst.append(None)
        self._change.append(0)
        self._lsn.append(lsn)
        self._seq.append(seq)
        if not self._runs or self._runs[-1].commit_lsn != commit_lsn:
            self._start_run(xid, commit_lsn, commit_time)
        self.rows += 1

    def add_inserts(self, relation: Relation, columns: list[pa.Array], lsns: list[int], seq: int, xid: int,
                    commit_lsn: int, commit_time: datetime) -> None:
        """Buffer a run of inserts of one transaction, decoded column by column (an ``InsertRun``):
        row k is the change at ``lsns[k]``, ``_sort_by`` position ``seq + 2k``."""
        cached = self._plans.get(relation.oid)
        if cached is None or cached[0] is not relation:
            cached = self._make_plan(relation)
        n = len(lsns)
        for col, array in zip(cached[3], columns):  # noqa: B905 - the decoder checked the width
            col.append_array(array)
        for col in cached[4]:
            col.append_array(pa.nulls(n, pa.string()))
        self._change.extend(repeat(0, n))
        self._lsn.extend(lsns)
        self._seq.extend(range(seq, seq + 2 * n, 2))
        if not self._runs or self._runs[-1].commit_lsn != commit_lsn:
            self._start_run(xid, commit_lsn, commit_time)
        self.rows += n

    def _start_run(self, xid: int | None, commit_lsn: int, commit_time: datetime) -> None:
        """The rows from here on belong to the transaction committed at ``commit_lsn``."""
        self._runs.append(_Run(self.rows, xid, commit_lsn, commit_time))
        if commit_lsn > self.max_commit_lsn:
            self.max_commit_lsn = commit_lsn
        if self.first_commit_time is None:
            self.first_commit_time = commit_time

    def detach(self) -> Pending:
        """Hand the buffer over (to be committed, possibly on another thread) and start a new one."""
        pending = Pending(self, dict(self.columns), dict(self.delta_fields), self.rows, self.max_commit_lsn,
                          self._change, self._lsn, self._seq, self._runs)
        self.columns = {n: _Column(c.type_oid, c.typmod, c.arrow) for n, c in self.columns.items()}
        self._plans.clear()
        self._change, self._lsn, self._seq, self._runs = [], [], [], []
        self.rows = 0
        self.max_commit_lsn = 0
        self.first_commit_time = None
        return pending

    def clear(self) -> None:
        self.detach()

    def build(self) -> pa.Table:
        return self.detach().build()

    # -- committing -------------------------------------------------------------------------------

    def commit(self, version: int, *, overwrite: bool = False) -> int:
        """Write the buffer as one Delta commit tagged ``version``; returns the bytes of data built."""
        return self.detach().commit(version, overwrite=overwrite)


@dataclass
class Pending:
    """A detached buffer: what one Delta commit of one table will hold."""

    table: HistoryTable
    columns: dict[str, _Column]
    delta_fields: dict[str, pa.DataType]
    rows: int
    max_commit_lsn: int
    change: list[int]
    lsn: list[int]
    seq: list[int]
    runs: list[_Run]

    def build(self) -> pa.Table:
        arrays: list[pa.Array] = []
        fields: list[pa.Field] = []
        for name, col in self.columns.items():
            try:
                arrays.append(to_arrow(col.texts(), col.type_oid, col.typmod))
            except ValueError as e:
                raise TableSyncError(f"column {name!r}: {e}") from None
            fields.append(pa.field(name, col.arrow))
        for name, typ in self.delta_fields.items():  # in Delta, gone from the source before we started
            if name not in self.columns:
                arrays.append(pa.nulls(self.rows, typ))
                fields.append(pa.field(name, typ))
        # Transaction-wide values expand from one entry per run; all of it vectorized in Arrow.
        ends = [r.start for r in self.runs[1:]] + ([self.rows] if self.runs else [])
        lengths = [e - r.start for r, e in zip(self.runs, ends, strict=True)]
        run_of = pa.array(chain.from_iterable(repeat(i, n) for i, n in enumerate(lengths)), pa.int32())
        commit_lsn = pc.take(pa.array([r.commit_lsn for r in self.runs], pa.int64()), run_of)
        sort_by = pc.binary_join_element_wise(_padded(commit_lsn), _padded(pa.array(self.seq, pa.int64())), "")
        meta = [pc.take(CHANGE_NAMES, pa.array(self.change, pa.int8())), pa.array(self.lsn, pa.int64()),
                pc.take(pa.array([r.xid for r in self.runs], pa.int64()), run_of),
                pc.take(pa.array([r.commit_time for r in self.runs], META_FIELDS[3].type), run_of), sort_by]
        for f, values in zip(META_FIELDS, meta, strict=True):
            arrays.append(values)
            fields.append(f)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def commit(self, version: int, *, overwrite: bool = False) -> int:
        """Write as one Delta commit tagged ``version``; returns the bytes of Arrow data written.

        Refuses to go backwards: a version at or below the recorded one would mean a second writer
        or a replay bug, and writing it would duplicate history."""
        t = self.table
        if not overwrite and t.committed is not None and version <= t.committed:
            raise TableSyncError(f"{t.uri} already holds changes through LSN {version:X} "
                                 f"(recorded {t.committed:X}): is another syncer writing it?")
        data = self.build()
        write_deltalake(
            t.dt if t.dt is not None else t.uri, data, mode="overwrite" if overwrite else "append",
            schema_mode="overwrite" if overwrite else "merge", storage_options=t.storage_options,
            commit_properties=CommitProperties(app_transactions=[Transaction(t.app_id, version)]),
        )
        if t.dt is None:
            t.dt = DeltaTable(t.uri, storage_options=t.storage_options)
        t.committed = version
        t.delta_fields = {f.name: f.type for f in data.schema if f.name not in META_NAMES}
        return int(data.nbytes)
