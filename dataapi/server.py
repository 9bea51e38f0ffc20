"""The Data API's HTTP face: ``http://HOST:PORT/<branch>/<database>/rest/v1/<table | rpc/fn>``.

A handler is parse → call → respond. Parse: path, headers, ``Prefer``, query string into typed
values (``request.py``), before anything wakes. Call: wake the branch and get its pool and schema
cache (``databases.py``), open one transaction, set PostgREST's request settings and ``SET LOCAL
ROLE`` in one statement, run the pre-request function, run the action (``actions.py``), commit
(or roll back for ``Prefer: tx=rollback``, a failed singular check or a plan request) — all of it
pipelined on a ``pgwire`` connection, one round trip for a read. Respond: status,
``Content-Range``, ``Preference-Applied``, ``response.headers``/``response.status`` a function
set, body as JSON, a single object, CSV, or the statement's EXPLAIN.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from prometheus_client import CollectorRegistry

from dataapi import actions, pgwire
from dataapi.auth import Authenticator, Identity
from dataapi.cors import CorsPolicy
from dataapi.databases import Computes, Databases, PoolSettings, Unreachable
from dataapi.errors import ApiError, from_postgres
from dataapi.http_server import BodyTooLarge, HttpServer, Request, Response
from dataapi.metrics import UNKNOWN, DataAPIMetrics
from dataapi.openapi import describe
from dataapi.query import ident, legacy_target_warning
from dataapi.request import (
    MEDIA_BINARY,
    MEDIA_CSV,
    MEDIA_JSON,
    MEDIA_OBJECT,
    MEDIA_OPENAPI,
    MEDIA_TEXT,
    RAW_MEDIA,
    RESERVED,
    PlanRequest,
    looks_like_filter,
    negotiate,
    parse_plan,
    parse_prefer,
    parse_query,
    parse_range,
)
from dataapi.schema import FunctionInfo

log = logging.getLogger("lakelet.dataapi")



SETTINGS = ("search_path", "request.jwt.claims", "request.method", "request.path", "request.headers",
            "request.cookies")
# PostgREST's request settings and ``SET LOCAL ROLE`` as one statement with bound values (the same
# text every request, so prepared once per connection); the superuser check runs, as the admin
# role, before the switch. $1 is the role, $2… the settings in the order above.
SETTINGS_SQL = ("SELECT lakelet_dataapi.check_role($1::text), "
                + ", ".join(f"set_config('{name}', ${n}::text, true)" for n, name in enumerate(SETTINGS, 2))
                + ", set_config('role', $1::text, true)")
# A read of one statement needs no BEGIN/COMMIT: the settings and the statement go out before one
# Sync, which makes them one implicit transaction (the protocol's, ended by the Sync), read only
# from its first statement on — two statements fewer for Postgres per request. Its isolation level
# is the session's default, which the pool sets to READ COMMITTED when it connects.
SETTINGS_READ_SQL = SETTINGS_SQL + ", set_config('transaction_read_only', 'on', true)"
BEGIN_READ = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY"
BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"


def single_object_function(schema: str, name: str, overloads: tuple[FunctionInfo, ...]) -> FunctionInfo:
    """``Prefer: params=single-object``: the overload taking one json/jsonb parameter."""
    fits = [f for f in overloads if f.json_arg is not None]
    if len(fits) == 1:
        return fits[0]
    raise ApiError(404, "PGRST202", f"Could not find the function {schema}.{name} with a single json or jsonb "
                   "parameter in the schema cache", None,
                   "Prefer: params=single-object passes the whole body as the function's one json/jsonb argument")


class Planned(Exception):  # a result, not a failure: it carries the plan out of the transaction
    """The EXPLAIN output of the action's statement; raised so the transaction rolls back."""

    def __init__(self, plan: PlanRequest, rows: list[dict[str, str | None]]) -> None:
        self.plan = plan
        values = [next(iter(r.values())) or "" for r in rows]
        self.body = values[0] if plan.format == "json" and values else "\n".join(values)

    def response(self, method: str) -> Response:
        return Response(status=200, headers={"Content-Type": self.plan.content_type},
                            body=None if method == "HEAD" else self.body.encode())


class Explaining:
    """A connection stand-in for a plan request: the action's first statement is sent as
    ``EXPLAIN (…)`` with the same bound values, and its output ends the action (``Planned``)."""

    def __init__(self, conn: pgwire.Connection, plan: PlanRequest) -> None:
        self.conn = conn
        self.plan = plan

    async def fetch(self, sql: str, *params: Any) -> list[dict[str, str | None]]:
        options = ", ".join([f"FORMAT {self.plan.format.upper()}", *(o.upper() for o in self.plan.options)])
        raise Planned(self.plan, await self.conn.fetch(f"EXPLAIN ({options}) {sql}", *params))

    fetchrow = fetchval = fetch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


MAX_CONTENT_LOCATION = 4096
HEADERS_KEPT = 256


@dataclass(frozen=True)
class DataAPIConfig:
    schemas: tuple[str, ...] = ("public",)
    anon_role: str = ""
    jwt_secret: str = ""
    jwt_role_claim: str = ".role"
    max_rows: int | None = None
    pre_request: str = ""
    pool_size: int = 10
    idle_timeout: float = 60.0
    plan_enabled: bool = False      # PostgREST's db-plan-enabled: the EXPLAIN media type
    jwt_aud: str = ""               # PostgREST's jwt-aud: tokens must name this audience
    # PostgREST's db-tx-end: how each request's transaction ends. ``commit``/``rollback`` ignore
    # ``Prefer: tx=``; the ``-allow-override`` forms honour it (the default: tx=rollback works).
    tx_end: str = "commit-allow-override"
    # PostgREST's server-cors-allowed-origins: the origins whose pages may read the answers
    # (comma-separated); empty = every origin (dataapi/cors.py).
    cors_origins: str = ""
    max_body_bytes: int = 10 * 1024 * 1024
    max_url_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Route:
    branch: str
    database: str
    kind: str        # "root", "table", "rpc"
    name: str = ""


@functools.lru_cache(maxsize=1024)
def parse_route(path: str) -> Route:
    """``/<branch>/<database>/rest/v1/[<table> | rpc/<function>]`` (kept: paths repeat)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[2:4] == ["rest", "v1"] and all(parts[:2]):
        rest = parts[4:]
        if rest in ([], [""]):
            return Route(parts[0], parts[1], "root")
        if len(rest) == 1 and rest[0]:
            return Route(parts[0], parts[1], "table", rest[0])
        if len(rest) == 2 and rest[0] == "rpc" and rest[1]:
            return Route(parts[0], parts[1], "rpc", rest[1])
    raise ApiError(404, "PGRST125", "Invalid path specified in request URL")


def response_overrides(result: actions.Result) -> None:
    """Read ``response.headers`` / ``response.status`` as the request's functions left them; an
    invalid value is PGRST111/PGRST112 — raised inside the transaction, so it rolls back."""
    if result.response_headers:
        try:
            extra = json.loads(result.response_headers)
        except ValueError:
            extra = None
        if not isinstance(extra, list) or not all(isinstance(item, dict) for item in extra):
            raise ApiError(500, "PGRST111", "response.headers guc must be a JSON array composed of objects with "
                           "a single key and a string value")
        for item in extra:
            for k, v in item.items():
                result.override_headers[str(k)] = str(v)
    if result.response_status:
        value = result.response_status.strip()
        if not value.isdigit() or not 100 <= int(value) <= 599:
            raise ApiError(500, "PGRST112", "response.status guc must be a valid status code")
        result.override_status = int(value)


def error_response(e: ApiError) -> Response:
    """PostgREST's error response: the JSON body, and ``Proxy-Status`` naming the error's code (the
    server's own name first, as RFC 9209 asks)."""
    headers = {"Content-Type": "application/json; charset=utf-8", "Proxy-Status": f"Lakelet; error={e.code}",
               **e.headers}
    return Response(status=e.status, body=e.body(), headers=headers)


def internal_error() -> Response:
    return error_response(ApiError(500, "PGRSTX00", "Internal error in the Data API", None,
                                   "See the lakelet log for the cause"))


def to_csv(body: str, scalar_name: str) -> str:
    """Rows as CSV with a header line; a function's set of scalars is one column named after it."""
    rows = json.loads(body)
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if not isinstance(rows[0], dict):
        rows = [{scalar_name: r} for r in rows]
    keys = list(rows[0].keys())
    writer.writerow(keys)
    for r in rows:
        writer.writerow(["" if r.get(k) is None else (json.dumps(r[k]) if isinstance(r[k], dict | list)
                                                     else r[k]) for k in keys])
    return out.getvalue()


_PLAIN_QUERY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~=&")


def content_location_query(request: Request) -> str:
    """The query string as ``Content-Location`` carries it: parameters sorted, each name and value
    percent-encoded. A query string of unreserved characters alone is already encoded, so it is
    only split and sorted (the common case, and cheaper than decoding and quoting again)."""
    raw = request.query_string
    if _PLAIN_QUERY.issuperset(raw):
        pairs = [p.split("=") for p in raw.split("&") if p]
        if all(len(p) == 2 for p in pairs):  # an "=" in a value, or none at all, is encoded below
            return "&".join(f"{k}={v}" for k, v in sorted(pairs))
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(request.query.items()))


class DataAPI:
    def __init__(self, computes: Computes, config: DataAPIConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = DataAPIMetrics(registry)
        self.auth = Authenticator(config.jwt_secret, config.anon_role or None, config.jwt_role_claim, config.jwt_aud)
        self.cors = CorsPolicy.parse(config.cors_origins)
        self.databases = Databases(computes, config.schemas,
                                   PoolSettings(size=config.pool_size, idle_timeout=config.idle_timeout))
        self._server: HttpServer | None = None
        self.port: int | None = None
        self._headers_kept: dict[Any, tuple[str, bool]] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> None:
        """One handler takes every path (the Data API routes itself; ``http.py``). ``sock``: a
        listening socket to accept on (a worker's, inherited from ``lakelet up``) instead of
        binding HOST:PORT."""
        self.databases.start()
        self._server = HttpServer(self.handle, internal_error, max_url=self.config.max_url_bytes,
                                  max_headers=64 * 1024, max_body=self.config.max_body_bytes)
        await self._server.start(host, port, sock)
        self.port = self._server.port

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None
        await self.databases.close()

    # -- the handler ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        request.branch = UNKNOWN
        headers = request.headers
        if "Origin" in headers:  # a cross-origin request from a web page
            preflight = self.cors.preflight(request.method, headers)
            if preflight is not None:
                self.metrics.observe(request.branch, request.method, 200, time.perf_counter() - started)
                return preflight
        try:
            try:
                response: Response = await self._handle(request)
            except Unreachable:
                # The compute went away under us before any statement was sent (suspended,
                # restarted, moved): ask the control plane again, which wakes it, and retry once.
                self.databases.forget(parse_route(request.path).branch)
                response = await self._handle(request)
        except ApiError as e:
            response = error_response(e)
        except BodyTooLarge:
            response = error_response(ApiError(413, "PGRST102", "Request body too large", None,
                                               f"Send at most {self.config.max_body_bytes} bytes per request"))
        except Exception:
            log.exception("data API request failed", extra={"path": request.path})
            response = internal_error()
        if "Origin" in headers:
            self.cors.decorate(headers, response)
        self.metrics.observe(request.branch, request.method, response.status, time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> Response:
        route = parse_route(request.path)
        method = request.method
        if method == "OPTIONS":
            return await self._options(request, route)
        schema = self._schema(request, method)
        if self.auth.jwks_url is not None:
            await self.auth.refresh(request.headers.get("Authorization"))
        identity = self.auth.authenticate(request.headers.get("Authorization"))
        if route.kind == "root":
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
            media = negotiate(request.headers.get("Accept"), openapi=True)
            async with self.databases.use(route.branch, route.database) as db:
                assert db.cache is not None
                doc = describe(db.cache, schema, request.origin(), request.path)
            return Response(body=json.dumps(doc).encode(), content_type="application/openapi+json"
                            if media == MEDIA_OPENAPI else "application/json", charset="utf-8",
                            headers={"Content-Profile": schema} if len(self.config.schemas) > 1 else None)
        accept = request.headers.get("Accept")
        plan = parse_plan(accept) if self.config.plan_enabled else None
        media = (plan.for_media or MEDIA_JSON) if plan is not None else negotiate(accept)
        prefs = parse_prefer(request.headers.getall("Prefer", []))
        if prefs.tx is not None and not self.config.tx_end.endswith("-allow-override"):
            prefs = dataclasses.replace(prefs, tx=None)  # not honoured, so not in Preference-Applied
        range_ = parse_range(request.headers.get("Range")) if method in ("GET", "HEAD") else None
        params = [(k, v) for k, v in request.query.items()]
        if route.kind == "rpc" and method not in ("GET", "HEAD", "POST"):
            raise ApiError(405, "PGRST101", f"Cannot use the {method} method on RPC")
        if route.kind == "table" and method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
        query = parse_query(params) if route.kind == "table" or method == "POST" else None
        raw = await request.read() if method in ("POST", "PUT", "PATCH") else b""
        ctype = (request.content_type or "application/json").lower()
        if raw and ctype not in ("application/json", "application/vnd.pgrst.object+json", "text/plain",
                                 "application/octet-stream", "application/x-www-form-urlencoded", "text/csv"):
            raise ApiError(415, "PGRST107", f"Content-Type not acceptable: {ctype}", None,
                           "Send the body as application/json")
        body_type = ctype if ctype in ("application/x-www-form-urlencoded", "text/csv") else "application/json"
        async with self.databases.use(route.branch, route.database, len(raw)) as db:
            request.branch = route.branch
            cache = db.cache
            assert cache is not None and db.pool is not None
            fn = None
            args: dict[str, Any] = {}
            table = None
            if route.kind == "rpc":
                overloads = cache.functions.get((schema, route.name), ())
                if method == "POST" and prefs.params == "single-object":
                    fn = single_object_function(schema, route.name, overloads)
                    args = {"": actions.json_body_text(raw)}
                elif method == "POST" and len(overloads) == 1 and overloads[0].single_json:
                    fn = overloads[0]  # fn(json): the whole body is the one argument
                    args = {"": actions.json_body_text(raw)}
                elif method == "POST":
                    args = actions.rpc_args_from_body(raw)
                    fn = cache.function(schema, route.name, frozenset(args))
                else:
                    known = {a.name for f in overloads for a in f.args}
                    arg_names = frozenset(k for k, v in params if k in known or (
                        k not in RESERVED and "." not in k and not looks_like_filter(v)))
                    query = parse_query(params, arg_names)
                    args = dict(query.rpc_args)
                    fn = cache.function(schema, route.name, frozenset(args))
                    for arg in fn.args:
                        if arg.variadic and arg.name in args:  # ?v=1&v=2 → VARIADIC v := {1,2}
                            args[arg.name] = [v for k, v in params if k == arg.name]
            else:
                table = cache.table(schema, route.name)
            assert query is not None
            ctx = actions.Context(cache, schema, query, prefs, self.config.max_rows, range_,
                                  media == MEDIA_OBJECT)
            readonly = method in ("GET", "HEAD") or (fn is not None and fn.volatility in ("i", "s"))
            try:
                async with db.pool.acquire() as conn:
                    result = await self._run(conn, request, identity, schema, readonly, ctx, route, method,
                                             table, fn, args, raw, body_type, plan)
            except Planned as p:
                return p.response(method)
            except pgwire.PgError as e:
                raise from_postgres(e, authenticated=identity.authenticated) from None
            except pgwire.ConnectFailed as e:
                raise Unreachable(503, "PGRST000", "Could not connect with the database", str(e),
                               "The branch's compute may be restarting; retry the request") from None
            except (OSError, TimeoutError) as e:  # pgwire.ConnectionLost too
                raise ApiError(503, "PGRST001", "Database connection lost", str(e), "Retry the request") from None
            except (ValueError, OverflowError) as e:
                raise ApiError(400, "PGRST100", "A value could not be sent to the database", str(e),
                               "Check the filter and body values") from None
        response = self._respond(request, method, media, prefs, ctx, result, route)
        self.databases.note_response(route.branch, response.content_length or 0)
        return response

    @staticmethod
    def _raw(method: str, media: str, status: int, headers: dict[str, str], body: str,
             scalar: bool) -> Response:
        """``text/plain`` / ``application/octet-stream``: the values of the one selected column,
        concatenated (bytea values as their bytes), as PostgREST serves binary output."""
        rows = json.loads(body)
        values = [rows] if scalar else rows
        if not scalar and any(not isinstance(r, dict) or len(r) != 1 for r in rows):
            raise ApiError(406, "PGRST502", f"{media} requested but more than one column was selected")
        data = b""
        for row in values:
            value = next(iter(row.values())) if isinstance(row, dict) else row
            if value is None:
                continue
            if media == MEDIA_BINARY and isinstance(value, str) and value.startswith("\\x"):
                try:
                    data += bytes.fromhex(value[2:])
                    continue
                except ValueError:
                    pass
            data += (value if isinstance(value, str) else json.dumps(value)).encode()
        headers["Content-Type"] = media + ("; charset=utf-8" if media == MEDIA_TEXT else "")
        return Response(status=status, headers=headers, body=None if method == "HEAD" else data)

    def _schema(self, request: Request, method: str) -> str:
        header = "Accept-Profile" if method in ("GET", "HEAD") else "Content-Profile"
        wanted = request.headers.get(header)
        if wanted is None:
            return self.config.schemas[0]
        if wanted not in self.config.schemas:
            raise ApiError(406, "PGRST106", f"Invalid schema: {wanted}", None,
                           "Only the following schemas are exposed: " + ", ".join(self.config.schemas))
        return wanted

    async def _options(self, request: Request, route: Route) -> Response:
        """``OPTIONS`` as PostgREST answers it: the methods the resource takes, read from the schema
        cache (a table, view or function that is not there is its usual 404)."""
        allow = "OPTIONS,GET,HEAD"
        if route.kind != "root":
            schema = self._schema(request, "OPTIONS")
            async with self.databases.use(route.branch, route.database) as db:
                request.branch = route.branch
                assert db.cache is not None
                if route.kind == "table":
                    allow = db.cache.table(schema, route.name).allow()
                else:
                    fn = (db.cache.functions.get((schema, route.name), ())
                          or (db.cache.function(schema, route.name, frozenset()),))[0]
                    allow = "OPTIONS,POST" if fn.volatility == "v" else "OPTIONS,GET,HEAD,POST"
        return Response(status=200, headers={"Allow": allow})

    async def _run(self, conn: pgwire.Connection, request: Request, identity: Identity, schema: str,
                   readonly: bool, ctx: actions.Context, route: Route, method: str, table: Any, fn: Any,
                   args: dict[str, Any], raw: bytes, body_type: str, plan: PlanRequest | None = None,
                   ) -> actions.Result:
        """The request's transaction. ``BEGIN``, the settings and the pre-request function are
        deferred: they go out in one write with the action's first statement. A read whose action
        is one statement needs no ``BEGIN``/``COMMIT`` at all: it is the implicit transaction of
        that one write (``SETTINGS_READ_SQL``) — one round trip in all (a read-only transaction
        changes nothing, so committing before the response is checked is the same as rolling
        back). Writes commit after their checks, in a second round trip."""
        headers_json, has_cookie = self._headers_json(request)
        path = ("/" if route.kind == "table" else "/rpc/") + route.name
        one_write = plan is None and readonly and ctx.prefs.count in (None, "exact")
        if not one_write:
            conn.defer(BEGIN_READ if readonly else BEGIN_WRITE)
        conn.defer(SETTINGS_READ_SQL if one_write else SETTINGS_SQL,
                   (identity.role, f"{ident(schema)}, public", identity.claims_text, method, path, headers_json,
                    json.dumps(dict(request.cookies)) if has_cookie else "{}"))
        if ctx.prefs.timezone:
            conn.defer("SELECT set_config('timezone', $1::text, true)", (ctx.prefs.timezone,))
        if self.config.pre_request:
            conn.defer(f"SELECT {'.'.join(ident(p) for p in self.config.pre_request.split('.'))}()")
        if plan is not None:
            conn = Explaining(conn, plan)  # type: ignore[assignment]  # the action's statement is explained
        try:
            if fn is not None:
                result = await actions.call(conn, ctx, fn, args)
            elif method in ("GET", "HEAD"):
                result = await actions.read(conn, ctx, table)
            elif method == "POST":
                result = await actions.insert(conn, ctx, table, raw, body_type)
            elif method == "PUT":
                result = await actions.upsert_put(conn, ctx, table, raw, body_type)
            elif method == "PATCH":
                result = await actions.update(conn, ctx, table, raw, body_type)
            else:
                result = await actions.delete(conn, ctx, table)
            response_overrides(result)
            if ctx.singular and not result.scalar and result.page != 1:
                raise ApiError(406, "PGRST116", "JSON object requested, multiple (or no) rows returned",
                               f"The result contains {result.page} rows", None)
            if conn.in_transaction:
                await conn.execute("ROLLBACK" if (ctx.prefs.tx or self.config.tx_end.split("-")[0]) == "rollback"
                                   else "COMMIT")
            return result
        finally:
            conn = getattr(conn, "conn", conn)
            conn.discard()  # statements never sent (the action failed before its first one)
            if conn.status != "I" and not conn.broken:
                await conn.execute("ROLLBACK")

    def _headers_json(self, request: Request) -> tuple[str, bool]:
        """``request.headers`` as PostgREST sets it (lower-case names, JSON), and whether a cookie
        came. A client sends the same headers request after request, so the JSON is kept by the
        raw header block (bounded; cleared when full)."""
        raw = request.raw_headers
        kept = self._headers_kept.get(raw)
        if kept is None:
            headers = {k.lower(): v for k, v in request.headers.items()}
            kept = (json.dumps(headers), "cookie" in headers)
            if len(self._headers_kept) >= HEADERS_KEPT:
                self._headers_kept.clear()
            self._headers_kept[raw] = kept
        return kept

    def _respond(self, request: Request, method: str, media: str, prefs: Any, ctx: actions.Context,
                 result: actions.Result, route: Route) -> Response:
        headers: dict[str, str] = dict(result.headers)
        status = result.status
        applied = []
        # Echoed only where PostgREST applies them: return= on writes to a table, resolution= on an
        # insert into a table with a key (or on_conflict), missing= on inserts and updates,
        # max-affected= on updates, deletes and functions.
        writing = route.kind == "table" and method not in ("GET", "HEAD")
        resolves = method == "POST" and route.kind == "table" and bool(
            ctx.query.on_conflict or ctx.cache.table(ctx.schema, route.name).pk)
        for name, value, applies in (
                ("return", prefs.return_, writing), ("count", prefs.count, True),
                ("resolution", prefs.resolution, resolves),
                ("missing", prefs.missing, writing and method in ("POST", "PATCH")),
                ("tx", prefs.tx, True), ("handling", prefs.handling, True), ("timezone", prefs.timezone, True),
                ("max-affected", prefs.max_affected, route.kind == "rpc" or method in ("PATCH", "DELETE"))):
            if value is not None and applies:
                applied.append(f"{name}={value}")
        if applied:
            headers["Preference-Applied"] = ", ".join(applied)
        if warning := legacy_target_warning(ctx.query):
            headers["Warning"] = warning
        if len(self.config.schemas) > 1:  # the schema served, as PostgREST names it when there is a choice
            headers["Content-Profile"] = ctx.schema
        if method in ("GET", "HEAD") and route.kind == "table":
            ordered = content_location_query(request)
            if len(ordered) <= MAX_CONTENT_LOCATION:  # a 5,000-value in-list would break clients' header limits
                headers["Content-Location"] = f"/{route.name}" + (f"?{ordered}" if ordered else "")
        total = "*" if result.total is None else str(result.total)
        if route.kind == "table" and method == "POST":
            headers["Content-Range"] = f"*/{total}"
        elif result.scalar:
            headers["Content-Range"] = "0-0/1" if prefs.count == "exact" else "0-0/*"
        else:
            if (method in ("GET", "HEAD") and result.total is not None and result.offset > 0
                    and result.offset >= result.total):
                raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                               f"An offset of {result.offset} was requested, but there are only "
                               f"{result.total} rows.", None, {"Content-Range": f"*/{total}"})
            if result.page:
                headers["Content-Range"] = f"{result.offset}-{result.offset + result.page - 1}/{total}"
            else:
                headers["Content-Range"] = f"*/{total}"
            reading = method in ("GET", "HEAD") or route.kind == "rpc"
            if reading and result.total is not None and (result.offset > 0
                                                         or result.offset + result.page < result.total):
                status = 206
        headers.update(result.override_headers)
        if result.override_status is not None:
            status = result.override_status
        body = result.body
        if body is None or status == 204:
            return Response(status=status, headers=headers)
        if ctx.singular and not result.scalar:
            rows = json.loads(body)
            body = json.dumps(rows[0]) if rows else "null"
        if media in RAW_MEDIA:
            return self._raw(method, media, status, headers, body, result.scalar)
        if media == MEDIA_CSV and not result.scalar:
            text = to_csv(body, route.name)
            ctype = "text/csv"
        else:
            text = body
            ctype = MEDIA_OBJECT if ctx.singular else "application/json"
        headers["Content-Type"] = f"{ctype}; charset=utf-8"
        data = text.encode()
        if method == "HEAD":
            return Response(status=status, headers=headers)
        return Response(status=status, body=data, headers=headers)
