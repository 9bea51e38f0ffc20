"""The shared type mapping: each Postgres type maps to the Arrow type a Delta table can hold, and
the Arrow types Delta hands back map to Postgres types that map back to the same Arrow type."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lakehouse import types as t


def numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


@pytest.mark.parametrize(("oid", "typmod", "arrow"), [
    (t.BOOL, -1, pa.bool_()),
    (t.INT2, -1, pa.int16()),
    (t.INT4, -1, pa.int32()),
    (t.INT8, -1, pa.int64()),
    (t.FLOAT8, -1, pa.float64()),
    (t.TEXT, -1, pa.string()),
    (t.BYTEA, -1, pa.binary()),
    (t.DATE, -1, pa.date32()),
    (t.TIMESTAMP, -1, pa.timestamp("us")),
    (t.TIMESTAMPTZ, -1, pa.timestamp("us", tz="UTC")),
    (t.NUMERIC, numeric_typmod(12, 2), pa.decimal128(12, 2)),
    (t.NUMERIC, -1, pa.string()),
    (t.NUMERIC, numeric_typmod(60, 2), pa.string()),
    (t.UUID, -1, pa.string()),
    (t.JSONB, -1, pa.string()),
    (1007, -1, pa.list_(pa.int32())),
    (1231, numeric_typmod(10, 3), pa.list_(pa.decimal128(10, 3))),
    (999999, -1, pa.string()),  # an enum or a domain: its text form
])
def test_postgres_to_arrow(oid: int, typmod: int, arrow: pa.DataType) -> None:
    assert t.arrow_type(oid, typmod) == arrow


def test_negative_numeric_scale_is_text() -> None:
    assert t.numeric_precision_scale(numeric_typmod(5, -2)) == (5, -2)
    assert t.arrow_type(t.NUMERIC, numeric_typmod(5, -2)) == pa.string()


@pytest.mark.parametrize("oid", [t.BOOL, t.INT2, t.INT4, t.INT8, t.FLOAT4, t.FLOAT8, t.TEXT, t.BYTEA,
                                 t.DATE, t.TIMESTAMP, t.TIMESTAMPTZ, 1007, 1009, 1016])
def test_round_trip_through_postgres_type(oid: int) -> None:
    arrow = t.arrow_type(oid)
    back = {"boolean": t.BOOL, "smallint": t.INT2, "integer": t.INT4, "bigint": t.INT8, "real": t.FLOAT4,
            "double precision": t.FLOAT8, "text": t.TEXT, "bytea": t.BYTEA, "date": t.DATE,
            "timestamp": t.TIMESTAMP, "timestamptz": t.TIMESTAMPTZ, "integer[]": 1007, "text[]": 1009,
            "bigint[]": 1016}[t.postgres_type(arrow)]
    assert t.arrow_type(back) == arrow


def test_nested_and_unsupported() -> None:
    assert t.postgres_type(pa.struct([("a", pa.int32())])) == "jsonb"
    assert t.postgres_type(pa.list_(pa.list_(pa.int32()))) == "jsonb"
    assert t.postgres_type(pa.decimal128(20, 4)) == "numeric(20,4)"
    with pytest.raises(t.UnsupportedType, match="'c'"):
        t.postgres_type(pa.duration("s"), "c")


def test_compatible_widening_only() -> None:
    assert t.compatible(pa.int32(), pa.int64())
    assert not t.compatible(pa.int64(), pa.int32())
    assert t.compatible(pa.float32(), pa.float64())
    assert not t.compatible(pa.int64(), pa.string())
    assert t.is_text_fallback(t.UUID) and not t.is_text_fallback(t.TEXT)
