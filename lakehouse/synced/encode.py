"""Arrow batches → COPY input, and the SQL text of Postgres identifiers.

The load path is ``COPY … FROM STDIN (FORMAT csv)`` fed by Arrow's own CSV writer (C++, columnar).
Binary COPY through asyncpg's ``copy_records_to_table`` needs every value as a Python object first
and measured slower for the common scalar types (see ``bench/synced_tables.py``), so it does not pay
here. Columns the CSV writer cannot render in a form Postgres parses (bytea, arrays, structs and
maps) are turned into their Postgres text form first, value by value.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

CSV_OPTIONS = pcsv.WriteOptions(include_header=False, quoting_style="needed", batch_size=16 * 1024)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        text = "t" if value else "f"
    elif isinstance(value, bytes):
        text = "\\x" + value.hex()
    elif isinstance(value, float | int | Decimal | date | datetime):
        text = str(value)
    else:
        text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


def _to_text(pg_type: str) -> Callable[[Any], str | None] | None:
    """A per-value converter to Postgres text for a column type the CSV writer cannot render."""
    if pg_type == "bytea":
        return lambda v: None if v is None else "\\x" + v.hex()
    if pg_type.endswith("[]"):
        return lambda v: None if v is None else "{" + ",".join(_array_element(e) for e in v) + "}"
    if pg_type == "jsonb":
        return lambda v: None if v is None else json.dumps(
            dict(v) if isinstance(v, list) and v and isinstance(v[0], tuple) else v, default=_json_default)
    return None


def _prepare(column: pa.ChunkedArray | pa.Array, pg_type: str) -> pa.Array | pa.ChunkedArray:
    convert = _to_text(pg_type)
    if convert is not None:
        return pa.array([convert(v) for v in column.to_pylist()], pa.string())
    t = column.type
    if pa.types.is_timestamp(t) and t.tz is not None:
        # Arrow formats a zoned timestamp through the time zone database, ~25x slower than the
        # same instant without a zone; Delta timestamps are UTC, so format that and say so.
        text = pc.cast(pc.cast(column, pa.timestamp(t.unit)), pa.string())
        return pc.binary_join_element_wise(text, pa.scalar("Z"), "")
    if pa.types.is_float16(t):
        return column.cast(pa.float32())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return column.cast(pa.string())
    return column


def csv_bytes(batch: pa.RecordBatch | pa.Table, pg_types: list[str]) -> bytes:
    """One batch as CSV rows for COPY, columns in the batch's order (``pg_types`` the same order)."""
    columns = [_prepare(batch.column(i), pg_types[i]) for i in range(batch.num_columns)]
    table = pa.table(columns, names=[str(i) for i in range(len(columns))])
    out = io.BytesIO()
    pcsv.write_csv(table, out, CSV_OPTIONS)
    return out.getvalue()
