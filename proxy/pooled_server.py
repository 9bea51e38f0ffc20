"""A pooled backend: one Postgres session of a pool, lent to one client at a time.

While lent, the backend's output is read message by message (headers only; a DataRow is skipped
over, not looked into) against ``expect``: one entry per client message that Postgres answers, in
the order they were sent, plus the pooler's own entries — a Parse it added (its ParseComplete is
swallowed), a Close that evicts a statement from the backend's LRU (its CloseComplete too), and
answers it made itself (a ParseComplete for a statement the backend already had, a CloseComplete
for a client's Close), emitted exactly when every message before them has been answered. After an
error Postgres ignores everything up to the next Sync: those entries are dropped with it.

A ReadyForQuery ``I`` with nothing left in ``expect`` ends the lend: the backend goes back to its
pool. Any other way out (the client gone mid-transaction, a cancel in flight, a protocol surprise)
closes it or holds it, never lends it on in an unknown state.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from proxy import codec
from proxy.cancel import BackendKey
from proxy.errors import SessionError
from proxy.statements import STALE_STATEMENT_CODES, BackendStatements, Settings, error_code

BLOCK_SERVER: Final = 2  # the reason bit a backend's full write buffer sets on its client (PooledClient.blocks)

if TYPE_CHECKING:
    from mypy_extensions import i32, i64

    from proxy.pooled_client import PooledClient
    from proxy.pooler import Pool

_LEN: Final = struct.Struct("!i")

try:  # compiled (proxy/native.py), a load of four bytes; interpreted, a C call like struct's
    from librt.strings import read_i32_be
except ImportError:  # no mypy toolchain installed: struct does the same
    def read_i32_be(b: bytes, index: i64, /) -> i32:
        return _LEN.unpack_from(b, index)[0]  # type: ignore[no-any-return]

# What a backend owes, per message it answers (``Entry.code``).
E_PARSE: Final = 1  # a client's Parse: a = client name or None, b = ServerStatement or None
E_PARSE_HIDDEN: Final = 2  # the pooler's Parse before a Bind/Describe: b = server name
E_BIND: Final = 3
E_DESCRIBE: Final = 4
E_EXECUTE: Final = 5
E_CLOSE: Final = 6
E_CLOSE_HIDDEN: Final = 7  # an LRU eviction: b = server name
E_SYNC: Final = 8  # a = the SETs of the batch to track, or None
E_QUERY: Final = 9  # a simple query or function call, answered up to ReadyForQuery: a = tracked SET or None
E_SYNTH: Final = 10  # the pooler's own answer: a = its bytes, b = (client name, statement) it stands for, or None

IDLE: Final = 0x49  # 'I'
_IDLE_TAIL: Final = b"Z\x00\x00\x00\x05I"  # ReadyForQuery I


class Entry:
    """One answer a lent backend owes, in the order the messages went: its ``code`` (``E_*``) and
    what is needed when it comes (``a``, ``b``: see the codes). A native class, so that reading a
    code is a field load when compiled."""

    __slots__ = ("code", "a", "b")

    def __init__(self, code: int, a: Any = None, b: Any = None) -> None:
        self.code = code
        self.a = a
        self.b = b

    def __repr__(self) -> str:
        return f"Entry({self.code}, {self.a!r}, {self.b!r})"


# The plain entries, one object each (nothing to do when answered but pop them): what the client
# side records for the messages it passes on inline, and what the common answer is recognised by.
SYNC_ENTRY: Final = Entry(E_SYNC)
QUERY_ENTRY: Final = Entry(E_QUERY)
BIND_ENTRY: Final = Entry(E_BIND)
EXECUTE_ENTRY: Final = Entry(E_EXECUTE)
DESCRIBE_ENTRY: Final = Entry(E_DESCRIBE)
CLOSE_ENTRY: Final = Entry(E_CLOSE)
PARSE_UNNAMED_ENTRY: Final = Entry(E_PARSE)


def taken(items: list[Any], head: int) -> int:
    """The read index of a list used as a queue (``Expect``, ``pooler.Line``) after the item at
    ``head`` is taken: an emptied list is cleared, and a dead prefix of half the list or more is cut
    off, so a long queue stays linear."""
    head += 1
    if head == len(items):
        items.clear()
        return 0
    if head >= 64 and head * 2 >= len(items):
        del items[:head]
        return 0
    return head


class Expect:
    """The entries a lent backend owes, oldest first, and how many of them a ReadyForQuery answers
    (Sync, Query: ``readies``). A list read from ``head`` rather than a deque: compiled, every
    append and pop is a list primitive instead of a method call (compacted as it empties, so a
    long pipeline stays linear)."""

    __slots__ = ("items", "head", "readies")

    def __init__(self) -> None:
        self.items: list[Entry] = []
        self.head = 0
        self.readies = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def __bool__(self) -> bool:
        return self.head < len(self.items)

    def __getitem__(self, i: int) -> Entry:
        n = len(self.items) - self.head
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("Expect index out of range")
        return self.items[self.head + i]

    def append(self, entry: Entry) -> None:
        self.items.append(entry)
        code = entry.code
        if code in (E_SYNC, E_QUERY):
            self.readies += 1

    def extend(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.append(entry)

    def first_code(self) -> int:
        """The oldest entry's code; 0 when nothing is owed."""
        head = self.head
        return self.items[head].code if head < len(self.items) else 0

    def last(self) -> Entry | None:
        items = self.items
        return items[len(items) - 1] if self.head < len(items) else None

    def popleft(self) -> Entry:
        items = self.items
        head = self.head
        if head >= len(items):
            raise IndexError("pop from an empty Expect")
        entry = items[head]
        self.head = taken(items, head)
        code = entry.code
        if code in (E_SYNC, E_QUERY):
            self.readies -= 1
        return entry

    def clear(self) -> None:
        self.items.clear()
        self.head = 0
        self.readies = 0


class Waiter:
    """Who waits in a pool's line for a backend: a pooled client, or the pooler itself greeting a
    new client (``pooler._FutureWaiter``). A native base class, so that the pool reads its fields
    and calls it directly when compiled."""

    __slots__ = ("settings", "queued", "wait_since", "closed")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queued = False  # in the pool's line (``Pool.waiters``)
        self.wait_since = 0.0
        self.closed = False  # gone: skipped when its turn comes

    def granted(self, server: PooledServer) -> None:
        """A backend with this waiter's settings."""
        raise NotImplementedError

    def refused(self, error: SessionError) -> None:
        """No backend: past pool_timeout, or one could not be opened."""
        raise NotImplementedError


class PooledServer:
    """The protocol of a pooled backend's connection (an asyncio protocol by its methods: a plain
    class, so that mypyc can compile it to a native one, see ``proxy/native.py``)."""

    __slots__ = ("transport", "write", "pool", "key", "compute_pid", "client", "expect", "prepared", "applied",
                 "status", "buf", "closed", "reported", "skipping", "failed", "broken", "cancelling", "held",
                 "idle_since", "_waiter", "last_rows", "where", "pending_set", "plain", "changed")

    def __init__(self, pool: Pool, transport: asyncio.Transport, key: BackendKey, greeting: bytes,
                 compute_pid: int, max_prepared: int) -> None:
        self.transport = transport
        self.write: Callable[[bytes], object] = transport.write  # bound once: called for every request
        self.pool = pool
        self.key = key
        self.compute_pid = compute_pid
        self.client: PooledClient | None = None
        self.expect = Expect()
        self.prepared = BackendStatements(max_prepared)
        self.applied: Settings | None = ()  # the settings statements run here since RESET ALL; None: unknown
        self.status = IDLE
        self.buf = bytearray()
        self.closed = False
        # The GUC_REPORT values this backend has told us, for greetings of clients that never ran
        # a query here: its startup ParameterStatus, updated by everything it reports later.
        self.reported: dict[bytes, bytes] = {}
        for kind, start, end in codec.iter_messages(greeting):
            if kind == b"S":
                self.reported[greeting[start + 5:greeting.index(b"\x00", start + 5)]] = greeting[start:end]
        self.skipping = False  # Postgres ignores messages until Sync after an error, and no Sync is queued
        self.failed = False  # the simple query being answered raised an error
        self.broken = False  # its statement bookkeeping is not certain: close instead of reusing
        self.cancelling = 0  # cancels in flight: it is not lent on before they are delivered
        self.held = False  # released while a cancel was in flight
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self.last_rows: list[bytes] = []
        self.where = 2  # in its pool: 0 idle, 1 in use, 2 not (yet, or any more)
        self.pending_set: list[tuple[str, bytes | None]] | None = None  # SETs parsed since the last Sync
        # Every entry in ``expect`` is a plain one (no statement of the pooler's, no answer of its
        # own, no SET to track), as the client's side sets it for the messages it passes on inline.
        self.plain = True
        self.changed: dict[bytes, bytes | None] | None = None  # ParameterStatus seen while lent: name → value before

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - swapped in
        self.transport = transport  # type: ignore[assignment]
        self.write = transport.write  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        client = self.client
        if client is not None:
            client.server_lost(self)
        self.pool.lost(self)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.block(BLOCK_SERVER)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.unblock(BLOCK_SERVER)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # not lent: a hidden query's answer, or a notice/FATAL while idle
            self.buf += data
            self._wake()
            return
        expect = self.expect
        n = len(data)
        if (self.plain and expect.readies == 1 and n >= 6 and data[n - 6] == 0x5A and data[n - 1] == IDLE
                and read_i32_be(data, n - 5) == 5 and not self.buf and not self.skipping):
            # The common answer: a whole batch ending in ReadyForQuery I. If it is the answer to the
            # one batch outstanding (one Sync or Query, the last entry) and holds no error and no
            # ParameterStatus, nothing in it needs looking at: walk the headers to be sure the tail
            # is a message of its own, then hand the chunk over and the backend back.
            last = expect.last()
            if last is SYNC_ENTRY or (last is QUERY_ENTRY and len(expect) == 1):
                end = n - 6
                pos = 0
                while pos < end:
                    kind = data[pos]
                    if kind == 0x45 or kind == 0x53 or kind == 0x5A:  # ErrorResponse, ParameterStatus, ReadyForQuery
                        break
                    pos += 1 + read_i32_be(data, pos + 1)
                else:
                    if pos == end:
                        expect.clear()
                        self.failed = False
                        self.status = IDLE
                        # The backend goes back first (to the next client in line, whose request it
                        # gets now), then the answer out: the backend idles less between transactions,
                        # often not long enough to sleep, and the client's bytes are the same.
                        client.release(self)
                        client.transport.write(data)
                        return
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
            n = len(data)
        pos = run = 0
        parts: list[bytes] | None = None
        ended = False
        while pos + 5 <= n:
            kind = data[pos]
            end = pos + 1 + read_i32_be(data, pos + 1)
            if end > n:
                break
            if kind == 0x44:  # DataRow: the common case, passed on untouched
                pos = end
                continue
            code = expect.first_code()
            drop = False
            if kind == 0x5A:  # ReadyForQuery
                if code in (E_SYNC, E_QUERY):
                    entry = expect.popleft()
                    if entry.a is not None:
                        if code == E_QUERY:
                            if not self.failed:
                                client.tracked(self, entry.a)
                        elif not self.failed and data[pos + 5] == IDLE:  # the SETs of a batch
                            for change in entry.a:
                                client.tracked(self, change)
                        else:  # ran, but rolled back or still in a transaction: unknown from here
                            self.applied = None
                self.failed = False
                self.status = data[pos + 5]
                if self.changed is not None and self.status == IDLE:
                    changed, self.changed = self.changed, None
                    client.follow_reported(self, changed)
                ended = True
            elif kind == 0x45:  # ErrorResponse
                if error_code(data[pos:end]) in STALE_STATEMENT_CODES:
                    client.statements_stale()
                if code == E_QUERY:
                    self.failed = True
                elif code:
                    self.failed = True
                    self._skip_to_sync()
            elif kind == 0x31:  # ParseComplete
                if code == E_PARSE:
                    expect.popleft()
                elif code == E_PARSE_HIDDEN:
                    expect.popleft()
                    drop = True
            elif kind == 0x32:  # BindComplete
                if code == E_BIND:
                    expect.popleft()
            elif kind == 0x54 or kind == 0x6E:  # RowDescription, NoData: the end of a Describe
                if code == E_DESCRIBE:
                    expect.popleft()
            elif kind == 0x43 or kind == 0x49 or kind == 0x73:  # CommandComplete, EmptyQuery, PortalSuspended
                if code == E_EXECUTE:
                    expect.popleft()
            elif kind == 0x33:  # CloseComplete
                if code == E_CLOSE:
                    expect.popleft()
                elif code == E_CLOSE_HIDDEN:
                    expect.popleft()
                    drop = True
            elif kind == 0x53:  # ParameterStatus: followed for the client at the transaction's end
                name = data[pos + 5:data.index(b"\x00", pos + 5)]
                if self.changed is None:
                    self.changed = {}
                    self.plain = False  # the transaction's end must be read (follow_reported), not handed over whole
                self.changed.setdefault(name, self.reported.get(name))
                self.reported[name] = data[pos:end]
            if drop:
                if parts is None:
                    parts = []
                parts.append(data[run:pos])
                run = end
            pos = end
            if expect.first_code() == E_SYNTH:
                if parts is None:
                    parts = []
                parts.append(data[run:pos])
                run = pos
                while expect.first_code() == E_SYNTH:
                    parts.append(expect.popleft().a)
        if pos < n:
            self.buf += data[pos:]
        if parts is None:
            if pos:
                client.transport.write(data[:pos] if pos < n else data)
        else:
            parts.append(data[run:pos])
            client.transport.write(b"".join(parts))
        if ended and self.status == IDLE and not expect and not self.skipping and self.client is client:
            client.release(self)

    def _skip_to_sync(self) -> None:
        """An error in an extended-protocol batch: Postgres answers nothing more until Sync."""
        expect = self.expect
        client = self.client
        while expect and expect.first_code() != E_SYNC:
            entry = expect.popleft()
            code = entry.code
            if code == E_PARSE and entry.a is not None:
                self.prepared.discard(entry.b.name)
                if client is not None:
                    client.forget(entry.a, entry.b)
            elif code == E_PARSE_HIDDEN:
                self.prepared.discard(entry.b)
            elif code == E_CLOSE_HIDDEN:
                self.broken = True  # the eviction never ran: the backend has a name we forgot
            elif code == E_SYNTH and entry.b is not None and client is not None:
                client.forget(*entry.b)  # a Parse answered by the pooler, which Postgres would have skipped
        if not expect:
            self.skipping = True

    # -- used while not lent --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def run_hidden(self, sql: bytes) -> codec.ErrorFields | None:
        """Run a simple query the client never sees (settings, a SHOW): the error it raised, or
        None. ParameterStatus it causes is remembered in ``reported``; rows are returned in
        ``last_rows``."""
        self.buf.clear()
        self.write(codec.encode_message(b"Q", sql + b"\x00"))
        error: codec.ErrorFields | None = None
        rows: list[bytes] = []
        while True:
            n = codec.complete_messages(self.buf, 1 << 30)
            if n:
                data = bytes(self.buf[:n])
                del self.buf[:n]
                for kind, start, end in codec.iter_messages(data):
                    if kind == b"S":
                        self.reported[data[start + 5:data.index(b"\x00", start + 5)]] = data[start:end]
                    elif kind == b"E":
                        error = codec.parse_error_response(codec.Message(kind, data[start + 5:end]))
                    elif kind == b"D":
                        rows.append(data[start + 5:end])
                    elif kind == b"Z":
                        self.status = data[start + 5]
                        self.last_rows = rows
                        return error
                continue
            if self.closed:
                raise ConnectionResetError("the backend closed during a query of the pooler")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if not self.closed:
            self.transport.close()

    def greeting(self) -> bytes:
        return b"".join(self.reported.values())
