"""The Data API's own Postgres connection: the extended query protocol, pipelined.

Why not asyncpg here: a Data API request is a transaction — ``BEGIN``, PostgREST's settings and
``SET LOCAL ROLE``, the statement, ``COMMIT`` — and asyncpg waits for each of those before sending
the next (it has no pipelining), so a one-row read cost three round trips where its floor costs
one. This module sends them all in one write and reads all the answers in one go: Parse (once per
connection per statement text) / Bind / Execute for each, then one Sync. The server runs them in
order and, after an error, skips to the Sync — so a failed statement never lets a later one run.

Every parameter is bound (text format; arrays as array literals) and every result is text: the
Data API's statements return JSON text and counts, so no type codecs are needed. Named prepared
statements are cached per connection (the plan is reused; PostgreSQL replans when a table
changes), least recently used ones closed past ``STATEMENT_CACHE``.

Three layers, as in asyncpg: the codec (bytes in/out, no I/O: ``encode_*`` and ``Decoder``), the
``Connection`` (an ``asyncio.Protocol`` running one exchange at a time), and the ``Pool``.
Authentication: ``trust`` only — the pool connects to the compute's private Unix socket as its
admin role, which the compute trusts (storage/postgres.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STATEMENT_CACHE = 256
PROTOCOL_VERSION = 196608  # 3.0

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!ci")


# -- errors ---------------------------------------------------------------------------------------

class PgError(Exception):
    """An ErrorResponse from the server, with the fields ``errors.from_postgres`` reads."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get("C", "XX000")
        self.message = fields.get("M", "")
        self.detail = fields.get("D")
        self.hint = fields.get("H")
        self.severity = fields.get("V") or fields.get("S", "ERROR")
        super().__init__(f"{self.sqlstate}: {self.message}")


class ConnectionLost(ConnectionError):
    """The server closed the connection, or it broke mid-exchange."""


class ConnectFailed(ConnectionError):
    """A new connection could not be opened (the socket, or the server refused the startup)."""


# -- the codec (sans-I/O) -------------------------------------------------------------------------

def _msg(kind: bytes, payload: bytes) -> bytes:
    return kind + _I32.pack(len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError("a statement or name may not contain a NUL byte")
    return data + b"\0"


def encode_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_VERSION) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def text_value(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format: ``None`` is NULL, lists are array literals with
    every element quoted (so no element can read as NULL or split the array)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, list | tuple):
        parts = []
        for item in value:
            if item is None:
                parts.append("NULL")
            else:
                raw = (text_value(item) or b"").decode()
                parts.append('"' + raw.replace("\\", "\\\\").replace('"', '\\"') + '"')
        return ("{" + ",".join(parts) + "}").encode()
    return str(value).encode()


def encode_parse(name: str, sql: str) -> bytes:
    return _msg(b"P", _cstr(name) + _cstr(sql) + _I16.pack(0))


def encode_bind(statement: str, params: Sequence[Any]) -> bytes:
    out = [b"\0", _cstr(statement), _I16.pack(0), _I16.pack(len(params))]
    for p in params:
        data = p.encode() if type(p) is str else text_value(p)
        if data is None:
            out.append(b"\xff\xff\xff\xff")
        else:
            out.append(_I32.pack(len(data)))
            out.append(data)
    out.append(b"\0\0")
    return _msg(b"B", b"".join(out))


def encode_describe_statement(name: str) -> bytes:
    return _msg(b"D", b"S" + _cstr(name))


def encode_close_statement(name: str) -> bytes:
    return _msg(b"C", b"S" + _cstr(name))


EXECUTE = _msg(b"E", b"\0" + _I32.pack(0))
SYNC = _msg(b"S", b"")
TERMINATE = _msg(b"X", b"")


def decode_error_fields(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def decode_row_description(payload: bytes) -> tuple[str, ...]:
    count = _I16.unpack_from(payload, 0)[0]
    names, pos = [], 2
    for _ in range(count):
        end = payload.index(b"\0", pos)
        names.append(payload[pos:end].decode())
        pos = end + 1 + 18  # table oid, column number, type oid, size, modifier, format
    return tuple(names)


def decode_data_row(payload: bytes) -> list[str | None]:
    count = _I16.unpack_from(payload, 0)[0]
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        size = _I32.unpack_from(payload, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos:pos + size].decode())
            pos += size
    return values


class Decoder:
    """Splits the byte stream into (type, payload) messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        pos, buf, end = 0, self._buf, len(self._buf)
        while end - pos >= 5:
            kind, size = _HEADER.unpack_from(buf, pos)
            if end - pos < size + 1:
                break
            out.append((kind, bytes(buf[pos + 5:pos + 1 + size])))
            pos += 1 + size
        if pos:
            del buf[:pos]
        return out


# -- one connection -------------------------------------------------------------------------------

@dataclass(eq=False)
class _Prepared:
    name: str
    sql: str
    columns: tuple[str, ...] = ()
    ready: bool = False
    bind_execute: bytes = b""   # Bind + Execute without parameters (BEGIN, COMMIT), built once


@dataclass
class _Result:
    statement: _Prepared
    rows: list[list[str | None]] = field(default_factory=list)


@dataclass
class _Exchange:
    results: list[_Result | None]   # None: a statement whose rows nobody reads (BEGIN, the settings)
    parses: deque[_Prepared]
    describes: deque[_Prepared]
    done: asyncio.Future[str]
    error: PgError | None = None
    current: int = 0


Query = tuple[str, Sequence[Any]]


class Connection(asyncio.Protocol):
    """One server connection. ``defer`` queues statements (results discarded, errors raised) that
    go out with the next ``fetch``/``execute``; ``tail`` queues one to go right after it. So a
    request's ``BEGIN`` + settings + statement + ``COMMIT`` is one write and one read."""

    def __init__(self) -> None:
        self.status = "I"                 # ReadyForQuery: I idle, T in a transaction, E failed one
        self.broken = False               # lost, or left mid-exchange: never reused
        self.last_used = time.monotonic()
        self._transport: asyncio.Transport | None = None
        self._decoder = Decoder()
        self._statements: dict[str, _Prepared] = {}
        self._counter = 0
        self._deferred: list[Query] = []
        self._tail: list[Query] = []
        self._exchange: _Exchange | None = None
        self._startup: asyncio.Future[None] | None = None
        self._startup_error: PgError | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._transport = None
        lost = ConnectionLost(f"the database connection closed{f': {exc}' if exc else ''}")
        if self._startup is not None and not self._startup.done():
            # A refused startup (FATAL: no such database, too many clients…) says why, then closes.
            self._startup.set_exception(self._startup_error or lost)
        if self._exchange is not None and not self._exchange.done.done():
            self._exchange.done.set_exception(lost)

    def data_received(self, data: bytes) -> None:
        for kind, payload in self._decoder.feed(data):
            if kind == b"2":  # BindComplete: the commonest message, nothing to do
                continue
            self._message(kind, payload)

    def _message(self, kind: bytes, payload: bytes) -> None:
        ex = self._exchange
        if kind == b"D" and ex is not None:
            result = ex.results[ex.current]
            if result is not None:
                result.rows.append(decode_data_row(payload))
        elif kind in (b"C", b"I") and ex is not None:
            ex.current += 1
        elif kind == b"1" and ex is not None:
            ex.parses.popleft().ready = True
        elif kind == b"T" and ex is not None:
            ex.describes.popleft().columns = decode_row_description(payload)
        elif kind == b"n" and ex is not None:
            ex.describes.popleft().columns = ()
        elif kind == b"E":
            fields = decode_error_fields(payload)
            if ex is not None:
                ex.error = ex.error or PgError(fields)
            elif self._startup is not None and not self._startup.done():
                self._startup_error = PgError(fields)
        elif kind == b"Z":
            self.status = chr(payload[0])
            if ex is not None:
                self._exchange = None
                if not ex.done.done():
                    ex.done.set_result(self.status)
            elif self._startup is not None and not self._startup.done():
                if self._startup_error is not None:
                    self._startup.set_exception(self._startup_error)
                else:
                    self._startup.set_result(None)
        elif kind == b"R":
            code = _I32.unpack_from(payload, 0)[0]
            if code != 0 and self._startup is not None and not self._startup.done():
                self._startup.set_exception(PgError({
                    "C": "28000", "M": f"the server asked for authentication (method {code}); the Data API "
                    "connects only over the compute's trusted Unix socket"}))
        # t (ParameterDescription), 2/3 (Bind/CloseComplete), S, K, N, A: nothing to do

    # connecting

    @classmethod
    async def connect(cls, path: str, user: str, database: str, application_name: str,
                      timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        conn = cls()
        await asyncio.wait_for(loop.create_unix_connection(lambda: conn, path), timeout)
        conn._startup = loop.create_future()
        assert conn._transport is not None
        # READ COMMITTED whatever the database's or role's default: a Data API read runs as the
        # implicit transaction of one pipeline, which takes the session's default level.
        conn._transport.write(encode_startup({"user": user, "database": database, "client_encoding": "UTF8",
                                              "application_name": application_name,
                                              "default_transaction_isolation": "read committed"}))
        try:
            await asyncio.wait_for(conn._startup, timeout)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def terminate(self) -> None:
        self.broken = True
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.write(TERMINATE)
            self._transport.close()
            self._transport = None

    # queries

    @property
    def in_transaction(self) -> bool:
        return self.status != "I" or bool(self._deferred)

    def defer(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._deferred.append((sql, params))

    def tail(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._tail.append((sql, params))

    def discard(self) -> None:
        self._deferred, self._tail = [], []

    async def fetch(self, sql: str, *params: Any) -> list[dict[str, str | None]]:
        result = await self._pipeline([*self._deferred, (sql, params), *self._tail], len(self._deferred))
        columns = result.statement.columns
        return [dict(zip(columns, row, strict=True)) for row in result.rows]

    async def fetchrow(self, sql: str, *params: Any) -> dict[str, str | None] | None:
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *params: Any) -> str | None:
        row = await self.fetchrow(sql, *params)
        return None if row is None else next(iter(row.values()), None)

    async def execute(self, sql: str, *params: Any) -> None:
        await self._pipeline([*self._deferred, (sql, params)], len(self._deferred))

    async def _pipeline(self, queries: Sequence[Query], wanted: int) -> _Result:
        """Send every query and one Sync in one write; wait for ReadyForQuery; raise the first
        error. Returns the result of query number ``wanted``."""
        self._deferred, self._tail = [], []
        if self._transport is None or self.broken:
            raise ConnectionLost("the database connection is closed")
        if self._exchange is not None:
            raise RuntimeError("one exchange at a time on a connection")
        out: list[bytes] = []
        results: list[_Result | None] = []
        parses: deque[_Prepared] = deque()
        describes: deque[_Prepared] = deque()
        for i, (sql, params) in enumerate(queries):
            prepared = self._statements.pop(sql, None)
            if prepared is None or not (prepared.ready or prepared in parses):
                self._counter += 1
                prepared = _Prepared(f"l{self._counter}", sql)
                out.append(encode_parse(prepared.name, sql))
                out.append(encode_describe_statement(prepared.name))
                parses.append(prepared)
                describes.append(prepared)
            self._statements[sql] = prepared  # most recently used last
            if params:
                out.append(encode_bind(prepared.name, params))
                out.append(EXECUTE)
            else:
                if not prepared.bind_execute:
                    prepared.bind_execute = encode_bind(prepared.name, ()) + EXECUTE
                out.append(prepared.bind_execute)
            results.append(_Result(prepared) if i == wanted else None)
        while len(self._statements) > STATEMENT_CACHE:
            old_sql = next(iter(self._statements))
            old = self._statements.pop(old_sql)
            if old.ready:
                out.insert(0, encode_close_statement(old.name))
        out.append(SYNC)
        ex = _Exchange(results, parses, describes, asyncio.get_running_loop().create_future())
        self._exchange = ex
        self._transport.write(b"".join(out))
        try:
            await ex.done
        except asyncio.CancelledError:
            self.terminate()  # the answers are still coming: the connection's state is unknown
            raise
        finally:
            self.last_used = time.monotonic()
        for prepared in ex.parses:  # a Parse the server skipped after an error: not prepared
            if self._statements.get(prepared.sql) is prepared:
                del self._statements[prepared.sql]
        if ex.error is not None:
            raise ex.error
        result = results[wanted]
        assert result is not None
        return result


# -- the pool -------------------------------------------------------------------------------------

class Pool:
    """Up to ``size`` connections, opened on demand (none kept at start), the most recently used
    handed out first so the rest go idle and are closed after ``idle_timeout``."""

    def __init__(self, path: str, user: str, database: str, *, size: int, idle_timeout: float,
                 connect_timeout: float, application_name: str) -> None:
        self._connect_args = (path, user, database, application_name, connect_timeout)
        self.idle_timeout = idle_timeout
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._all: set[Connection] = set()
        self._generation = 0
        self._born: dict[Connection, int] = {}
        self.closed = False

    def acquire(self) -> _Lease:
        return _Lease(self)

    async def _get(self) -> Connection:
        if self.closed:
            raise ConnectionLost("the Data API's pool for this database is closed")
        await self._slots.acquire()
        try:
            conn = self._take()
            if conn is None:
                try:
                    conn = await Connection.connect(*self._connect_args)
                except (OSError, TimeoutError, PgError) as e:
                    raise ConnectFailed(str(e)) from None
                self._all.add(conn)
                self._born[conn] = self._generation
            return conn
        except BaseException:
            self._slots.release()
            raise

    def _put(self, conn: Connection) -> None:
        self._release(conn)
        self._slots.release()

    def _take(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.broken and now - conn.last_used < self.idle_timeout:
                return conn
            self._drop(conn)
        return None

    def _release(self, conn: Connection) -> None:
        if (conn.broken or conn.in_transaction or self.closed or conn._exchange is not None
                or self._born.get(conn) != self._generation):
            self._drop(conn)
        else:
            self._idle.append(conn)
        self.prune()

    def _drop(self, conn: Connection) -> None:
        conn.terminate()
        self._all.discard(conn)
        self._born.pop(conn, None)

    def prune(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (the oldest are at the front)."""
        now = time.monotonic()
        while self._idle and now - self._idle[0].last_used >= self.idle_timeout:
            self._drop(self._idle.pop(0))

    def expire(self) -> None:
        """After a schema reload: close idle connections now and busy ones when released, so no
        statement prepared against the old shape of a table is reused."""
        self._generation += 1
        for conn in self._idle:
            self._drop(conn)
        self._idle.clear()

    def close(self) -> None:
        self.closed = True
        for conn in list(self._all):
            self._drop(conn)
        self._idle.clear()


class _Lease:
    """``async with pool.acquire() as conn`` (a class, not a generator: it is on every request)."""

    __slots__ = ("_pool", "_conn")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        self._conn = await self._pool._get()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._pool._put(self._conn)
            self._conn = None


__all__ = ["ConnectFailed", "Connection", "ConnectionLost", "PgError", "Pool"]
