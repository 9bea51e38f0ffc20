"""Warm backends: a session's compute backend outlives its client when it can be proven clean.

Opening a Postgres backend (fork, authentication, catalog caches) is most of what a new
connection costs. When a client leaves, its backend is reset with ``DISCARD ALL``, as PgBouncer's
session mode does, and kept — a few per (branch, startup parameters), so a role, database and
settings always get a backend that started with exactly theirs. The next client with the same
parameters is handed one, with its real pid, the greeting it started with, and a fresh cancel
secret.

A backend whose state is not known is closed, never kept. The relay does not parse, so the proxy
does not know where the byte stream stood when the client left (mid-message, mid-transaction,
mid-COPY…). The reset therefore proves the state instead of assuming it: it sends ``DISCARD ALL``
and then a query that selects a random nonce, and keeps the backend only if the server's output
ends with exactly: DISCARD ALL completed, ReadyForQuery idle, then the nonce's row, its
completion and ReadyForQuery idle. The nonce is unguessable, so that output can only come from the
server running our two queries as whole messages, in order, outside any transaction — which is
a clean session. A client that left inside an open transaction gets what Postgres gives it on
disconnect: the transaction is rolled back. The reset tells that case apart by DISCARD ALL's own
refusal (SQLSTATE 25001, "cannot run inside a transaction block"), so it is sent once more after
a ``ROLLBACK``, with a new nonce, and must prove itself again. A client that left in a *failed*
transaction (25P02: an error or a cancel it never rolled back — typically an interrupted client)
has its backend closed, as its backend would end on Postgres. Anything else (a COPY in progress, a
query still running at the deadline, a closed socket, a second failed proof) closes it too.

A new client that finds no idle backend waits for one whose reset is in flight (a reset is one
round trip; a new backend is a fork and a catalog load) rather than opening another; the reset
runs when the client leaves, never on the next client's path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass

from proxy import codec
from proxy.cancel import BackendKey, cancel_backend
from proxy.pipe import Side

log = logging.getLogger("lakelet.proxy")

RESET_TIMEOUT = 2.0
# An idle warm backend is closed after this: it holds a connection slot, and a database with
# connections cannot be dropped (DROP DATABASE without FORCE) until they are gone.
IDLE_LIMIT = 30.0
_DISCARDED = codec.encode_message(b"C", b"DISCARD ALL\x00") + codec.ready_for_query(b"I")
_FAILED = (codec.ready_for_query(b"E"), codec.ready_for_query(b"T"))
_OPEN_TRANSACTION = b"C25001\x00"  # ErrorResponse code field: active_sql_transaction
_ABORTED_TRANSACTION = b"C25P02\x00"  # in_failed_sql_transaction


@dataclass(slots=True, eq=False)  # compared by identity
class WarmBackend:
    side: Side
    key: BackendKey  # the backend's own pid and secret, for forwarding cancels
    greeting: bytes  # what it said at startup (ParameterStatus …), replayed to each new client
    compute_pid: int  # its postmaster: a restarted compute's backends are not reused
    parked_at: float = 0.0
    expiry: asyncio.TimerHandle | None = None


# -- the reset, sans I/O ----------------------------------------------------------------------------


def reset_request(nonce: str, *, rollback: bool = False) -> bytes:
    """Two simple queries (separate messages: DISCARD ALL refuses to run in a transaction block),
    after a ``ROLLBACK`` when a first attempt found a transaction open (a ROLLBACK outside one
    would log a warning on every reset, so it is only sent when needed)."""
    first = codec.encode_message(b"Q", b"ROLLBACK\x00") if rollback else b""
    return first + codec.encode_message(b"Q", b"DISCARD ALL\x00") + codec.encode_message(
        b"Q", f"SELECT '{nonce}'".encode() + b"\x00")


def in_failed_transaction(buf: bytes | bytearray) -> bool:
    """The output ends in ReadyForQuery "in a failed transaction"."""
    return buf.endswith(_FAILED[0])


def left_in_open_transaction(buf: bytes | bytearray) -> bool:
    """The reset failed because the client left a transaction open (DISCARD ALL answered 25001)
    and not because it left one failed (25P02): a ROLLBACK first ends it as Postgres would."""
    if not in_failed_transaction(buf):
        return False
    refused = buf.rfind(_OPEN_TRANSACTION)
    # Our SELECT after the refused DISCARD ALL fails with 25P02 in either case: only a 25P02
    # *before* the refusal means the transaction had failed already.
    return refused >= 0 and buf.rfind(_ABORTED_TRANSACTION, 0, refused) < 0


def reset_outcome(buf: bytes | bytearray, nonce: str) -> bool | None:
    """True: the output proves a clean, idle backend; False: it proves a failed reset; None: not
    yet known (wait for more output)."""
    value = nonce.encode()
    row = codec.encode_message(b"D", struct.pack("!hi", 1, len(value)) + value)
    suffix = row + codec.encode_message(b"C", b"SELECT 1\x00") + codec.ready_for_query(b"I")
    if buf.endswith(suffix):
        row_at = len(buf) - len(suffix)
        discarded_at = bytes(buf).rfind(_DISCARDED, 0, row_at)
        if discarded_at < 0:
            return False
        t_at = discarded_at + len(_DISCARDED)
        # Between them exactly one message, the RowDescription of our SELECT.
        return (buf[t_at:t_at + 1] == b"T" and row_at - t_at >= 5
                and t_at + 1 + struct.unpack_from("!i", buf, t_at + 1)[0] == row_at)
    if buf.endswith(_FAILED):
        return False  # a ReadyForQuery in (failed) transaction: the reset cannot have worked
    return None


# -- the pool ---------------------------------------------------------------------------------------------


PoolKey = tuple[str, tuple[tuple[str, str], ...]]


def pool_key(branch: str, params: dict[str, str]) -> PoolKey:
    return branch, tuple(sorted(params.items()))


class WarmPool:
    """Idle, reset backends by (branch, startup parameters); at most ``per_key`` per branch in all
    (the oldest goes first), so clients with many different parameters — an application name per
    process, say — cannot fill a small compute's ``max_connections`` with idle backends."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._idle: dict[PoolKey, deque[WarmBackend]] = {}
        self._resetting: set[asyncio.Task[None]] = set()
        self._in_flight: dict[PoolKey, int] = {}  # resets running per key
        self._waiters: dict[PoolKey, deque[tuple[asyncio.Future[WarmBackend | None], int]]] = {}
        self.reused = 0
        self.discarded = 0
        self.rolled_back = 0  # resets that ended a transaction the client left open

    def __len__(self) -> int:
        return sum(len(q) for q in self._idle.values())

    def take(self, key: PoolKey, compute_pid: int) -> WarmBackend | None:
        """The most recently parked live backend for ``key`` on this compute, or None."""
        queue = self._idle.get(key)
        while queue:
            backend = queue.pop()
            if not queue:
                del self._idle[key]
            if backend.expiry is not None:
                backend.expiry.cancel()
                backend.expiry = None
            side = backend.side
            if (backend.compute_pid == compute_pid and not side.closed and not side.buf
                    and side.transport is not None and not side.transport.is_closing()):
                self.reused += 1
                return backend
            self._discard(backend, "its compute restarted or it closed while parked")
            queue = self._idle.get(key)
        return None

    async def take_or_wait(self, key: PoolKey, compute_pid: int) -> WarmBackend | None:
        """``take``, or when none is idle but a reset for ``key`` is in flight with no client
        waiting for it yet, that backend once its reset proves it clean (None if it does not)."""
        backend = self.take(key, compute_pid)
        if backend is not None or self._in_flight.get(key, 0) <= len(self._waiters.get(key, ())):
            return backend
        waiter: asyncio.Future[WarmBackend | None] = asyncio.get_running_loop().create_future()
        entry = (waiter, compute_pid)
        self._waiters.setdefault(key, deque()).append(entry)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._discard(waiter.result(), "its client gave up while it was handed over")  # type: ignore[arg-type]
            raise
        finally:
            queue = self._waiters.get(key)
            if queue is not None:
                if entry in queue:
                    queue.remove(entry)
                if not queue:
                    del self._waiters[key]

    def drop_idle(self, branch: str) -> int:
        """Close every idle backend of ``branch``: the compute refused a new connection for want
        of slots (53300), and idle backends hold slots that a client is asking for."""
        dropped = 0
        for key in [k for k in self._idle if k[0] == branch]:
            for backend in self._idle.pop(key):
                self._discard(backend, "the compute ran out of connection slots")
                dropped += 1
        return dropped

    def park(self, key: PoolKey, backend: WarmBackend) -> None:
        """Reset ``backend`` in the background; keep it if the reset proves it clean."""
        if self.per_key <= 0:
            backend.side.close()
            return
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        task = asyncio.create_task(self._reset_and_keep(key, backend))
        self._resetting.add(task)
        task.add_done_callback(self._resetting.discard)

    async def _reset_and_keep(self, key: PoolKey, backend: WarmBackend) -> None:
        try:
            ok = await self._reset(backend)
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
        if not ok:
            self._discard(backend, "its state after the client left is unknown")
            self._wake_waiters(key)
            return
        backend.side.buf.clear()
        if self._hand_over(key, backend):
            return
        backend.parked_at = time.monotonic()
        queue = self._idle.setdefault(key, deque())
        queue.append(backend)
        backend.expiry = asyncio.get_running_loop().call_later(IDLE_LIMIT, self._expire, key, backend)
        self._trim(key[0])

    async def _reset(self, backend: WarmBackend) -> bool:
        side = backend.side
        side.detach()
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                nonce = secrets.token_hex(16)
                side.write(reset_request(nonce))
                while (ok := reset_outcome(side.buf, nonce)) is None:
                    await side.wait_for_data()
                if ok:
                    return True
                if not left_in_open_transaction(side.buf):
                    return False
                # Inside a transaction: roll it back and prove again. Output of the first attempt
                # may still arrive (its queries' errors), so "failed" only means "not yet" now.
                nonce = secrets.token_hex(16)
                side.write(reset_request(nonce, rollback=True))
                while not (ok := reset_outcome(side.buf, nonce)):
                    if ok is False and not in_failed_transaction(side.buf):
                        return False
                    await side.wait_for_data()
                self.rolled_back += 1
                return True
        except TimeoutError:
            # Still busy with what its client left running: stop that too — a closed socket alone
            # would not end it before it next writes.
            await cancel_backend(backend.key)
            return False
        except ConnectionError:
            return False

    def _hand_over(self, key: PoolKey, backend: WarmBackend) -> bool:
        """Give a freshly reset backend to a client waiting for ``key``, if one is."""
        queue = self._waiters.get(key)
        while queue:
            waiter, compute_pid = queue.popleft()
            if waiter.done():
                continue
            if compute_pid != backend.compute_pid:
                waiter.set_result(None)
                continue
            self.reused += 1
            waiter.set_result(backend)
            return True
        return False

    def _wake_waiters(self, key: PoolKey) -> None:
        """A reset failed: waiters beyond the resets still in flight open their own backend."""
        queue = self._waiters.get(key)
        while queue and len(queue) > self._in_flight.get(key, 0):
            waiter, _ = queue.pop()
            if not waiter.done():
                waiter.set_result(None)

    def _trim(self, branch: str) -> None:
        queues = [q for k, q in self._idle.items() if k[0] == branch]
        while sum(len(q) for q in queues) > self.per_key:
            oldest = min((q for q in queues if q), key=lambda q: q[0].parked_at)
            self._discard(oldest.popleft(), "more than warm_backends are idle on the branch")
        for k in [k for k, q in self._idle.items() if k[0] == branch and not q]:
            del self._idle[k]

    def _expire(self, key: PoolKey, backend: WarmBackend) -> None:
        backend.expiry = None
        queue = self._idle.get(key)
        if queue is not None and backend in queue:
            queue.remove(backend)
            if not queue:
                del self._idle[key]
            self._discard(backend, f"idle for {IDLE_LIMIT:g}s")

    def _discard(self, backend: WarmBackend, why: str) -> None:
        if backend.expiry is not None:
            backend.expiry.cancel()
            backend.expiry = None
        self.discarded += 1
        log.debug("closed a backend instead of reusing it", extra={"pid": backend.key.pid, "reason": why})
        backend.side.close()

    async def close(self) -> None:
        for queue in self._waiters.values():
            for waiter, _ in queue:
                if not waiter.done():
                    waiter.set_result(None)
        for task in list(self._resetting):
            task.cancel()
        await asyncio.gather(*self._resetting, return_exceptions=True)
        for queue in self._idle.values():
            for backend in queue:
                if backend.expiry is not None:
                    backend.expiry.cancel()
                backend.side.close()
        self._idle.clear()
