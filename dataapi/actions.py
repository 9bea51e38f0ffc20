"""What each kind of request does inside its one transaction: read, insert/upsert, update, delete,
call a function. Each action plans its statement(s) from the request and the schema cache (through
``query.Builder``), runs them on the connection the server opened the transaction on, and returns a
``Result`` the server turns into a response. No HTTP here, no connection handling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from dataapi.errors import ApiError, body_error
from dataapi.pgwire import Connection
from dataapi.query import (
    Builder,
    ReadShape,
    ReadTemplates,
    Statement,
    call_source,
    delete_cte,
    insert_cte,
    parse_body,
    payload_columns,
    qualified,
    update_cte,
)
from dataapi.request import Column, Embed, Field, Filter, Logic, Preferences, Query, SelectItem, Star
from dataapi.schema import FunctionInfo, SchemaCache, TableInfo


@dataclass
class Result:
    status: int
    body: str | None               # JSON text (array, or a scalar/object for functions)
    page: int = 0                  # rows in the body
    total: int | None = None       # counted total, when asked
    offset: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    response_headers: str | None = None   # response.headers as a function left it
    response_status: str | None = None
    override_headers: dict[str, str] = field(default_factory=dict)   # parsed from response.headers
    override_status: int | None = None                                 # parsed from response.status
    scalar: bool = False           # the body is one value, not an array of rows


@dataclass
class Context:
    cache: SchemaCache
    schema: str
    query: Query
    prefs: Preferences
    max_rows: int | None
    range_: tuple[int, int | None] | None
    singular: bool


Row = dict[str, str | None]   # a result row, every value as text


async def _fetch(conn: Connection, st: Statement) -> Row:
    row = await conn.fetchrow(st.sql, *st.params)
    assert row is not None, "a read statement returns one row"
    return row


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _result_from_row(row: Row, status: int, offset: int = 0) -> Result:
    return Result(status, row["body"], int(row["page"] or 0), _int(row["total"]), offset,
                  response_headers=row["response_headers"], response_status=row["response_status"])


async def _planned_count(conn: Connection, st: Statement) -> int:
    plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + st.sql, *st.params)
    data = json.loads(plan) if isinstance(plan, str) else plan
    return int(data[0]["Plan"]["Plan Rows"])


def _page_bounds(ctx: Context) -> tuple[int | None, int]:
    q = ctx.query
    offset = q.offset.get((), 0)
    limit = q.limit.get(())
    if ctx.range_ is not None:
        lower, rlimit = ctx.range_
        offset = offset or lower
        if rlimit is not None:
            limit = rlimit if limit is None else min(limit, rlimit)
    if ctx.max_rows is not None:
        limit = ctx.max_rows if limit is None else min(limit, ctx.max_rows)
    return limit, offset


async def _count(conn: Connection, b: Builder, ctx: Context, shape: ReadShape,
                 items: list[SelectItem], row: Row) -> int | None:
    mode = ctx.prefs.count
    if mode == "exact":
        return int(row["total"] or 0)
    if mode in ("planned", "estimated"):
        planned = await _planned_count(conn, b.count_query(shape, items))
        if mode == "estimated" and ctx.max_rows is not None and planned < ctx.max_rows:
            exact = Builder(ctx.cache, ctx.query)
            st = exact.read(ReadShape(shape.table, shape.source, None, 0, "exact"), items)
            return int((await _fetch(conn, st))["total"] or 0)
        return planned
    return None


# -- read -----------------------------------------------------------------------------------------

READS = ReadTemplates()   # built reads kept by shape (query.ReadTemplates)


async def read(conn: Connection, ctx: Context, table: TableInfo) -> Result:
    limit, offset = _page_bounds(ctx)
    shape = ReadShape(table, qualified(table.schema, table.name), limit, offset,
                      "exact" if ctx.prefs.count == "exact" else None)
    if ctx.prefs.count in (None, "exact"):
        row = await _fetch(conn, READS.read(ctx.cache, ctx.query, shape))
        result = _result_from_row(row, 200, offset)
        result.total = int(row["total"] or 0) if ctx.prefs.count == "exact" else None
        return result
    b = Builder(ctx.cache, ctx.query)
    row = await _fetch(conn, b.read(shape, ctx.query.select))
    result = _result_from_row(row, 200, offset)
    result.total = await _count(conn, b, ctx, shape, ctx.query.select, row)
    return result


# -- writes ---------------------------------------------------------------------------------------

def _returning_items(ctx: Context, table: TableInfo) -> list[SelectItem]:
    """What a write's statement reads back: the select= tree for return=representation (or a
    singular response), else only the primary key (for Location and the row count)."""
    if ctx.prefs.return_ == "representation" or ctx.singular:
        return ctx.query.select
    return [Column(Field(c)) for c in table.pk] or [Star()]


async def _mutate(conn: Connection, ctx: Context, table: TableInfo, b: Builder, cte: str,
                  status: int) -> Result:
    items = _returning_items(ctx, table)
    shape = ReadShape(table, "pgrst_mut", None, 0)
    st = b.read(shape, items, prefix=f"WITH pgrst_mut AS ({cte}) ")
    row = await _fetch(conn, st)
    result = _result_from_row(row, status)
    if ctx.prefs.count == "exact":
        result.total = result.page
    if ctx.prefs.max_affected is not None and ctx.prefs.handling == "strict" and result.page > ctx.prefs.max_affected:
        raise ApiError(400, "PGRST124", "Query result exceeds max-affected preference constraint",
                       f"The query affects {result.page} rows", None)
    if ctx.prefs.return_ == "headers-only" and table.pk and result.page:
        first = json.loads(result.body or "[]")[0]
        query = "&".join(f"{k}=eq.{quote(str(first.get(k)), safe='')}" for k in table.pk)
        result.headers["Location"] = f"/{table.name}?{query}"
    if ctx.prefs.return_ != "representation" and not ctx.singular:
        result.body = None
    return result


def _rows(raw: bytes, content_type: str) -> list[dict[str, Any]]:
    data = parse_body(raw, content_type)
    return [data] if isinstance(data, dict) else data


async def insert(conn: Connection, ctx: Context, table: TableInfo, raw: bytes,
                 content_type: str = "application/json") -> Result:
    rows = _rows(raw, content_type)
    nested = _nested_keys(ctx, table, rows)
    if nested:
        return await nested_insert(conn, ctx, table, rows)
    columns = payload_columns(table, rows, ctx.query.columns)
    b = Builder(ctx.cache, ctx.query)
    cte = insert_cte(b, table, rows, columns, missing_default=ctx.prefs.missing == "default",
                     on_conflict=ctx.query.on_conflict, resolution=ctx.prefs.resolution)
    return await _mutate(conn, ctx, table, b, cte, 201)


async def upsert_put(conn: Connection, ctx: Context, table: TableInfo, raw: bytes,
                     content_type: str = "application/json") -> Result:
    """PUT: one row, addressed by ``eq`` filters on every primary key column, inserted or replaced."""
    q = ctx.query
    if () in q.limit or () in q.offset or ctx.range_ is not None:
        raise ApiError(400, "PGRST114", "limit/offset querystring parameters are not allowed for PUT")
    filters = q.conditions.get((), [])
    pk_values: dict[str, str] = {}
    for f in filters:
        if isinstance(f, Filter) and f.op == "eq" and not f.negate and not f.field.path and f.quantifier is None:
            pk_values[f.field.name] = str(f.value)
        else:
            pk_values = {}
            break
    if not table.pk or set(pk_values) != set(table.pk) or len(filters) != len(table.pk):
        raise ApiError(405, "PGRST105", "Filters must include all and only primary key columns with 'eq' operators")
    data = parse_body(raw, content_type)
    if isinstance(data, list):
        if len(data) != 1:
            raise body_error("PUT payload must contain a single row", "Send one JSON object")
        data = data[0]
    for k, v in pk_values.items():
        if k not in data or str(data[k]) != v:
            raise ApiError(400, "PGRST115", "Payload values do not match URL in primary key column(s)")
    columns = payload_columns(table, [data], None)
    b = Builder(ctx.cache, ctx.query)
    cte = insert_cte(b, table, [data], columns, missing_default=False, on_conflict=list(table.pk),
                     resolution="merge-duplicates")
    return await _mutate(conn, ctx, table, b, cte, 200)


async def update(conn: Connection, ctx: Context, table: TableInfo, raw: bytes,
                 content_type: str = "application/json") -> Result:
    data = parse_body(raw, content_type)
    if isinstance(data, list):
        if len(data) > 1:
            raise body_error("PATCH payload must be a single object", "Send one JSON object with the new values")
        data = data[0] if data else {}
    columns = payload_columns(table, [data], ctx.query.columns)
    if not columns:
        return Result(204 if ctx.prefs.return_ != "representation" else 200,
                      "[]" if ctx.prefs.return_ == "representation" else None)
    b = Builder(ctx.cache, ctx.query)
    cte = update_cte(b, table, data, columns)
    return await _mutate(conn, ctx, table, b, cte, 200 if ctx.prefs.return_ == "representation" else 204)


async def delete(conn: Connection, ctx: Context, table: TableInfo) -> Result:
    b = Builder(ctx.cache, ctx.query)
    return await _mutate(conn, ctx, table, b, delete_cte(b, table),
                         200 if ctx.prefs.return_ == "representation" else 204)


# -- nested inserts -------------------------------------------------------------------------------

def _embeds(items: list[SelectItem]) -> dict[str, Embed]:
    return {i.key: i for i in items if isinstance(i, Embed)}


def _nested_keys(ctx: Context, table: TableInfo, rows: list[dict[str, Any]]) -> set[str]:
    embeds = _embeds(ctx.query.select)
    keys = {k for r in rows for k in r if k not in table.columns}
    return keys & set(embeds)


async def _insert_one(conn: Connection, ctx: Context, table: TableInfo, row: dict[str, Any]) -> dict[str, Any]:
    cols = [c for c in row if c in table.columns]
    unknown = [c for c in row if c not in table.columns]
    if unknown:
        payload_columns(table, [row], cols + unknown)  # raises PGRST204 naming the first unknown key
    b = Builder(ctx.cache, Query())
    cte = insert_cte(b, table, [{c: row[c] for c in cols}], cols, missing_default=True, on_conflict=None,
                     resolution=None)
    text = await conn.fetchval(f"WITH pgrst_mut AS ({cte}) SELECT row_to_json(pgrst_mut)::text FROM pgrst_mut",
                               *b.params.values)
    return json.loads(text)


async def _insert_tree(conn: Connection, ctx: Context, table: TableInfo, row: dict[str, Any],
                       items: list[SelectItem], depth: int = 0) -> dict[str, Any]:
    """Insert one row and the related rows it carries, in foreign-key order: rows it references
    first (many-to-one), then itself, then rows that reference it (one-to-many) and junction rows."""
    if depth > 8:
        raise body_error("Nested insert too deep", "Nest related rows at most 8 levels")
    embeds = _embeds(items)
    own = {k: v for k, v in row.items() if k not in embeds or k in table.columns}
    later: list[tuple[Any, Embed, Any]] = []
    for key, value in row.items():
        if key not in embeds or key in table.columns:
            continue
        e = embeds[key]
        rel = ctx.cache.relationship(table, e.relation, e.hint)
        if rel.function is not None:
            raise body_error(f"'{key}' is a computed relationship: related rows are inserted through foreign keys only")
        children = value if isinstance(value, list) else [value]
        if not all(isinstance(c, dict) for c in children):
            raise body_error(f"'{key}' must hold an object or an array of objects to insert related rows")
        if rel.kind == "m2o":
            if isinstance(value, list):
                raise body_error(f"'{key}' is a to-one relationship: send one object, not an array")
            parent = await _insert_tree(conn, ctx, rel.target, value, e.select, depth + 1)
            for src, tgt in rel.pairs:
                own[src] = parent[tgt]
        else:
            later.append((rel, e, children))
    inserted = await _insert_one(conn, ctx, table, own)
    for rel, e, children in later:
        for child in children:
            if rel.junction is None:
                linked = dict(child)
                for src, tgt in rel.pairs:
                    linked[tgt] = inserted[src]
                await _insert_tree(conn, ctx, rel.target, linked, e.select, depth + 1)
            else:
                target = await _insert_tree(conn, ctx, rel.target, child, e.select, depth + 1)
                link = {jc: inserted[sc] for jc, sc in rel.source_pairs}
                link.update({jc: target[tc] for jc, tc in rel.target_pairs})
                await _insert_one(conn, ctx, rel.junction, link)
    return inserted


async def nested_insert(conn: Connection, ctx: Context, table: TableInfo,
                        rows: list[dict[str, Any]]) -> Result:
    if not table.pk:
        raise body_error(f"Nested inserts need a primary key on '{table.name}' to read the tree back")
    keys = []
    for row in rows:
        inserted = await _insert_tree(conn, ctx, table, row, ctx.query.select)
        keys.append({k: inserted[k] for k in table.pk})
    match = Logic("or", tuple(Logic("and", tuple(_eq(k, v) for k, v in key.items())) for key in keys))
    read_query = Query(select=ctx.query.select, conditions={(): [match]},
                       order={(): []} if not ctx.query.order else {(): ctx.query.order.get((), [])})
    b = Builder(ctx.cache, read_query)
    row = await _fetch(conn, b.read(ReadShape(table, qualified(table.schema, table.name), None, 0),
                                    ctx.query.select))
    result = _result_from_row(row, 201)
    if ctx.prefs.return_ != "representation":
        result.body = None
    return result


def _eq(column: str, value: Any) -> Filter:
    return Filter(Field(column), "eq", value if isinstance(value, str) else json.dumps(value))


# -- functions ------------------------------------------------------------------------------------

async def call(conn: Connection, ctx: Context, fn: FunctionInfo, args: dict[str, Any]) -> Result:
    b = Builder(ctx.cache, ctx.query)
    source = call_source(b, fn, args)
    if fn.kind == "composite" and fn.result is not None:
        limit, offset = _page_bounds(ctx)
        shape = ReadShape(fn.result, f"(SELECT pgrst_call.* FROM {source} AS pgrst_call)", limit, offset,
                          "exact" if ctx.prefs.count == "exact" else None)
        row = await _fetch(conn, b.read(shape, ctx.query.select))
        result = _result_from_row(row, 200, offset)
        result.total = await _count(conn, b, ctx, shape, ctx.query.select, row)
        if not fn.retset:
            rows = json.loads(result.body or "[]")
            result.body = json.dumps(rows[0]) if rows else "null"
            result.scalar = True
        return result
    b.check_paths()
    if fn.retset:
        limit, offset = _page_bounds(ctx)
        page = (f" LIMIT {int(limit)}" if limit is not None else "") + (f" OFFSET {int(offset)}" if offset else "")
        sql = (f"SELECT NULL::bigint AS total, count(*) AS page, "
               f"coalesce(json_agg(pgrst_s.pgrst_call), '[]')::text AS body, "
               f"nullif(current_setting('response.headers', true), '') AS response_headers, "
               f"nullif(current_setting('response.status', true), '') AS response_status "
               f"FROM (SELECT pgrst_call FROM {source} AS pgrst_call{page}) AS pgrst_s")
        row = await _fetch(conn, Statement(sql, b.params.values))
        return _result_from_row(row, 200, offset)
    sql = (f"SELECT NULL::bigint AS total, 1 AS page, to_json(pgrst_call)::text AS body, "
           f"nullif(current_setting('response.headers', true), '') AS response_headers, "
           f"nullif(current_setting('response.status', true), '') AS response_status "
           f"FROM {source} AS pgrst_call")
    row = await _fetch(conn, Statement(sql, b.params.values))
    if fn.kind == "void":
        result = _result_from_row(row, 204)
        result.body = None
        return result
    result = _result_from_row(row, 200)
    result.body = result.body if result.body is not None else "null"
    result.scalar = True
    return result


def json_body_text(raw: bytes) -> str:
    """A body passed whole to a function of one json argument: checked to be JSON, sent as text."""
    if not raw.strip():
        return "{}"
    try:
        json.loads(raw)
        return raw.decode()
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise body_error("Empty or invalid json") from None


def rpc_args_from_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise body_error("Empty or invalid json", f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise body_error("Empty or invalid json", "A function call takes a JSON object of named arguments")
    return data


__all__ = ["Context", "Result", "call", "delete", "insert", "read", "update", "upsert_put"]
