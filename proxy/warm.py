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
a clean session. Anything else (an error, a transaction still open, a COPY in progress, a query
still running at the deadline, a closed socket) closes the backend.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
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


@dataclass(slots=True, eq=False)  # compared by identity
class WarmBackend:
    side: Side
    key: BackendKey  # the backend's own pid and secret, for forwarding cancels
    greeting: bytes  # what it said at startup (ParameterStatus …), replayed to each new client
    compute_pid: int  # its postmaster: a restarted compute's backends are not reused
    expiry: asyncio.TimerHandle | None = None


# -- the reset, sans I/O ----------------------------------------------------------------------------


def reset_request(nonce: str) -> bytes:
    """Two simple queries (separate messages: DISCARD ALL refuses to run in a transaction block)."""
    return codec.encode_message(b"Q", b"DISCARD ALL\x00") + codec.encode_message(b"Q", f"SELECT '{nonce}'".encode()
                                                                                  + b"\x00")


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
    """Idle, reset backends by (branch, startup parameters); at most ``per_key`` each."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._idle: dict[PoolKey, deque[WarmBackend]] = {}
        self._resetting: set[asyncio.Task[None]] = set()
        self.reused = 0
        self.discarded = 0

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

    def park(self, key: PoolKey, backend: WarmBackend) -> None:
        """Reset ``backend`` in the background; keep it if the reset proves it clean."""
        if self.per_key <= 0:
            backend.side.close()
            return
        task = asyncio.create_task(self._reset_and_keep(key, backend))
        self._resetting.add(task)
        task.add_done_callback(self._resetting.discard)

    async def _reset_and_keep(self, key: PoolKey, backend: WarmBackend) -> None:
        side = backend.side
        side.detach()
        nonce = secrets.token_hex(16)
        side.write(reset_request(nonce))
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                while (ok := reset_outcome(side.buf, nonce)) is None:
                    await side.wait_for_data()
        except TimeoutError:
            # Still busy with what its client left running: stop that too — a closed socket alone
            # would not end it before it next writes.
            await cancel_backend(backend.key)
            ok = False
        except ConnectionError:
            ok = False
        if not ok:
            self._discard(backend, "its state after the client left is unknown")
            return
        side.buf.clear()
        queue = self._idle.setdefault(key, deque())
        queue.append(backend)
        backend.expiry = asyncio.get_running_loop().call_later(IDLE_LIMIT, self._expire, key, backend)
        while len(queue) > self.per_key:
            self._discard(queue.popleft(), "more than warm_backends are idle")

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
        for task in list(self._resetting):
            task.cancel()
        await asyncio.gather(*self._resetting, return_exceptions=True)
        for queue in self._idle.values():
            for backend in queue:
                if backend.expiry is not None:
                    backend.expiry.cancel()
                backend.side.close()
        self._idle.clear()
