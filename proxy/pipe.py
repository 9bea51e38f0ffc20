"""One end of a session (the client's or the compute's), as an ``asyncio.Protocol``.

During the handshake it buffers what arrives, so the stages can ``await`` whole packets. Once the
session is relayed, every chunk is written straight to the other end's transport — no parsing,
no copies kept — and each side's ``pause_writing``/``resume_writing`` pauses and resumes *the
other side's* reading: a slow reader slows its writer down instead of growing our buffers.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from compute import LoadSignals
from proxy.codec import Message, complete_messages, split_message

HANDSHAKE_BUFFER_LIMIT = 256 * 1024
TERMINATE = b"X\x00\x00\x00\x04"
_LENGTH = struct.Struct("!i")


class Side(asyncio.Protocol):
    # Slots: two of these live as long as each session, idle ones included.
    __slots__ = ("name", "transport", "buf", "peer", "_forward", "signals", "inbound", "closed", "_waiter",
                 "_paused_peer", "_loop", "_ended", "track", "_skip", "_partial")

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer: Side | None = None
        self._forward: Callable[[bytes], None] | None = None  # the peer transport's write, once relaying
        self.signals: LoadSignals | None = None
        self.inbound = True  # bytes arriving here count as bytes_in (client → compute)
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused_peer = False
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[Side] | None = None  # shared by both sides while relaying
        # A client side whose backend may be kept warm follows message boundaries (headers only)
        # so that its Terminate is answered here, as Postgres answers it, by closing — and never
        # reaches the backend. warm.py then proves the backend's state before keeping it.
        self.track = False
        self._skip = 0  # bytes of the current message still to come
        self._partial = b""  # a header split across chunks

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # The relay path runs once per chunk of every session: keep it to a write and a count.
        # (Idle time is measured from session close, so it needs no clock read here.)
        forward = self._forward
        if forward is not None:
            if self.track and self._terminated(data):
                data = data[:-5]
                if data:
                    forward(data)
                self.transport.close()  # type: ignore[union-attr]
                return
            forward(data)
            s = self.signals
            if s is not None:
                if self.inbound:
                    s.bytes_in += len(data)
                else:
                    s.bytes_out += len(data)
            return
        self.buf += data
        if len(self.buf) > HANDSHAKE_BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def _terminated(self, data: bytes) -> bool:
        """Walk the message headers in ``data``; True when its last message is a Terminate."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return False
        last = -1
        while pos + 5 <= n:
            last = pos
            length = _LENGTH.unpack_from(data, pos + 1)[0]
            if length < 4:  # not the protocol: the backend will say so; stop following
                self.track = False
                return False
            pos += 1 + length
        if pos < n:
            self._partial = data[pos:]
            self._skip = 0
            return False
        self._skip = pos - n
        return pos == n and last == n - 5 and data[last:] == TERMINATE

    def eof_received(self) -> bool:
        self._wake()
        return False  # the protocol has no half-close: closing one end closes the session

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        peer = self.peer
        if peer is not None:
            peer._forward = None  # what the peer still sends stays in its buffer, for warm.py or nobody
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(self)  # the session closes the other side, or keeps it warm
        elif peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()
            self._paused_peer = True

    def resume_writing(self) -> None:
        if self._paused_peer and self.peer is not None and self.peer.transport is not None:
            self._paused_peer = False
            self.peer.transport.resume_reading()

    # -- handshake reads --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise ConnectionResetError(f"{self.name} closed the connection")
        if self.transport is not None and len(self.buf) <= HANDSHAKE_BUFFER_LIMIT:
            self.transport.resume_reading()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_for_data(self) -> None:
        """Until more bytes arrive (ConnectionResetError once closed)."""
        await self._wait()

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_message(self, max_size: int) -> Message:
        """One typed message; bytes after it stay buffered for the next stage."""
        while True:
            msg = split_message(self.buf, max_size)
            if msg is not None:
                del self.buf[:5 + len(msg.payload)]
                return msg
            await self._wait()

    async def read_messages(self, max_size: int) -> bytes:
        """Every whole message buffered (at least one), in one piece: a burst such as a server's
        greeting is then taken in one step instead of one wait and one copy per message."""
        while True:
            n = complete_messages(self.buf, max_size)
            if n:
                data = bytes(self.buf[:n])
                del self.buf[:n]
                return data
            await self._wait()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- relay --------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Stop relaying: from now on bytes are buffered for awaiting readers again."""
        self._forward = None
        self.peer = None
        self.signals = None
        self._ended = None
        self._paused_peer = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def relay_to(self, peer: Side, signals: LoadSignals, *, inbound: bool, ended: asyncio.Future[Side]) -> None:
        """From now on, bytes go straight to ``peer``; what was read ahead goes first. ``ended``
        (one future for both sides) completes when either side's connection is lost."""
        self._ended = ended
        self.signals = signals
        self.inbound = inbound
        self.peer = peer
        assert peer.transport is not None
        self._forward = None if peer.closed else peer.transport.write
        if self.buf:
            pending = bytes(self.buf)
            self.buf.clear()
            self.data_received(pending)
        if self.transport is not None:
            self.transport.resume_reading()
        if self.closed:
            peer._forward = None
            if not ended.done():
                ended.set_result(self)
