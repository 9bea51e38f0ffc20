"""Postgres text values → Arrow arrays, column by column, for the Arrow types ``lakehouse.types`` picks.

The stream (pgoutput, text mode) and the initial snapshot (``SELECT col::text``) both deliver each
value in its Postgres output form, under ``DateStyle = ISO`` and ``TimeZone = UTC``; one converter
turns both into Arrow, so a snapshot row and a streamed row of the same value are identical.
Arrow itself casts numbers, booleans, dates and timestamps (vectorized); byte strings, arrays
and what Arrow cannot read (``infinity``, dates before year 1 — refused) are parsed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lakehouse import types as t


class UnsyncableValue(ValueError):
    """A value Delta cannot hold in the column's type; the message names the value and the remedy."""


def _bool(text: str) -> bool:
    return text in ("t", "true")  # the output function says 't'; the bool → text cast says 'true'


def _bytea(text: str) -> bytes:
    if not text.startswith("\\x"):
        raise UnsyncableValue(f"bytea value {text[:20]!r} is not in hex form: set bytea_output = 'hex'")
    return bytes.fromhex(text[2:])


def _date(text: str) -> date:
    if text == "infinity":
        return date.max
    if text == "-infinity":
        return date.min
    if text.endswith(" BC"):
        raise UnsyncableValue(f"date {text!r} is before year 1, which Delta cannot hold")
    return date.fromisoformat(text)


def _timestamp(text: str) -> datetime:
    if text == "infinity":
        return datetime.max
    if text == "-infinity":
        return datetime.min
    if text.endswith(" BC"):
        raise UnsyncableValue(f"timestamp {text!r} is before year 1, which Delta cannot hold")
    return datetime.fromisoformat(text)


def _timestamptz(text: str) -> datetime:
    if text in ("infinity", "-infinity"):
        return (datetime.max if text == "infinity" else datetime.min).replace(tzinfo=UTC)
    when = _timestamp(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_array(text: str) -> list[str | None]:
    """A one-dimensional Postgres array literal (``{1,2,NULL}``, ``{"a b","c\\"d"}``) → element texts."""
    if text.startswith("["):  # explicit bounds: "[0:1]={a,b}"
        text = text[text.index("=") + 1:]
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise UnsyncableValue(f"array value {text[:30]!r} is not an array literal")
    body = text[1:-1]
    out: list[str | None] = []
    if not body:
        return out
    i, n = 0, len(body)
    while i <= n:
        if i < n and body[i] == "{":
            raise UnsyncableValue("multi-dimensional arrays are not supported: Delta arrays have one dimension")
        if i < n and body[i] == '"':
            i += 1
            chars = []
            while i < n and body[i] != '"':
                if body[i] == "\\":
                    i += 1
                chars.append(body[i])
                i += 1
            out.append("".join(chars))
            i += 1  # closing quote
        else:
            end = body.find(",", i)
            end = n if end < 0 else end
            item = body[i:end].strip()
            out.append(None if item == "NULL" else item)
            i = end
        i += 1  # the comma
    return out


_PARSERS: dict[int, Callable[[str], Any]] = {
    t.BOOL: _bool, t.BYTEA: _bytea, t.DATE: _date, t.TIMESTAMP: _timestamp, t.TIMESTAMPTZ: _timestamptz,
}


Texts = Sequence[str | None] | pa.Array  # an Arrow array: of strings, from the bulk insert path


def _scalar_array(texts: Texts, type_oid: int, typ: pa.DataType) -> pa.Array:
    strings = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    if pa.types.is_string(typ):
        return strings
    if type_oid == t.BOOL:
        return pc.or_(pc.equal(strings, "t"), pc.equal(strings, "true"))  # type: ignore[attr-defined]
    if pa.types.is_decimal(typ) and pc.any(pc.equal(strings, "NaN")).as_py():  # type: ignore[attr-defined]
        raise UnsyncableValue("numeric NaN cannot be held by a Delta decimal: declare the column as unconstrained "
                              "numeric (synced as text) or remove the NaN")
    if type_oid != t.BYTEA:
        try:  # Arrow parses numbers (NaN, Infinity too), ISO dates and timestamps with offsets itself
            return strings.cast(typ)
        except pa.ArrowInvalid:
            if type_oid not in _PARSERS:
                raise
    parser = _PARSERS[type_oid]  # infinity, BC dates, bytea: one by one
    return pa.array([None if v is None else parser(v) for v in strings.to_pylist()], typ)


def to_arrow(texts: Texts, type_oid: int, typmod: int = -1) -> pa.Array:
    """One column's text values (None for NULL) as an Arrow array of ``types.arrow_type``."""
    typ = t.arrow_type(type_oid, typmod)
    if pa.types.is_list(typ):
        element_oid = t.ARRAY_ELEMENT[type_oid]
        items = texts.to_pylist() if isinstance(texts, pa.Array) else texts
        lists = [None if v is None else parse_array(v) for v in items]
        flat = [x for item in lists if item is not None for x in item]
        values = _scalar_array(flat, element_oid, typ.value_type)
        offsets, mask, pos = [0], [], 0
        for item in lists:
            mask.append(item is None)
            pos += 0 if item is None else len(item)
            offsets.append(pos)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=typ,
                                        mask=pa.array(mask, pa.bool_()))
    try:
        return _scalar_array(texts, type_oid, typ)
    except pa.ArrowInvalid as e:
        raise UnsyncableValue(f"a value of type {type_oid} does not fit Delta type {typ}: {e}") from None
