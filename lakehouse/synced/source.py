"""The Delta side: what a source table holds at a version, its change data feed, and its log.

Every function here blocks (deltalake reads files or objects): callers run them in a thread.
``SOURCE_URI`` is a local path or an ``s3://`` URI; deltalake reads the standard AWS settings
(``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, …) from the environment itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from lakehouse.synced.spec import SpecError, check_column
from lakehouse.types import UnsupportedType, postgres_type

CDF_SETTING = "delta.enableChangeDataFeed"
BATCH_ROWS = 64 * 1024
FEED_MIN_LIMIT = 1_000_000  # change rows read into memory before a full copy is preferred


class SourceError(RuntimeError):
    """The Delta source cannot be read; the message names it and what to check."""


@dataclass(frozen=True)
class SourceVersion:
    """One version of a Delta table, as far as a synced table cares."""

    version: int
    commit_time: datetime
    schema: pa.Schema
    cdf: bool


def open_table(uri: str, version: int | None = None) -> DeltaTable:
    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError:
        raise SourceError(f"no Delta table at {uri}: check the path or URI (and AWS_* settings for s3://)") from None
    except DeltaError as e:
        raise SourceError(f"cannot read Delta table {uri}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise SourceError(f"cannot read Delta table {uri}: {e}") from None


def describe(dt: DeltaTable) -> SourceVersion:
    """The loaded version of ``dt``: its commit time comes from the newest history entry, which
    is only right for a table loaded at its latest version (delta-rs labels older ones wrongly)."""
    history = dt.history(1)
    ms = history[0]["timestamp"] if history else 0
    cdf = dt.metadata().configuration.get(CDF_SETTING, "false").lower() == "true"
    return SourceVersion(dt.version(), datetime.fromtimestamp(ms / 1000, UTC), arrow_schema(dt), cdf)


def commit_time(dt: DeltaTable, version: int) -> datetime | None:
    """Commit time of ``version`` (at most ``dt``'s), from ``dt``'s history; None once it is gone."""
    back = dt.version() - version
    if back < 0:
        return None
    history = dt.history(back + 1)
    if len(history) <= back:
        return None
    return datetime.fromtimestamp(history[back]["timestamp"] / 1000, UTC)


def arrow_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def check_schema(schema: pa.Schema, keys: tuple[str, ...], timeseries_key: str | None) -> dict[str, str]:
    """Column → Postgres type for every source column; refuses what cannot become a synced table."""
    names = set(schema.names)
    for k in keys:
        if k not in names:
            raise SpecError(f"primary key column {k!r} is not in the source (columns: {', '.join(schema.names)})")
    if timeseries_key is not None and timeseries_key not in names:
        raise SpecError(f"timeseries key column {timeseries_key!r} is not in the source")
    types = {}
    for f in schema:
        check_column(f.name)
        try:
            types[f.name] = postgres_type(f.type, f.name)
        except UnsupportedType as e:
            raise SpecError(f"{e}: cast it in the source, or leave it out with a view") from None
        if f.name in keys and (types[f.name].endswith("[]") or types[f.name] == "jsonb"):
            raise SpecError(f"primary key column {f.name!r} has type {f.type}: a key must be a scalar")
    return types


def snapshot_batches(dt: DeltaTable, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The table at its loaded version, a bounded batch at a time: one file after another on this
    thread, so memory is about a row group (plus a few batches) whatever the table's size. (Arrow's
    threaded scanner reads ahead of a slow consumer: measured 94 → 207 MiB from 0.5M to 3M rows.)"""
    try:
        dataset = dt.to_pyarrow_dataset()
    except DeltaError as e:
        raise SourceError(f"cannot scan {dt.table_uri}: {str(e).splitlines()[0]}") from None
    scanner = pads.Scanner.from_dataset(dataset, columns=columns, batch_size=BATCH_ROWS,
                                        batch_readahead=1, fragment_readahead=1, use_threads=False)
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def changes(dt: DeltaTable, start: int, end: int, limit: int) -> pa.Table:
    """Change data feed rows of versions ``start..end`` (inclusive), at most ``limit`` of them (the
    net change per key needs them all in memory; beyond the limit a full copy is the cheaper and
    bounded way). Raises ``SourceError`` when the feed cannot be read (files vacuumed, log cleaned
    up) or is too long: the caller falls back to a snapshot and says why."""
    batches, total = [], 0
    try:
        reader = pa.RecordBatchReader.from_stream(dt.load_cdf(starting_version=start, ending_version=end))
        for batch in reader:
            total += batch.num_rows
            if total > limit:
                raise SourceError(f"versions {start}..{end} changed more than {limit:,} rows: a full copy is cheaper")
            batches.append(batch)
        return plain(pa.Table.from_batches(batches, schema=reader.schema))
    except (DeltaError, OSError, ValueError) as e:
        raise SourceError(f"change data feed of versions {start}..{end} unreadable: "
                          f"{str(e).splitlines()[0]}") from None


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_list_view(t) or pa.types.is_large_list(t) or pa.types.is_large_list_view(t):
        return pa.list_(_plain_type(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_plain_type(t.value_type))
    return t


def plain(table: pa.Table) -> pa.Table:
    """The change data feed comes with view and large types (``string_view``…): the same data in
    the plain types the rest of the room (and Arrow's compute kernels) expect."""
    schema = pa.schema([f.with_type(_plain_type(f.type)) for f in table.schema])
    return table if schema == table.schema else table.cast(schema)


def rows_for_keys(dt: DeltaTable, keys: pa.Table, columns: list[str]) -> pa.Table:
    """The rows of the loaded version whose key is in ``keys`` (one scan, filtered on the key)."""
    dataset = dt.to_pyarrow_dataset()
    expr = None
    for name in keys.column_names:
        term = pads.field(name).isin(keys.column(name).unique())
        expr = term if expr is None else expr & term
    table = dataset.to_table(columns=columns, filter=expr)
    if keys.num_columns > 1:  # the per-column filter over-selects for composite keys
        table = table.join(keys.group_by(keys.column_names).aggregate([]), keys.column_names, join_type="inner")
        table = table.select(columns)
    return table


class Prefetch:
    """Runs a blocking iterator in a thread, at most ``depth`` items ahead of the consumer: reading
    and encoding overlap the database load while memory stays bounded."""

    _END = object()

    def __init__(self, items: Iterator[object], depth: int = 4) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="synced-prefetch")
        self._thread.start()

    def _run(self, items: Iterator[object]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> object | None:
        """The next item, None at the end (blocks: call it from a thread)."""
        item = self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
