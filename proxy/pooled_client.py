"""The client side of a transaction-pooled session.

The client's bytes are read as whole messages (header, and the payload only of the few kinds the
pooler rewrites: Parse, Bind, Describe, Close, and the first word of a simple query). With no
backend, what needs none is answered here (Sync, Flush, a Close of its own statement, DEALLOCATE,
DISCARD ALL, Terminate); anything else takes a backend from the pool — at once when an idle one
with the client's settings is there, else after waiting in line (``pool_timeout``). The backend
stays with the client until ReadyForQuery ``I`` with nothing outstanding (``pooled_server``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from proxy import codec
from proxy.errors import PoolTimeout, SessionError
from proxy.pooled_server import (
    E_BIND,
    E_CLOSE,
    E_CLOSE_HIDDEN,
    E_DESCRIBE,
    E_EXECUTE,
    E_PARSE,
    E_PARSE_HIDDEN,
    E_QUERY,
    E_SYNC,
    E_SYNTH,
    IDLE,
    PooledServer,
)
from proxy.statements import (
    CLOSE_COMPLETE,
    DEALLOCATE,
    DISCARD,
    PARSE_COMPLETE,
    RESET,
    SET,
    ServerStatement,
    Settings,
    close_statement,
    command_complete,
    deallocate_target,
    first_word,
    is_discard_all,
    is_transaction_scoped_set,
    rename_bind,
    split_cstring,
    tracked_set,
    with_setting,
)

if TYPE_CHECKING:
    from proxy.pooler import Pool

log = logging.getLogger("lakelet.proxy")

_LEN = struct.Struct("!i")
MAX_MESSAGE = 1 << 30
READ_AHEAD_LIMIT = 256 * 1024  # buffered client bytes while waiting for a backend, before reading pauses
_IDLE_READY = codec.ready_for_query(b"I")
_SYNC = (E_SYNC, None, None)
_BIND = (E_BIND, None, None)
_EXECUTE = (E_EXECUTE, None, None)
_DESCRIBE = (E_DESCRIBE, None, None)
_CLOSE = (E_CLOSE, None, None)
_PARSE_UNNAMED = (E_PARSE, None, None)
_QUERY = (E_QUERY, None, None)
_MAYBE_SPECIAL = frozenset(b"sSrRdD \t\r\n-/")
_EXTENDED = frozenset(b"PBDEC")


class PooledClient(asyncio.Protocol):
    __slots__ = ("transport", "pool", "buf", "server", "statements", "settings", "startup", "pid", "secret",
                 "done", "waiting", "discarding", "active", "closed")

    def __init__(self, pool: Pool, transport: asyncio.Transport, settings: Settings, pid: int, secret: int) -> None:
        self.transport = transport
        self.pool = pool
        self.buf = bytearray()
        self.server: PooledServer | None = None
        self.statements: dict[bytes, ServerStatement] = {}
        self.settings = settings
        self.startup = settings  # what DISCARD ALL returns to
        self.pid = pid
        self.secret = secret
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting: asyncio.Task[None] | None = None
        self.discarding = False  # after an error the pooler raised itself: ignore until Sync, as Postgres does
        self.active = False  # counted as a session (holding or waiting for a backend)
        self.closed = False

    async def run(self) -> None:
        """Until the client's connection is gone."""
        await asyncio.shield(self.done)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - swapped in
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiting is None:
            self._pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiting is not None:
            self.waiting.cancel()
        server = self.server
        if server is not None:
            self.server = None
            server.client = None
            if not server.expect and server.status == IDLE and not server.skipping:
                self.pool.release(server)
            else:  # gone mid-transaction or mid-query: Postgres rolls back when the backend closes
                self.pool.abandon(server)
        self._deactivate()
        self.pool.client_left(self)
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        if self.server is not None and not self.server.closed:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and not self.server.closed:
            self.server.transport.resume_reading()

    # -- lending ------------------------------------------------------------------------------------

    def _activate(self) -> None:
        if not self.active:
            self.active = True
            self.pool.activate()

    def _deactivate(self) -> None:
        if self.active:
            self.active = False
            self.pool.deactivate()

    def _lend(self, server: PooledServer) -> None:
        server.client = self
        server.skipping = False
        self.server = server
        self._activate()

    def release(self, server: PooledServer) -> None:
        """The transaction ended (ReadyForQuery I, nothing outstanding): the backend goes back."""
        server.client = None
        self.server = None
        self._deactivate()
        self.pool.release(server)

    def server_lost(self, server: PooledServer) -> None:
        """The backend closed while lent (its FATAL, if any, was passed on): so does the client."""
        if self.server is server:
            self.server = None
            server.client = None
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def fatal(self, code: str, message: str, hint: str | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(codec.fatal(code, message, hint=hint))
        self._close()

    async def _acquire(self) -> None:
        try:
            server = await self.pool.acquire(self.settings)
        except PoolTimeout as e:
            # Not fatal: the client held no backend, so it is outside any transaction; what it sent
            # fails as one error (up to its Sync), as a query Postgres refused would.
            self.waiting = None
            self._deactivate()
            self._refuse(codec.error_response("ERROR", e.sqlstate, str(e), hint=e.hint))
            return
        except SessionError as e:
            self.waiting = None
            self.fatal(e.sqlstate, str(e), e.hint)
            return
        except (ConnectionError, OSError) as e:
            self.waiting = None
            self.fatal("08006", f"could not open a backend for the pool: {e}")
            return
        except asyncio.CancelledError:
            self.waiting = None
            return
        self.waiting = None
        if self.closed:
            self.pool.release(server)
            return
        self._lend(server)
        self.transport.resume_reading()
        self._pump()

    def _refuse(self, error: bytes) -> None:
        buf = self.buf
        if len(buf) >= 5 and buf[0] in (0x51, 0x46):  # a simple query or function call: one answer
            del buf[:1 + _LEN.unpack_from(buf, 1)[0]]
            self.transport.write(error + _IDLE_READY)
        else:  # extended protocol: the error, then nothing until Sync
            self.transport.write(error)
            self.discarding = True
        self.transport.resume_reading()
        self._pump()

    # -- statements and settings (called by the backend's side) ---------------------------------------

    def tracked(self, server: PooledServer, change: tuple[str, bytes | None]) -> None:
        """A SET/RESET the client ran alone outside a transaction succeeded: keep it."""
        self.settings = with_setting(self.settings, *change)
        if server.applied is not None:
            server.applied = self.settings

    def forget(self, name: bytes, stmt: ServerStatement) -> None:
        """The client's Parse failed (or was skipped after an error): the name does not exist."""
        if self.statements.get(name) is stmt:
            del self.statements[name]

    # -- the client's messages ---------------------------------------------------------------------------

    def _pump(self) -> None:
        buf = self.buf
        n = len(buf)
        pos = 0
        server = self.server
        out: list[bytes] = []
        unpack = _LEN.unpack_from
        while pos + 5 <= n:
            length = unpack(buf, pos + 1)[0]
            if length < 4 or length > MAX_MESSAGE:
                self.fatal("08P01", f"invalid message length {length}")
                return
            end = pos + 1 + length
            if end > n:
                break
            kind = buf[pos]
            if kind == 0x58:  # Terminate: answered by closing, as Postgres does
                if out and server is not None:
                    server.transport.write(b"".join(out))
                buf.clear()
                self._close()
                return
            if self.discarding:
                if kind != 0x53:
                    pos = end
                    continue
                self.discarding = False
            if server is None:
                if self._answer_idle(kind, buf, pos, end):
                    pos = end
                    continue
                server = self.pool.take_idle(self.settings)
                if server is None:
                    self._activate()
                    self.transport.pause_reading()
                    self.waiting = asyncio.ensure_future(self._acquire())
                    break
                self._lend(server)
            self._forward(server, kind, buf, pos, end, out)
            pos = end
        if pos:
            del buf[:pos]
        if out and server is not None:
            server.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if len(buf) > READ_AHEAD_LIMIT and self.waiting is None:
            self.transport.pause_reading()

    def _synth(self, server: PooledServer | None, data: bytes) -> None:
        """An answer of the pooler's own, in its place among the backend's answers."""
        if server is not None and server.expect:
            server.expect.append((E_SYNTH, data, None))
        else:
            self.transport.write(data)

    def _answer_idle(self, kind: int, buf: bytearray, pos: int, end: int) -> bool:
        """What needs no backend, answered with none held (so nothing is outstanding)."""
        if kind == 0x53:  # Sync
            self.transport.write(_IDLE_READY)
            return True
        if kind == 0x48:  # Flush
            return True
        if kind == 0x43:  # Close
            if buf[pos + 5] == 0x53:  # a statement
                self.statements.pop(bytes(buf[pos + 6:end - 1]), None)
            self.transport.write(CLOSE_COMPLETE)  # a portal cannot exist outside a transaction
            return True
        if kind == 0x51 and buf[pos + 5] in _MAYBE_SPECIAL:
            answer = self._special_query(bytes(buf[pos + 5:end - 1]), IDLE)
            if answer is not None:
                self.transport.write(answer)
                return True
        return False

    def _special_query(self, sql: bytes, status: int) -> bytes | None:
        """DEALLOCATE of the client's statements and DISCARD ALL outside a transaction, answered
        here (the backend's other statements must survive them); None: not one of those."""
        word = first_word(sql)
        if word == DEALLOCATE:
            target = deallocate_target(sql)
            if target == b"ALL":
                self.statements.clear()
                return command_complete("DEALLOCATE ALL") + codec.ready_for_query(bytes([status]))
            if target is not None and self.statements.pop(target, None) is not None:
                return command_complete("DEALLOCATE") + codec.ready_for_query(bytes([status]))
        elif word == DISCARD and status == IDLE and is_discard_all(sql):
            self.statements.clear()
            self.settings = self.startup
            return command_complete("DISCARD ALL") + _IDLE_READY
        return None

    def _prepare(self, server: PooledServer, stmt: ServerStatement, out: list[bytes],
                 client_name: bytes | None) -> None:
        expect = server.expect
        for old in server.prepared.add(stmt.name):
            out.append(close_statement(old))
            expect.append((E_CLOSE_HIDDEN, None, old))
        out.append(stmt.parse)
        expect.append((E_PARSE, client_name, stmt) if client_name is not None else (E_PARSE_HIDDEN, None, stmt.name))

    def _forward(self, server: PooledServer, kind: int, buf: bytearray, pos: int, end: int, out: list[bytes]) -> None:
        expect = server.expect
        if server.skipping:  # Postgres ignores all of it until Sync: pass it on unread
            out.append(bytes(buf[pos:end]))
            if kind == 0x53:
                server.skipping = False
                expect.append(_SYNC)
            return
        if kind in _EXTENDED:  # an implicit transaction is open on the backend until the Sync's ReadyForQuery
            server.status = 0
        if kind == 0x42:  # Bind
            payload = bytes(buf[pos + 5:end])
            portal_end = payload.index(0) + 1
            stmt_end = payload.index(0, portal_end) + 1
            if stmt_end - portal_end > 1:
                stmt = self.statements.get(payload[portal_end:stmt_end - 1])
                if stmt is not None:
                    if not server.prepared.use(stmt.name):
                        self._prepare(server, stmt, out, None)
                    out.append(rename_bind(payload, portal_end, stmt_end, stmt.name))
                    expect.append(_BIND)
                    return
            out.append(bytes(buf[pos:end]))
            expect.append(_BIND)
        elif kind == 0x45:  # Execute
            out.append(bytes(buf[pos:end]))
            expect.append(_EXECUTE)
        elif kind == 0x53:  # Sync
            out.append(bytes(buf[pos:end]))
            expect.append(_SYNC)
        elif kind == 0x50:  # Parse
            payload = bytes(buf[pos + 5:end])
            name, at = split_cstring(payload)
            word = first_word(payload[at:at + 300])
            if word in (SET, RESET) and not is_transaction_scoped_set(payload[at:at + 64]):
                server.applied = None  # a SET the pooler cannot follow: reset before the next client
            if not name:
                out.append(bytes(buf[pos:end]))
                expect.append(_PARSE_UNNAMED)
                return
            if name in self.statements:
                self._synth(server, codec.error_response(
                    "ERROR", "42P05", f'prepared statement "{name.decode(errors="replace")}" already exists'))
                self.discarding = True
                return
            stmt = self.pool.pooler.names.get(payload[at:])
            self.statements[name] = stmt
            if server.prepared.use(stmt.name):
                self._synth(server, PARSE_COMPLETE)
            else:
                self._prepare(server, stmt, out, name)
        elif kind == 0x44:  # Describe
            if buf[pos + 5] == 0x53 and end - pos > 7:
                stmt = self.statements.get(bytes(buf[pos + 6:end - 1]))
                if stmt is not None:
                    if not server.prepared.use(stmt.name):
                        self._prepare(server, stmt, out, None)
                    out.append(codec.encode_message(b"D", b"S" + stmt.name + b"\x00"))
                    expect.append(_DESCRIBE)
                    return
            out.append(bytes(buf[pos:end]))
            expect.append(_DESCRIBE)
        elif kind == 0x43:  # Close
            if buf[pos + 5] == 0x53 and end - pos > 7:  # a named statement: it stays prepared on the backend
                self.statements.pop(bytes(buf[pos + 6:end - 1]), None)
                self._synth(server, CLOSE_COMPLETE)
                return
            out.append(bytes(buf[pos:end]))
            expect.append(_CLOSE)
        elif kind == 0x51:  # Query
            track = None
            if buf[pos + 5] in _MAYBE_SPECIAL:
                sql = bytes(buf[pos + 5:end - 1])
                word = first_word(sql)
                if word in (SET, RESET):
                    if server.status == IDLE and not expect:
                        track = tracked_set(sql)
                    if track is None and not is_transaction_scoped_set(sql):
                        server.applied = None
                elif word in (DEALLOCATE, DISCARD):
                    answer = self._special_query(sql, server.status)
                    if answer is not None:
                        self._synth(server, answer)
                        return
                    if word == DISCARD:  # DISCARD ALL in a transaction: Postgres' error; other DISCARDs run
                        server.applied = None
            out.append(bytes(buf[pos:end]))
            expect.append(_QUERY if track is None else (E_QUERY, track, None))
        elif kind == 0x46:  # FunctionCall: answered up to ReadyForQuery, like a query
            out.append(bytes(buf[pos:end]))
            expect.append(_QUERY)
        else:  # Flush, CopyData, CopyDone, CopyFail: no answer of their own
            out.append(bytes(buf[pos:end]))

