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
from typing import TYPE_CHECKING, Final

from proxy import codec
from proxy.errors import PoolTimeout, SessionError
from proxy.pooled_server import (
    BIND_ENTRY,
    BLOCK_SERVER,
    CLOSE_ENTRY,
    DESCRIBE_ENTRY,
    E_CLOSE_HIDDEN,
    E_PARSE,
    E_PARSE_HIDDEN,
    E_QUERY,
    E_SYNC,
    E_SYNTH,
    EXECUTE_ENTRY,
    IDLE,
    PARSE_UNNAMED_ENTRY,
    QUERY_ENTRY,
    SYNC_ENTRY,
    Entry,
    PooledServer,
    Waiter,
    read_i32_be,
)
from proxy.statements import (
    CLOSE_COMPLETE,
    DEALLOCATE,
    DISCARD,
    PARSE_COMPLETE,
    PREFIXES,
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
    reported_setting,
    split_cstring,
    tracked_set,
    with_setting,
)

if TYPE_CHECKING:
    from proxy.pooler import Pool

log = logging.getLogger("lakelet.proxy")

MAX_MESSAGE: Final = 1 << 30
READ_AHEAD_LIMIT: Final = 256 * 1024  # buffered client bytes while waiting for a backend, before reading pauses
BLOCK_BUFFER: Final = 1  # reasons reading from the client is paused (PooledClient.blocks); BLOCK_SERVER: pooled_server
_IDLE_READY: Final = codec.ready_for_query(b"I")
_MAYBE_SPECIAL: Final = frozenset(b"sSrRdD \t\r\n-/")
_LETTERS: Final = frozenset(b"sSrRdD")


def _plain_sql(buf: bytes, at: int) -> bool:
    """The statement at ``at`` is surely none of SET, RESET, DEALLOCATE, DISCARD (which the pooler
    reads with ``first_word``): by its first byte, or its first three letters when that is an s, r
    or d. Whitespace or a comment first: not sure. Byte by byte, with no slice made."""
    c = buf[at]
    if c == 0x20 or c == 0x09 or c == 0x0A or c == 0x0D or c == 0x2D or c == 0x2F:  # space, tab, LF, CR, -, /
        return False
    low = c | 0x20  # a letter's lower case (exact for the letters compared here)
    if low != 0x73 and low != 0x72 and low != 0x64:  # s, r, d
        return True
    if at + 2 >= len(buf):
        return True
    b1 = buf[at + 1] | 0x20
    b2 = buf[at + 2] | 0x20
    if low == 0x73:
        return not (b1 == 0x65 and b2 == 0x74)  # set
    if low == 0x72:
        return not (b1 == 0x65 and b2 == 0x73)  # res
    return not (b1 == 0x65 and b2 == 0x61) and not (b1 == 0x69 and b2 == 0x73)  # dea, dis


class PooledClient(Waiter):
    """The protocol of a pooled client's connection (an asyncio protocol by its methods: a plain
    class, so that mypyc can compile it to a native one, see ``proxy/native.py``). It waits in its
    pool's line as a ``Waiter`` (``settings``, ``queued``, ``wait_since``, ``closed``)."""

    # Fields in the order a transaction touches them (compiled, the object's layout follows the
    # assignments below): a client is one of thousands, cold in the cache when its turn comes, and
    # every cache line of it read costs a miss.
    __slots__ = ("server", "held", "asking", "discarding", "active", "buffered", "blocks", "server_paused", "pool",
                 "transport", "buf", "statements", "startup", "pid", "secret", "done")

    def __init__(self, pool: Pool, transport: asyncio.Transport, settings: Settings, pid: int, secret: int) -> None:
        settings = pool.intern(settings)
        super().__init__(settings)
        self.server: PooledServer | None = None
        self.held: bytes | None = None  # what arrived while asking for a backend, kept as received (no copy)
        self.asking = False  # a backend was asked for: the messages wait in ``held`` or ``buf``
        self.discarding = False  # after an error the pooler raised itself: ignore until Sync, as Postgres does
        self.active = False  # counted as a session (holding or waiting for a backend)
        self.buffered = False  # bytes wait in ``buf`` (read without touching it, a separate object)
        # Why reading from the client is paused: one owner of pause/resume, a bit per reason
        # (BLOCK_BUFFER: too much buffered while waiting for a backend; BLOCK_SERVER: the lent
        # backend's write buffer is full). Reading resumes only when no reason is left.
        self.blocks = 0
        self.server_paused = False  # the lent backend's reading paused: the client's writes are full
        self.pool = pool
        # Its ``write`` is looked up at each call, not bound once: a bound method is one more
        # object per client, and one more cache miss per answer.
        self.transport = transport
        self.buf = bytearray()
        self.statements: dict[bytes, ServerStatement] = {}
        self.startup = settings  # what DISCARD ALL returns to
        self.pid = pid
        self.secret = secret
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        """Until the client's connection is gone."""
        await asyncio.shield(self.done)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - swapped in
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server is None and not self.asking and not self.buffered and not self.discarding:
            kind = data[0]
            pool = self.pool
            if (kind == 0x50 or kind == 0x42) and pool.waiting and not pool.idle:
                # A transaction's first Parse or Bind while others wait in line (so no backend is
                # idle): in line at once, the chunk kept as received and read when a backend comes.
                self.held = data
                self.asking = True
                if not self.active:
                    self.active = True
                    pool.activate()
                pool.request(self)
                return
        elif self.buffered or self.asking:
            if self.held is not None:
                self._unhold()
            self.buf += data
            self.buffered = True
            if not self.asking:
                self._pump()
            elif len(self.buf) > READ_AHEAD_LIMIT:
                self._pause()
            return
        # The usual case, whole messages with nothing before them: read in place, and passed on
        # without a copy when none is rewritten.
        pos = self._forward_from(data)
        if pos < len(data) and not self.closed:
            if pos == 0 and self.asking:  # all of it waits for a backend: kept as it is
                self.held = data
                return
            self.buf += data[pos:]
            self.buffered = True
            if self.asking and len(self.buf) > READ_AHEAD_LIMIT:
                self._pause()

    def _unhold(self) -> None:
        held = self.held
        if held is not None:
            self.buf += held
            self.buffered = True
            self.held = None

    def _pause(self) -> None:
        self.block(BLOCK_BUFFER)

    def _resume(self) -> None:
        if self.blocks & BLOCK_BUFFER:
            self.unblock(BLOCK_BUFFER)

    def block(self, reason: int) -> None:
        """Pause reading the client for ``reason`` (idempotent per reason)."""
        if not self.blocks and self.transport is not None:
            self.transport.pause_reading()
        self.blocks |= reason

    def unblock(self, reason: int) -> None:
        """Drop ``reason``; reading resumes once no reason is left."""
        if self.blocks & reason:
            self.blocks &= ~reason
            if not self.blocks and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _unpause_server(self, server: PooledServer) -> None:
        """A backend leaving this client must not stay paused by this client's full socket."""
        if self.server_paused:
            self.server_paused = False
            if not server.closed:
                server.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.queued:  # left in the line, skipped when its turn comes
            self.pool.left_line(self)
        server = self.server
        if server is not None:
            self.server = None
            server.client = None
            self._unpause_server(server)
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
            self.server_paused = True
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        server = self.server
        if server is not None:
            self._unpause_server(server)

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
        server.pending_set = None
        server.plain = True
        server.changed = None
        self.server = server
        if not self.active:
            self.active = True
            self.pool.activate()

    def granted(self, server: PooledServer) -> None:
        """The pool's answer to ``request``: a backend with this client's settings."""
        self.asking = False
        if self.closed:
            self.pool.release(server)
            return
        self._lend(server)
        held = self.held
        if held is not None and not self.buffered:  # the usual case: one chunk waited, passed on as it is
            self.held = None
            pos = self._forward_from(held)
            if pos < len(held) and not self.closed:
                self.buf += held[pos:]
                self.buffered = True
        else:
            self._pump()
        if self.blocks & BLOCK_BUFFER:
            self.unblock(BLOCK_BUFFER)

    def refused(self, error: SessionError) -> None:
        """No backend: past pool_timeout the messages fail (not fatal: the client held no backend,
        so it is outside any transaction, and what it sent fails as one error up to its Sync, as a
        query Postgres refused would); a backend that cannot be opened ends the session."""
        self.asking = False
        self._deactivate()
        if self.closed:
            return
        if isinstance(error, PoolTimeout):
            self._refuse(codec.error_response("ERROR", error.sqlstate, str(error), hint=error.hint))
        else:
            self.fatal(error.sqlstate, str(error), error.hint)

    def cancel_waiting(self) -> bool:
        """A cancel for a client still in line: its query fails as cancelled, never runs."""
        if not self.queued:
            return False
        self.pool.left_line(self)
        self.asking = False
        self._deactivate()
        self._refuse(codec.error_response("ERROR", "57014", "canceling statement due to user request"))
        return True

    def release(self, server: PooledServer) -> None:
        """The transaction ended (ReadyForQuery I, nothing outstanding): the backend goes back."""
        server.client = None
        self.server = None
        if self.server_paused:
            self._unpause_server(server)
        if self.blocks & BLOCK_SERVER:
            self.unblock(BLOCK_SERVER)
        pool = self.pool
        if self.active:
            self.active = False
            pool.deactivate()
        pool.release(server)

    def server_lost(self, server: PooledServer) -> None:
        """The backend closed while lent (its FATAL, if any, was passed on): so does the client."""
        if self.server is server:
            self.server = None
            server.client = None
            self.server_paused = False
            self.unblock(BLOCK_SERVER)
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def fatal(self, code: str, message: str, hint: str | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(codec.fatal(code, message, hint=hint))
        self._close()

    def _refuse(self, error: bytes) -> None:
        if self.held is not None:
            self._unhold()
        buf = self.buf
        if len(buf) >= 5 and buf[0] in (0x51, 0x46):  # a simple query or function call: one answer
            del buf[:1 + int.from_bytes(buf[1:5], "big", signed=True)]
            self.transport.write(error + _IDLE_READY)
        else:  # extended protocol: the error, then nothing until Sync
            self.transport.write(error)
            self.discarding = True
        self._resume()
        self._pump()

    # -- statements and settings (called by the backend's side) ---------------------------------------

    def tracked(self, server: PooledServer, change: tuple[str, bytes | None]) -> None:
        """A SET/RESET the client ran alone outside a transaction succeeded: keep it."""
        self.settings = self.pool.intern(with_setting(self.settings, *change))
        if server.applied is not None:
            server.applied = self.settings

    def statements_stale(self) -> None:
        """A statement failed as planned before DDL: every statement of this client is prepared
        afresh under a new server name when it is next parsed (the old names age out of the
        backends' LRUs), as a re-prepare on Postgres would be."""
        names = self.pool.pooler.names
        for stmt in self.statements.values():
            names.retire(stmt)

    def follow_reported(self, server: PooledServer, changed: dict[bytes, bytes | None]) -> None:
        """The transaction ended with the backend reporting settings other than before it (a SET
        of client_encoding, TimeZone, DateStyle… inside a committed transaction, which Postgres
        keeps): they become the client's, replayed on its next backend."""
        settings = self.settings
        for name, old in changed.items():
            new = server.reported.get(name)
            if new is not None and new != old:
                change = reported_setting(new)
                if change is not None:
                    settings = with_setting(settings, *change)
        if settings != self.settings:
            self.settings = settings = self.pool.intern(settings)
            if server.applied is not None:
                server.applied = settings

    def forget(self, name: bytes, stmt: ServerStatement) -> None:
        """The client's Parse failed (or was skipped after an error): the name does not exist."""
        if self.statements.get(name) is stmt:
            del self.statements[name]

    # -- the client's messages ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Forward the whole messages buffered (copied out of ``buf`` only when the first is whole,
        so a large message arriving in many chunks is not copied for each)."""
        if self.held is not None:
            self._unhold()
        buf = self.buf
        if len(buf) >= 5:
            length = int.from_bytes(buf[1:5], "big", signed=True)
            if not 4 <= length <= MAX_MESSAGE or length < len(buf):  # a whole message (or a bad length)
                pos = self._forward_from(bytes(buf))
                if pos:
                    del buf[:pos]
        self.buffered = len(buf) > 0
        # Only whole messages waiting for a backend pause reading: with a backend lent, what is
        # left is the start of one message (a large CopyData), which needs more bytes to finish.
        if self.asking and len(self.buf) > READ_AHEAD_LIMIT:
            self._pause()

    def _forward_from(self, buf: bytes) -> int:
        """Forward every whole message of ``buf``; return how many bytes were consumed. Runs of
        messages passed on as they are go out as one slice of ``buf`` (``buf`` itself when it is
        all one run); only a rewritten, dropped or answered message breaks a run."""
        n = len(buf)
        pos = run = 0
        server = self.server
        out: list[bytes] | None = None  # the pieces, once a message is rewritten, dropped or answered
        while pos + 5 <= n:
            length = read_i32_be(buf, pos + 1)
            if length < 4 or length > MAX_MESSAGE:
                self.fatal("08P01", f"invalid message length {length}")
                return n
            end = pos + 1 + length
            if end > n:
                break
            kind = buf[pos]
            if server is None or self.discarding or kind == 0x58:
                if run < pos:
                    if out is None:
                        out = []
                    out.append(buf[run:pos])
                run = end
                if kind == 0x58:  # Terminate: answered by closing, as Postgres does
                    pos = n
                    self._close()
                    break
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
                    if server is None:  # wait for one: the messages stay in buf
                        run = pos
                        self._activate()
                        self.asking = True
                        self.pool.request(self)
                        break
                    self._lend(server)
                run = pos
            if not server.skipping:  # what every driver's extended query sends, inline
                if kind == 0x45:  # Execute
                    server.status = 0
                    server.expect.append(EXECUTE_ENTRY)
                    pos = end
                    continue
                if kind == 0x53:  # Sync
                    if server.pending_set is None:
                        server.expect.append(SYNC_ENTRY)
                    else:
                        server.expect.append(Entry(E_SYNC, server.pending_set))
                        server.pending_set = None
                    pos = end
                    continue
                if kind == 0x42 and buf[pos + 6 if buf[pos + 5] == 0 else buf.index(0, pos + 5) + 1] == 0:
                    # Bind of the unnamed statement (to the unnamed portal, usually: no search)
                    server.status = 0
                    server.expect.append(BIND_ENTRY)
                    pos = end
                    continue
                if kind == 0x51 and _plain_sql(buf, pos + 5):  # a simple query, not SET/RESET/DEALLOCATE/DISCARD
                    server.expect.append(QUERY_ENTRY)
                    pos = end
                    continue
                if kind == 0x44 and buf[pos + 5] == 0x50:  # Describe of a portal
                    server.status = 0
                    server.expect.append(DESCRIBE_ENTRY)
                    pos = end
                    continue
                if kind == 0x50 and buf[pos + 5] == 0 and _plain_sql(buf, pos + 6):  # unnamed Parse, not a SET
                    server.status = 0
                    server.expect.append(PARSE_UNNAMED_ENTRY)
                    pos = end
                    continue
            done = self._forward(server, kind, buf, pos, end)
            if done is not None:
                if out is None:
                    out = []
                if run < pos:
                    out.append(buf[run:pos])
                if done:
                    out.append(done)
                run = end
            pos = end
        if server is not None:
            if out is None:
                if run < pos:
                    server.write(buf if run == 0 and pos == n else buf[run:pos])
            else:
                if run < pos:
                    out.append(buf[run:pos])
                if out:
                    server.write(b"".join(out))
        return pos

    def _synth(self, server: PooledServer | None, data: bytes,
               parsed: tuple[bytes, ServerStatement] | None = None) -> None:
        """An answer of the pooler's own, in its place among the backend's answers (``parsed``: the
        client's statement it stands for, forgotten if an error before it makes Postgres skip it)."""
        if server is not None and server.expect:
            server.expect.append(Entry(E_SYNTH, data, parsed))
        else:
            self.transport.write(data)

    def _answer_idle(self, kind: int, buf: bytes, pos: int, end: int) -> bool:
        """What needs no backend, answered with none held (so nothing is outstanding)."""
        if kind == 0x53:  # Sync
            self.transport.write(_IDLE_READY)
            return True
        if kind == 0x48:  # Flush
            return True
        if kind == 0x43:  # Close
            if buf[pos + 5] == 0x53:  # a statement
                self.statements.pop(buf[pos + 6:end - 1], None)
            self.transport.write(CLOSE_COMPLETE)  # a portal cannot exist outside a transaction
            return True
        if kind == 0x51 and buf[pos + 5] in _MAYBE_SPECIAL:
            answer = self._special_query(buf[pos + 5:end - 1], IDLE)
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
            names = self.pool.pooler.names
            if target == b"ALL":
                for stmt in self.statements.values():
                    names.retire(stmt)
                self.statements.clear()
                return command_complete("DEALLOCATE ALL") + codec.ready_for_query(bytes([status]))
            dropped = self.statements.pop(target, None) if target is not None else None
            if dropped is not None:
                names.retire(dropped)
                return command_complete("DEALLOCATE") + codec.ready_for_query(bytes([status]))
        elif word == DISCARD and status == IDLE and is_discard_all(sql):
            self.statements.clear()
            self.settings = self.startup
            return command_complete("DISCARD ALL") + _IDLE_READY
        return None

    def _prepare(self, server: PooledServer, stmt: ServerStatement, client_name: bytes | None) -> bytes:
        """The Parse that puts ``stmt`` on ``server`` (after Closes evicting its LRU's oldest)."""
        expect = server.expect
        parts = []
        for old in server.prepared.add(stmt.name):
            parts.append(close_statement(old))
            expect.append(Entry(E_CLOSE_HIDDEN, None, old))
        parts.append(stmt.parse)
        expect.append(Entry(E_PARSE, client_name, stmt) if client_name is not None
                      else Entry(E_PARSE_HIDDEN, None, stmt.name))
        return b"".join(parts) if len(parts) > 1 else parts[0]

    def _forward(self, server: PooledServer, kind: int, buf: bytes, pos: int, end: int) -> bytes | None:
        """Record what the backend will answer to this message; None: pass it on as it is, else
        what to send instead (b"" for nothing)."""
        expect = server.expect
        server.plain = False  # not one of the messages passed on inline: the backend's answers are read one by one
        if server.skipping:  # Postgres ignores all of it until Sync: pass it on unread
            if kind == 0x53:
                server.skipping = False
                if server.pending_set is not None:  # a SET of the failed batch: it did not happen
                    server.pending_set = None
                expect.append(SYNC_ENTRY)
            return None
        if kind == 0x45:  # Execute
            server.status = 0  # an implicit transaction is open until the Sync's ReadyForQuery
            expect.append(EXECUTE_ENTRY)
            return None
        if kind == 0x53:  # Sync
            if server.pending_set is None:
                expect.append(SYNC_ENTRY)
            else:
                expect.append(Entry(E_SYNC, server.pending_set))
                server.pending_set = None
            return None
        if kind == 0x42:  # Bind
            server.status = 0
            portal_end = buf.index(0, pos + 5) + 1
            if buf[portal_end] != 0:  # a named statement: the client's, under the pooler's name
                stmt_end = buf.index(0, portal_end) + 1
                stmt = self.statements.get(buf[portal_end:stmt_end - 1])
                if stmt is not None:
                    pre = b"" if server.prepared.use(stmt.name) else self._prepare(server, stmt, None)
                    expect.append(BIND_ENTRY)
                    return pre + rename_bind(buf[pos + 5:end], portal_end - pos - 5, stmt_end - pos - 5,
                                             stmt.name)
            expect.append(BIND_ENTRY)
            return None
        if kind == 0x50:  # Parse
            server.status = 0
            if buf[pos + 5] == 0:  # the unnamed statement: passed on
                if buf[pos + 6] in _MAYBE_SPECIAL and (buf[pos + 6] not in _LETTERS
                                                       or buf[pos + 6:pos + 9].lower() in PREFIXES):
                    self._set_in_parse(server, buf[pos + 6:buf.index(0, pos + 6)])
                expect.append(PARSE_UNNAMED_ENTRY)
                return None
            payload = buf[pos + 5:end]
            name, at = split_cstring(payload)
            if payload[at] in _MAYBE_SPECIAL:
                self._set_in_parse(server, payload[at:payload.index(0, at)])
            if name in self.statements:
                self._synth(server, codec.error_response(
                    "ERROR", "42P05", f'prepared statement "{name.decode(errors="replace")}" already exists'))
                self.discarding = True
                return b""
            stmt = self.pool.pooler.names.get(payload[at:])
            self.statements[name] = stmt
            if server.prepared.use(stmt.name):
                self._synth(server, PARSE_COMPLETE, (name, stmt))
                return b""
            return self._prepare(server, stmt, name)
        if kind == 0x44:  # Describe
            server.status = 0
            if buf[pos + 5] == 0x53 and end - pos > 7:
                stmt = self.statements.get(buf[pos + 6:end - 1])
                if stmt is not None:
                    pre = b"" if server.prepared.use(stmt.name) else self._prepare(server, stmt, None)
                    expect.append(DESCRIBE_ENTRY)
                    return pre + codec.encode_message(b"D", b"S" + stmt.name + b"\x00")
            expect.append(DESCRIBE_ENTRY)
            return None
        if kind == 0x43:  # Close
            server.status = 0
            if buf[pos + 5] == 0x53 and end - pos > 7:  # a named statement: it stays prepared on the backend
                stmt = self.statements.pop(buf[pos + 6:end - 1], None)
                if stmt is not None:
                    self.pool.pooler.names.retire(stmt)
                self._synth(server, CLOSE_COMPLETE)
                return b""
            expect.append(CLOSE_ENTRY)
            return None
        if kind == 0x51:  # Query
            track = None
            if buf[pos + 5] in _MAYBE_SPECIAL:
                sql = buf[pos + 5:end - 1]
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
                        return b""
                    if word == DISCARD:  # DISCARD ALL in a transaction: Postgres' error; other DISCARDs run
                        server.applied = None
            expect.append(QUERY_ENTRY if track is None else Entry(E_QUERY, track))
            return None
        if kind == 0x46:  # FunctionCall: answered up to ReadyForQuery, like a query
            expect.append(QUERY_ENTRY)
        return None  # Flush, CopyData, CopyDone, CopyFail: no answer of their own

    @staticmethod
    def _set_in_parse(server: PooledServer, sql: bytes) -> None:
        """A SET in a Parse (psycopg sends every statement so): kept with the batch's Sync, and
        tracked if that ends outside a transaction with no error; any other SET makes the backend's
        settings unknown, so it is reset before its next client."""
        if first_word(sql) not in (SET, RESET) or is_transaction_scoped_set(sql):
            return
        track = tracked_set(sql)
        if track is None:
            server.applied = None
        elif server.pending_set is None:
            server.pending_set = [track]
        else:
            server.pending_set.append(track)
