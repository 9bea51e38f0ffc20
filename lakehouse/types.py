"""The one Postgres ↔ Arrow (Delta) type mapping, used by both directions of the lakehouse.

Lakehouse sync reads Postgres columns (a type OID and typmod from pgoutput's Relation message or
``pg_attribute``) and needs an Arrow type a Delta table can hold; synced tables read a Delta
table's Arrow schema and need a Postgres column type. Both read the tables below, so a type that
round-trips one way round-trips the other.

Delta has no unsigned integers, no time of day, no intervals, no UUIDs and no JSON; Postgres types
without a faithful Delta equivalent travel as their Postgres text form (``string``), which any
reader can parse back. Unconstrained ``numeric`` is a string too: a Delta decimal needs a fixed
precision and scale, and silently rounding money is worse than a string.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Built-in type OIDs (pg_type.dat); stable across every Postgres release.
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, FLOAT4, FLOAT8, MONEY = 114, 142, 700, 701, 790
BPCHAR, VARCHAR, DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1266
NUMERIC, UUID, JSONB, INET, CIDR, MACADDR = 1700, 2950, 3802, 869, 650, 829

DECIMAL_MAX_PRECISION = 38  # Delta's decimal limit

# Scalar types with an exact Arrow/Delta counterpart.
_SCALAR_TO_ARROW: dict[int, pa.DataType] = {
    BOOL: pa.bool_(),
    INT2: pa.int16(),
    INT4: pa.int32(),
    INT8: pa.int64(),
    OID: pa.int64(),
    FLOAT4: pa.float32(),
    FLOAT8: pa.float64(),
    TEXT: pa.string(),
    VARCHAR: pa.string(),
    BPCHAR: pa.string(),
    NAME: pa.string(),
    CHAR: pa.string(),
    BYTEA: pa.binary(),
    DATE: pa.date32(),
    TIMESTAMP: pa.timestamp("us"),
    TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
}

# Array type OID → element type OID, for the arrays of the scalars above (Delta arrays).
ARRAY_ELEMENT: dict[int, int] = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1005: INT2, 1007: INT4, 1009: TEXT, 1014: BPCHAR,
    1015: VARCHAR, 1016: INT8, 1021: FLOAT4, 1022: FLOAT8, 1028: OID, 1182: DATE, 1115: TIMESTAMP,
    1185: TIMESTAMPTZ, 1231: NUMERIC,
}

# Everything else that is known travels as its text form; listed so the README can say so.
AS_TEXT: dict[int, str] = {
    JSON: "json", JSONB: "jsonb", XML: "xml", MONEY: "money", TIME: "time", TIMETZ: "timetz",
    INTERVAL: "interval", UUID: "uuid", INET: "inet", CIDR: "cidr", MACADDR: "macaddr",
}


@dataclass(frozen=True)
class Column:
    """A Postgres column as the lakehouse sees it."""

    name: str
    type_oid: int
    typmod: int = -1


def numeric_precision_scale(typmod: int) -> tuple[int, int] | None:
    """``numeric(p, s)`` from its typmod; None when unconstrained."""
    if typmod < 4:  # -1, or anything below VARHDRSZ: no precision given
        return None
    value = typmod - 4
    precision, scale = (value >> 16) & 0xFFFF, value & 0x7FF
    if scale & 0x400:  # Postgres 15 allows a negative scale, stored in 11 bits
        scale -= 0x800
    return precision, scale


def arrow_type(type_oid: int, typmod: int = -1) -> pa.DataType:
    """The Arrow type a Delta table holds this Postgres type as (string when none is faithful)."""
    if type_oid == NUMERIC:
        ps = numeric_precision_scale(typmod)
        if ps is not None and ps[0] <= DECIMAL_MAX_PRECISION and 0 <= ps[1] <= ps[0]:
            return pa.decimal128(*ps)
        return pa.string()
    scalar = _SCALAR_TO_ARROW.get(type_oid)
    if scalar is not None:
        return scalar
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        # Array typmods are the element's; numeric[] keeps its precision where it has one.
        return pa.list_(arrow_type(element, typmod))
    return pa.string()


def is_text_fallback(type_oid: int, typmod: int = -1) -> bool:
    """True when the column travels as its Postgres text form rather than a native Delta type."""
    return pa.types.is_string(arrow_type(type_oid, typmod)) and type_oid not in (TEXT, VARCHAR, BPCHAR, NAME, CHAR)


def arrow_schema(columns: list[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c.type_oid, c.typmod)) for c in columns])


class UnsupportedType(ValueError):
    """An Arrow type with no Postgres column type; the message names the column and the type."""


def postgres_type(t: pa.DataType, column: str = "?") -> str:
    """The Postgres column type for an Arrow (Delta) type, as SQL text for CREATE TABLE."""
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t):
        return "smallint"
    if pa.types.is_int32(t):
        return "integer"
    if pa.types.is_int64(t):
        return "bigint"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytea"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz is not None else "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = postgres_type(t.value_type, column)
        if inner.endswith("[]") or inner == "jsonb":
            return "jsonb"  # Postgres arrays are not arrays of arrays of varying shape
        return inner + "[]"
    if pa.types.is_struct(t) or pa.types.is_map(t):
        return "jsonb"
    raise UnsupportedType(f"column {column!r} has Delta type {t} that Postgres has no column type for")


def compatible(old: pa.DataType, new: pa.DataType) -> bool:
    """True when a source column may change from ``old`` to ``new`` without rewriting consumers:
    the same type, or a widening Delta itself allows (int8→…→int64, float32→float64)."""
    if old == new:
        return True
    widen = [pa.int8(), pa.int16(), pa.int32(), pa.int64()]
    if old in widen and new in widen:
        return widen.index(new) > widen.index(old)
    return old == pa.float32() and new == pa.float64()
