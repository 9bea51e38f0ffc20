"""SQL from the plan: the parsed request and the schema cache in, one statement and its parameters out.

Rules kept everywhere: identifiers are quoted (``ident``) and come from the request only after the
schema cache has vouched for them or Postgres would reject them as unknown; every value the client
sends is a bound parameter, passed as text and cast to the column's type (``CAST($n::text AS
integer)``: Postgres parses it, so ``5``, ``2024-01-01`` or ``{1,2}`` mean what they mean to
PostgREST); type names spliced after ``::`` come from ``pg_catalog`` (``regtype`` output) or passed
the request grammar's word-only check.

A read is one ``SELECT`` producing one row: the total (when counted), the page size, the JSON body,
and ``response.headers``/``response.status`` as functions left them. Embedded resources are
``LEFT JOIN LATERAL`` subqueries aggregated to JSON (to-one: an object; to-many: an array), so the
whole tree is built by Postgres in the same statement. Writes are a data-modifying CTE read by the
same select.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from dataapi.errors import ApiError, body_error
from dataapi.request import (
    FTS,
    IS_VALUES,
    OPERATORS,
    Column,
    Condition,
    Embed,
    Field,
    Filter,
    Logic,
    OrderTerm,
    Path,
    Query,
    SelectItem,
    Star,
)
from dataapi.schema import FunctionInfo, SchemaCache, TableInfo

RESPONSE_SETTINGS = ("nullif(current_setting('response.headers', true), '') AS response_headers, "
                     "nullif(current_setting('response.status', true), '') AS response_status")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{ident(schema)}.{ident(name)}"


class Params:
    """Positional parameters; every value the client sent goes through ``add``."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any, pg_type: str = "text") -> str:
        self.values.append(value)
        return f"${len(self.values)}::{pg_type}"


@dataclass
class Statement:
    sql: str
    params: list[Any]


@dataclass
class ReadShape:
    """The top level of a read: where rows come from and how many."""
    table: TableInfo
    source: str                       # SQL for FROM (a table, a CTE name or a function call)
    limit: int | None
    offset: int
    count: str | None = None          # "exact" puts the total in the same statement


def _unknown_column(table: TableInfo, name: str) -> ApiError:
    return ApiError(400, "42703", f"column {table.name}.{name} does not exist", None,
                    "Check the column name against the table, or reload the schema cache if it was just added.")


class Builder:
    def __init__(self, cache: SchemaCache, query: Query, params: Params | None = None) -> None:
        self.cache = cache
        self.query = query
        self.params = params or Params()
        self._n = 0
        self._used_paths: set[Path] = {()}

    def alias(self) -> str:
        self._n += 1
        return f"pgrst_{self._n}"

    # -- expressions ------------------------------------------------------------------------------

    def field_sql(self, alias: str, table: TableInfo, f: Field) -> tuple[str, str]:
        """SQL for a column with its JSON arrows, and the type of the result."""
        col = table.columns.get(f.name)
        if col is None and f.name in table.computed:
            fn_schema, fn_name, rettype = table.computed[f.name]
            sql, typ = f"{qualified(fn_schema, fn_name)}({alias})", rettype
            for step in f.path:
                key = self.params.add(step.key, "int") if isinstance(step.key, int) else self.params.add(step.key)
                sql, typ = f"{sql}{step.arrow}{key}", "text" if step.arrow == "->>" else "jsonb"
            return sql, typ
        if col is None and table.kind != "c":
            raise _unknown_column(table, f.name)
        sql = f"{alias}.{ident(f.name)}"
        typ = col.type if col is not None else "text"
        for step in f.path:
            key = self.params.add(step.key, "int") if isinstance(step.key, int) else self.params.add(step.key)
            sql = f"{sql}{step.arrow}{key}"
            typ = "text" if step.arrow == "->>" else "jsonb"  # json paths compare as jsonb (json has no =)
        if f.path and f.path[-1].arrow == "->" and col is not None and col.type == "json":
            sql = f"({sql})::jsonb"
        return sql, typ

    def value(self, raw: str, typ: str) -> str:
        return f"CAST({self.params.add(raw)} AS {typ})"

    def condition(self, alias: str, table: TableInfo, cond: Condition, embeds: dict[str, str]) -> str:
        if isinstance(cond, Logic):
            joiner = " AND " if cond.op == "and" else " OR "
            inner = joiner.join(self.condition(alias, table, c, embeds) for c in cond.children)
            return f"NOT ({inner})" if cond.negate else f"({inner})"
        return self.filter(alias, table, cond, embeds)

    def filter(self, alias: str, table: TableInfo, f: Filter, embeds: dict[str, str]) -> str:
        if f.field.name in embeds and not f.field.path and f.field.name not in table.columns:
            if f.op != "is" or f.value not in ("null", "not_null"):
                raise ApiError(400, "PGRST120", "Bad operator on the '" + f.field.name + "' embedded resource",
                               None, "Only is null or not is null filters are allowed on embedded resources")
            test = "IS NULL" if (f.value == "null") != f.negate else "IS NOT NULL"
            return f"{embeds[f.field.name]} {test}"
        expr, typ = self.field_sql(alias, table, f.field)
        col = table.columns.get(f.field.name)
        if f.op in FTS and col is not None and col.base == "tsvector" and not f.field.path:
            typ = "tsvector"  # a domain over tsvector is searched as it is, not through to_tsvector()
        sql = self._op(expr, typ, f)
        return f"NOT ({sql})" if f.negate else sql

    def _op(self, expr: str, typ: str, f: Filter) -> str:
        op = f.op
        if op == "is":
            return f"{expr} IS {IS_VALUES[str(f.value)]}"
        if op == "isdistinct":
            return f"{expr} IS DISTINCT FROM {self.value(str(f.value), typ)}"
        if op == "in":
            return f"{expr} = ANY(CAST({self.params.add(list(f.value), 'text[]')} AS {_array_of(typ)}))"
        if op in FTS:
            lang = f"{self.params.add(f.language, 'regconfig')}, " if f.language else ""
            doc = expr if typ == "tsvector" else f"to_tsvector({lang}{expr})"
            return f"{doc} @@ {FTS[op]}({lang}{self.params.add(str(f.value))})"
        sql_op = OPERATORS[op]
        textual = op in ("like", "ilike", "match", "imatch")
        if f.quantifier is not None:
            values = [v.replace("*", "%") if op in ("like", "ilike") else v for v in f.value]
            arr = (self.params.add(values, "text[]") if textual
                   else f"CAST({self.params.add(values, 'text[]')} AS {_array_of(typ)})")
            return f"{expr} {sql_op} {f.quantifier.upper()}({arr})"
        if textual:
            val = str(f.value).replace("*", "%") if op in ("like", "ilike") else str(f.value)
            return f"{expr}::text {sql_op} {self.params.add(val)}"
        return f"{expr} {sql_op} {self.value(str(f.value), typ)}"

    # -- reads ----------------------------------------------------------------------------------

    def node(self, table: TableInfo, source: str, items: list[SelectItem], path: Path, *,
             link: str | None = None, link_alias: str | None = None, limit: int | None = None,
             offset: int = 0, for_count: bool = False) -> str:
        """One level of the tree: ``SELECT cols FROM source AS a <laterals> WHERE … ORDER BY … LIMIT``.
        ``link`` is the join condition to the parent, with ``{a}`` standing for this level's alias."""
        a = link_alias or self.alias()
        cols: list[str] = []
        joins: list[str] = []
        wheres: list[str] = [link.format(a=a)] if link else []
        embeds: dict[str, str] = {}
        grouped: list[int] = []
        has_aggregate = False
        for item in items:
            if isinstance(item, Star):
                cols.append(f"{a}.*")
                grouped.append(len(cols))
            elif isinstance(item, Column):
                sql, out_name, is_agg = self._column(a, table, item)
                cols.append(f"{sql} AS {ident(out_name)}")
                has_aggregate |= is_agg
                if not is_agg:
                    grouped.append(len(cols))
            else:
                if for_count and item.join != "inner" and item.key not in self._filtered_names(path):
                    continue  # counting needs only the embeddings that can drop rows
                grouping = any(isinstance(i, Column) and i.aggregate for i in items)
                col_sql, join_sql, body_ref = self._embed(a, table, item, path, for_count, grouping)
                joins.append(join_sql)
                if body_ref is not None:
                    embeds[item.key] = body_ref
                    if item.join == "inner":
                        wheres.append(f"{body_ref} IS NOT NULL")
                if col_sql:
                    cols.append(col_sql)
                    grouped.append(len(cols))
        for cond in self.query.conditions.get(path, []):
            wheres.append(self.condition(a, table, cond, embeds))
        sql = f"SELECT {', '.join(cols) or 'NULL AS pgrst_none' if not for_count else '1'} FROM {source} AS {a}"
        if joins:
            sql += " " + " ".join(joins)
        if wheres:
            sql += " WHERE " + " AND ".join(wheres)
        if has_aggregate and not for_count:
            if any(isinstance(i, Star) for i in items):
                raise ApiError(400, "PGRST100", "select=* cannot be combined with aggregate functions", None,
                               "Name the columns to group by next to the aggregates")
            if grouped:
                sql += " GROUP BY " + ", ".join(str(n) for n in grouped)
        if for_count:
            return sql
        order = self.query.order.get(path, [])
        if order:
            sql += " ORDER BY " + ", ".join(self.order_sql(a, table, t) for t in order)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        if offset:
            sql += f" OFFSET {int(offset)}"
        return sql

    def _column(self, a: str, table: TableInfo, c: Column) -> tuple[str, str, bool]:
        if c.aggregate == "count" and c.field.name == "":
            sql = "count(*)"
            name = c.alias or "count"
        else:
            sql, _ = self.field_sql(a, table, c.field)
            if c.cast:
                sql = f"CAST({sql} AS {c.cast})"
            name = c.alias or c.field.default_alias
            if c.aggregate:
                sql = f"{c.aggregate}({sql})"
                name = c.alias or c.aggregate
        if c.aggregate and c.aggregate_cast:
            sql = f"CAST({sql} AS {c.aggregate_cast})"
        return sql, name, c.aggregate is not None

    def _embed(self, parent_alias: str, parent: TableInfo, e: Embed, path: Path,
               for_count: bool, grouped: bool = False) -> tuple[str | None, str, str | None]:
        rel = self.cache.relationship(parent, e.relation, e.hint)
        child_path = self._embed_path(path, e)
        self._used_paths.add(child_path)
        target = rel.target
        source = qualified(target.schema, target.name)
        if rel.function is not None:
            # A computed relationship: the function of the parent row is the embedded source.
            link = None
            source = f"{qualified(*rel.function)}({parent_alias})"
        elif rel.junction is None:
            link = " AND ".join(f"{{a}}.{ident(tc)} = {parent_alias}.{ident(sc)}" for sc, tc in rel.pairs)
        else:
            j = self.alias()
            on = [f"{j}.{ident(jc)} = {{a}}.{ident(tc)}" for jc, tc in rel.target_pairs]
            on += [f"{j}.{ident(jc)} = {parent_alias}.{ident(sc)}" for jc, sc in rel.source_pairs]
            link = (f"EXISTS (SELECT 1 FROM {qualified(rel.junction.schema, rel.junction.name)} AS {j} "
                    f"WHERE {' AND '.join(on)})")
        items = e.select  # empty: an embedding used only to filter (select=a,b()) outputs nothing
        limit = self.query.limit.get(child_path)
        offset = self.query.offset.get(child_path, 0)
        if rel.to_one and (limit is not None or offset):
            limit, offset = None, 0
        sub = self.node(target, source, items, child_path, link=link,
                        limit=limit, offset=offset, for_count=False)
        lat = self.alias()
        if e.spread and rel.to_one:
            # The embedded columns join the parent's row; !inner is the join itself.
            kind = "JOIN" if e.join == "inner" else "LEFT JOIN"
            return (None if for_count else f"{lat}.*", f"{kind} LATERAL ({sub}) AS {lat} ON TRUE", None)
        if e.spread:
            # To-many spread (PostgREST 13): each embedded column becomes an array of its values.
            row = self.alias()
            names = self._output_names(target, items)
            aggs = "".join(f"coalesce(json_agg({row}.{ident(n)}), '[]'::json) AS {ident(n)}, " for n in names)
            join = f"LEFT JOIN LATERAL (SELECT {aggs}count(*) AS pgrst_n FROM ({sub}) AS {row}) AS {lat} ON TRUE"
            cols = ", ".join(f"{lat}.{ident(n)}" for n in names)
            return (None if for_count or not names else cols), join, f"nullif({lat}.pgrst_n, 0)"
        row = self.alias()
        if rel.to_one:
            join = f"LEFT JOIN LATERAL (SELECT row_to_json({row}.*) AS body FROM ({sub}) AS {row}) AS {lat} ON TRUE"
            # Grouped next to aggregates, the embedding must be comparable: jsonb has equality, json not.
            col = f"{lat}.body{'::jsonb' if grouped else ''} AS {ident(e.key)}"
        else:
            join = f"LEFT JOIN LATERAL (SELECT json_agg({row}.*) AS body FROM ({sub}) AS {row}) AS {lat} ON TRUE"
            col = f"COALESCE({lat}.body, '[]'::json){'::jsonb' if grouped else ''} AS {ident(e.key)}"
        return (None if for_count or not e.select else col), join, f"{lat}.body"

    def _embed_path(self, path: Path, e: Embed) -> Path:
        """Filters, order and limit name an aliased embedding by its alias, or — as PostgREST also
        accepts — by its relation when the alias is not used."""
        by_key = path + (e.key,)
        by_relation = path + (e.relation,)
        mappings = (self.query.conditions, self.query.order, self.query.limit, self.query.offset)
        if e.alias and not any(k[:len(by_key)] == by_key for m in mappings for k in m) and any(
                k[:len(by_relation)] == by_relation for m in mappings for k in m):
            return by_relation
        return by_key

    def _filtered_names(self, path: Path) -> set[str]:
        """Names the filters at ``path`` refer to (an embedding filtered with is.null counts)."""
        names: set[str] = set()
        todo: list[Condition] = list(self.query.conditions.get(path, []))
        while todo:
            cond = todo.pop()
            if isinstance(cond, Logic):
                todo.extend(cond.children)
            else:
                names.add(cond.field.name)
        return names

    def _output_names(self, table: TableInfo, items: list[SelectItem]) -> list[str]:
        """The column names a level's SELECT produces (for a to-many spread's arrays)."""
        names: list[str] = []
        for item in items:
            if isinstance(item, Star):
                names += list(table.columns)
            elif isinstance(item, Column):
                names.append(item.alias or (item.aggregate if item.aggregate else item.field.default_alias))
            elif item.spread:
                raise ApiError(400, "PGRST119", "A spread inside a to-many spread is not supported", None,
                               "Spread the inner relationship on its own level, or embed it without '...'")
            elif item.select:
                names.append(item.key)
        return names

    def order_sql(self, a: str, table: TableInfo, t: OrderTerm) -> str:
        if t.relation is not None:
            rel = self.cache.relationship(table, t.relation, None)
            if not rel.to_one:
                raise ApiError(400, "PGRST118", f"A related order on '{t.relation}' is not possible", None,
                               "Ordering by a related table needs a many-to-one or one-to-one relationship")
            inner = self.alias()
            expr, _ = self.field_sql(inner, rel.target, t.field)
            if rel.function is not None:
                sql = f"(SELECT {expr} FROM {qualified(*rel.function)}({a}) AS {inner} LIMIT 1)"
            else:
                on = " AND ".join(f"{inner}.{ident(tc)} = {a}.{ident(sc)}" for sc, tc in rel.pairs)
                sql = f"(SELECT {expr} FROM {qualified(rel.target.schema, rel.target.name)} AS {inner} WHERE {on})"
        else:
            sql, _ = self.field_sql(a, table, t.field)
        sql += " DESC" if t.desc else " ASC"
        if t.nulls:
            sql += f" NULLS {t.nulls.upper()}"
        return sql

    def check_paths(self) -> None:
        """A filter, order or limit on an embedding the select does not have (PGRST108)."""
        for mapping in (self.query.conditions, self.query.order, self.query.limit, self.query.offset):
            for path in mapping:
                if path not in self._used_paths:
                    known = max(n for n in range(len(path) + 1) if path[:n] in self._used_paths)
                    name = path[known]
                    raise ApiError(400, "PGRST108", f"Cannot apply filter because '{name}' is not an embedded "
                                   "resource in this request", None,
                                   f"Verify that '{name}' is included in the 'select' query parameter.")

    # -- the statement around a read ----------------------------------------------------------------

    def read(self, shape: ReadShape, items: list[SelectItem], *, prefix: str = "") -> Statement:
        """``prefix`` is a ``WITH …`` clause (a write's CTE) the source refers to."""
        node = self.node(shape.table, shape.source, items, (), limit=shape.limit, offset=shape.offset)
        total = "NULL::bigint"
        if shape.count == "exact":
            counted = self.node(shape.table, shape.source, items, (), for_count=True)
            total = f"(SELECT count(*) FROM ({counted}) AS pgrst_c)"
        self.check_paths()
        sql = (f"{prefix}SELECT {total} AS total, count(*) AS page, "
               f"coalesce(json_agg(pgrst_t), '[]')::text AS body, {RESPONSE_SETTINGS} FROM ({node}) AS pgrst_t")
        return Statement(sql, self.params.values)

    def count_query(self, shape: ReadShape, items: list[SelectItem]) -> Statement:
        """The statement EXPLAIN estimates for count=planned/estimated (its own parameters)."""
        sub = Builder(self.cache, self.query)
        counted = sub.node(shape.table, shape.source, items, (), for_count=True)
        return Statement(f"SELECT 1 FROM ({counted}) AS pgrst_c", sub.params.values)


# -- read templates -------------------------------------------------------------------------------

SLOT_OPS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte"})
TEMPLATES_KEPT = 512


class ReadTemplates:
    """Built read statements kept by query *shape*, so ``items?id=eq.5`` and ``items?id=eq.6``
    share one build (building an embedding costs more than the rest of a request in Python).

    A top-level filter ``col=[not.]eq|neq|gt|gte|lt|lte.value`` on a plain column is a slot: its
    SQL is ``col <op> CAST($n AS type)`` whatever the value. On a miss the statement is built once
    with a unique marker in each slot, and each marker must come back as exactly one parameter and
    nowhere in the SQL text; otherwise the shape is not kept and every request builds its own. A
    hit copies the parameters and puts the request's values in the slots. Entries name the schema
    cache they were built against, so a reloaded cache never meets an old template."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[Any, ...], tuple[SchemaCache, str, list[Any], tuple[int, ...]]] = OrderedDict()

    def read(self, cache: SchemaCache, query: Query, shape: ReadShape) -> Statement:
        top = query.conditions.get((), [])
        values: list[str] = []
        masked: list[object] = []   # the conditions, slots without their values: the shape
        at: list[int] = []   # positions in ``top`` that are slots
        for i, c in enumerate(top):
            if (isinstance(c, Filter) and c.op in SLOT_OPS and c.quantifier is None and not c.field.path
                    and isinstance(c.value, str)):
                values.append(c.value)
                at.append(i)
                masked.append((c.field, c.op, c.negate))  # the filter without its value (a slot)
            else:
                masked.append(c)
        conditions = query.conditions
        key = (id(cache), shape.table.schema, shape.table.name, shape.source, shape.limit, shape.offset, shape.count,
               query.select_text, tuple(masked),
               tuple((p, tuple(v)) for p, v in conditions.items() if p != ()) if len(conditions) > 1 else (),
               tuple((p, tuple(v)) for p, v in query.order.items()) if query.order else (),
               tuple(query.limit.items()) if query.limit else (), tuple(query.offset.items()) if query.offset else ())
        kept = self._kept.get(key)
        if kept is not None and kept[0] is cache:
            self._kept.move_to_end(key)
            _, sql, params, slots = kept
            filled = list(params)
            for slot, value in zip(slots, values, strict=True):
                filled[slot] = value
            return Statement(sql, filled)
        markers = [f"\0pgrst-slot-{i}\0" for i in range(len(values))]
        marked = list(top)
        for i, m in zip(at, markers, strict=True):
            marked[i] = dataclasses.replace(top[i], value=m)  # type: ignore[arg-type]
        probe = dataclasses.replace(query, conditions={**query.conditions, (): marked})
        st = Builder(cache, probe).read(shape, probe.select)
        slots = []
        for m in markers:
            found = [i for i, p in enumerate(st.params) if p == m]
            if len(found) != 1 or m in st.sql or any(v == m for v in values):
                return Builder(cache, query).read(shape, query.select)  # not a shape we can keep
            slots.append(found[0])
        self._kept[key] = (cache, st.sql, list(st.params), tuple(slots))
        if len(self._kept) > TEMPLATES_KEPT:
            self._kept.popitem(last=False)
        filled = list(st.params)
        for slot, value in zip(slots, values, strict=True):
            filled[slot] = value
        return Statement(st.sql, filled)


def _array_of(typ: str) -> str:
    return typ if typ.endswith("[]") else typ + "[]"


# -- writes ---------------------------------------------------------------------------------------

def parse_body(raw: bytes, content_type: str = "application/json") -> list[dict[str, Any]] | dict[str, Any]:
    """A write's payload: a JSON object or array of objects, an HTML form (one object of strings) or
    CSV with a header line (``NULL`` is null), as PostgREST takes them. Anything else is PGRST102."""
    if content_type == "text/csv":
        try:
            rows = list(csv.DictReader(io.StringIO(raw.decode())))
        except (UnicodeDecodeError, csv.Error):
            raise body_error("Empty or invalid csv") from None
        if any(None in r or None in r.values() for r in rows):
            raise body_error("All lines of a CSV body must have as many values as the header line")
        return [{k: (None if v == "NULL" else v) for k, v in r.items()} for r in rows]
    if content_type == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw.strip())))
        except (UnicodeDecodeError, ValueError):
            raise body_error("Empty or invalid form body") from None
    if not raw.strip():
        raise body_error("Empty or invalid json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise body_error("Empty or invalid json") from None
    if isinstance(data, dict):
        return data
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        return data
    if isinstance(data, list):
        raise body_error("All object keys must match")
    raise body_error("Empty or invalid json")


def payload_columns(table: TableInfo, rows: list[dict[str, Any]], columns: list[str] | None) -> list[str]:
    """The columns a write touches: ``columns=`` when given, else the keys every object shares."""
    if columns is None:
        keys = list(rows[0].keys()) if rows else []
        first = set(keys)
        if any(set(r.keys()) != first for r in rows[1:]):
            raise body_error("All object keys must match", "Every object of a bulk insert needs the same keys; "
                             "or name the columns with ?columns=")
        columns = keys
    for c in columns:
        if c not in table.columns:
            raise ApiError(400, "PGRST204", f"Could not find the '{c}' column of '{table.name}' in the schema cache",
                           None, "Check the column name, or reload the schema cache if it was just added.")
    return columns


def insert_cte(b: Builder, table: TableInfo, rows: list[dict[str, Any]], columns: list[str], *,
               missing_default: bool, on_conflict: list[str] | None, resolution: str | None,
               update_columns: list[str] | None = None) -> str:
    """``INSERT … SELECT`` from the JSON body (``jsonb_populate_record`` converts each value to its
    column's type), optionally ``ON CONFLICT``; returns the CTE body."""
    target = qualified(table.schema, table.name)
    body = b.params.add(json.dumps(rows))
    if not columns:
        # No column in the payload ({} or [{}, {}]): one all-default row per object.
        sql = f"INSERT INTO {target} AS pgrst_w SELECT FROM jsonb_array_elements(({body})::jsonb)"
    else:
        exprs = []
        for c in columns:
            default = table.columns[c].default
            if missing_default:
                exprs.append(f"CASE WHEN pgrst_e ? {b.params.add(c)} THEN pgrst_r.{ident(c)} "
                             f"ELSE {default or 'NULL'} END")
            else:
                exprs.append(f"pgrst_r.{ident(c)}")
        sql = (f"INSERT INTO {target} AS pgrst_w ({', '.join(ident(c) for c in columns)}) "
               f"SELECT {', '.join(exprs)} FROM jsonb_array_elements(({body})::jsonb) AS pgrst_e, "
               f"LATERAL jsonb_populate_record(NULL::{target}, pgrst_e) AS pgrst_r")
    if resolution is not None:
        keys = on_conflict or list(table.pk)
        if not keys:
            raise ApiError(400, "PGRST100", f"'{table.name}' has no primary key: name the conflict columns with "
                                            "?on_conflict=", None, None)
        for k in keys:
            if k not in table.columns:
                raise _unknown_column(table, k)
        conflict = f" ON CONFLICT ({', '.join(ident(k) for k in keys)})"
        updates = [c for c in (update_columns or columns)]
        if resolution == "ignore-duplicates" or not updates:
            sql += conflict + " DO NOTHING"
        else:
            sql += conflict + " DO UPDATE SET " + ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in updates)
    return sql + " RETURNING pgrst_w.*"


def _write_filter(b: Builder, table: TableInfo) -> list[str]:
    """The WHERE of an update or delete: its filters, and for ``limit``/``offset`` (PostgREST's
    limited update/delete) the rows chosen by ``order`` through their ctid."""
    limit, offset = b.query.limit.get(()), b.query.offset.get((), 0)
    if limit is None and not offset:
        return [b.condition("pgrst_w", table, c, {}) for c in b.query.conditions.get((), [])]
    order = b.query.order.get((), [])
    if not order:
        raise ApiError(400, "PGRST109", "A 'limit' was applied without an explicit 'order'", None,
                       "Apply an 'order' using unique column(s)")
    if table.kind not in ("r", "p"):
        raise ApiError(400, "PGRST100", "limit/offset on an update or delete needs a table, not a view")
    inner = [b.condition("pgrst_l", table, c, {}) for c in b.query.conditions.get((), [])]
    chosen = f"SELECT pgrst_l.ctid FROM {qualified(table.schema, table.name)} AS pgrst_l"
    if inner:
        chosen += " WHERE " + " AND ".join(inner)
    chosen += " ORDER BY " + ", ".join(b.order_sql("pgrst_l", table, t) for t in order)
    if limit is not None:
        chosen += f" LIMIT {int(limit)}"
    if offset:
        chosen += f" OFFSET {int(offset)}"
    return [f"pgrst_w.ctid = ANY(ARRAY({chosen}))"]


def update_cte(b: Builder, table: TableInfo, row: dict[str, Any], columns: list[str]) -> str:
    target = qualified(table.schema, table.name)
    body = b.params.add(json.dumps(row))
    sets = ", ".join(f"{ident(c)} = pgrst_r.{ident(c)}" for c in columns)
    wheres = _write_filter(b, table)
    sql = (f"UPDATE {target} AS pgrst_w SET {sets} "
           f"FROM jsonb_populate_record(NULL::{target}, ({body})::jsonb) AS pgrst_r")
    if wheres:
        sql += " WHERE " + " AND ".join(wheres)
    return sql + " RETURNING pgrst_w.*"


def delete_cte(b: Builder, table: TableInfo) -> str:
    wheres = _write_filter(b, table)
    sql = f"DELETE FROM {qualified(table.schema, table.name)} AS pgrst_w"
    if wheres:
        sql += " WHERE " + " AND ".join(wheres)
    return sql + " RETURNING pgrst_w.*"


# -- functions ------------------------------------------------------------------------------------

def call_source(b: Builder, fn: FunctionInfo, args: dict[str, Any]) -> str:
    """``FROM jsonb_to_record($n) AS pgrst_args(a int, …), LATERAL fn(a := pgrst_args.a, …)``: named
    arguments, each converted to its parameter's type by Postgres from the JSON value."""
    if fn.single_json or ("" in args and fn.json_arg is not None):
        # The body is the one json argument (an unnamed parameter, or Prefer: params=single-object).
        body = b.params.add(args.get("", "{}"))
        return f"{qualified(fn.schema, fn.name)}(CAST({body} AS {fn.args[0].type}))"
    given = [a for a in fn.args if a.name in args]
    named = ", ".join(f"{'VARIADIC ' if a.variadic else ''}{ident(a.name)} := pgrst_args.{ident(a.name)}"
                      for a in given)
    call = f"{qualified(fn.schema, fn.name)}({named})"
    if not given:
        return call
    record = b.params.add(json.dumps({a.name: args[a.name] for a in given}))
    defs = ", ".join(f"{ident(a.name)} {a.type}" for a in given)
    return f"jsonb_to_record(({record})::jsonb) AS pgrst_args({defs}), LATERAL {call}"


def legacy_target_warning(query: Query) -> str | None:
    """PostgREST's ``Warning`` when a filter, order or limit names an aliased embedding by its
    relation (still served, as ``_embed_path`` does, but deprecated upstream); None otherwise."""
    keys = [k for m in (query.conditions, query.order, query.limit, query.offset) for k in m if k]
    if not keys:
        return None  # nothing names an embedding: the common case costs this line
    found: list[str] = []
    todo: list[tuple[Path, list[SelectItem]]] = [((), query.select)]
    while todo:
        path, items = todo.pop()
        for e in items:
            if not isinstance(e, Embed):
                continue
            by_key, by_relation = path + (e.key,), path + (e.relation,)
            if e.alias and e.alias != e.relation and not any(k[:len(by_key)] == by_key for k in keys) and any(
                    k[:len(by_relation)] == by_relation for k in keys):
                found.append(f"`{e.relation}` to `{e.alias}`")
                by_key = by_relation
            todo.append((by_key, e.select))
    if not found:
        return None
    return ('299 Lakelet "Embedded resource was referenced by relation name even though it has an alias. This is '
            "deprecated and will stop working in a future release. Update " + ", ".join(found)
            + ' in query string filters, orders or limits."')
