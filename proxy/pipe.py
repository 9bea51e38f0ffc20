"""One end of a session (the client's or the compute's), as an ``asyncio.Protocol``.

During the handshake it buffers what arrives, so the stages can ``await`` whole packets. Once the
session is relayed, every chunk is written straight to the other end's transport — no parsing,
no copies kept — and each side's ``pause_writing``/``resume_writing`` pauses and resumes *the
other side's* reading: a slow reader slows its writer down instead of growing our buffers.

``data_received`` is a property: the transport asks for it when its protocol is set (uvloop keeps
the callable it gets), so a relaying side hands out *the peer transport's own ``write``* and the
compute's output reaches the client without a Python frame per chunk. Only the client's side runs
Python per chunk, to follow message headers for Terminate when its backend may be kept warm.
Nothing is counted per chunk: bytes moved are read from the kernel (``TCP_INFO``) when asked.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from proxy.codec import Message, complete_messages, split_message

HANDSHAKE_BUFFER_LIMIT = 256 * 1024
TERMINATE = b"X\x00\x00\x00\x04"
_LENGTH = struct.Struct("!i")
_unpack_length = _LENGTH.unpack_from
# struct tcp_info: tcpi_bytes_acked (sent and acknowledged) and tcpi_bytes_received, Linux ≥ 4.2.
_TCP_BYTES = struct.Struct("=QQ")
_TCP_BYTES_AT = 120
_TCP_INFO_LEN = _TCP_BYTES_AT + _TCP_BYTES.size


def tcp_bytes(transport: asyncio.BaseTransport | None) -> tuple[int, int]:
    """(bytes received from, bytes sent to) the peer of a TCP transport, from the kernel's own
    counters; (0, 0) where there are none (a Unix socket, a closed transport)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(socket, "TCP_INFO", None) is None:
        return 0, 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0, 0
    if len(info) < _TCP_INFO_LEN:
        return 0, 0
    acked, received = _TCP_BYTES.unpack_from(info, _TCP_BYTES_AT)
    return received, acked


class Side(asyncio.Protocol):
    # Slots: two of these live as long as each session, idle ones included.
    __slots__ = ("name", "transport", "buf", "peer", "_forward", "_receiver", "closed", "_waiter",
                 "_paused_peer", "_loop", "_ended", "track", "_skip", "_partial", "final_bytes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer: Side | None = None
        self._forward: Callable[[bytes], None] | None = None  # the peer transport's write, once relaying
        self._receiver: Callable[[bytes], None] = self._buffer  # what data_received hands out
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
        # The kernel's (received, sent) byte counts, taken just before the socket closes.
        self.final_bytes: tuple[int, int] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def data_received(self) -> Callable[[bytes], None]:  # type: ignore[override]
        return self._receiver

    def _buffer(self, data: bytes) -> None:
        """Handshake reads (and a warm backend's reset): keep the bytes for an awaiting reader."""
        self.buf += data
        if len(self.buf) > HANDSHAKE_BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def _relay_tracked(self, data: bytes) -> None:
        """The client's side when its backend may be kept warm: the chunk goes to the compute,
        except a final Terminate, which is answered here by closing."""
        forward = self._forward
        if forward is None:  # the compute side is gone: keep the bytes for nobody
            self._buffer(data)
            return
        if self.track:
            if not self._skip and not self._partial and len(data) >= 5 \
                    and _unpack_length(data, 1)[0] + 1 == len(data):
                terminate = data == TERMINATE  # the usual chunk: one whole message
            else:
                terminate = self._terminated(data)
            if terminate:
                data = data[:-5]
                if data:
                    forward(data)
                self.take_final_bytes()
                self.transport.close()  # type: ignore[union-attr]
                self._unhook_peer()
                return
        forward(data)

    def _set_receiver(self, receiver: Callable[[bytes], None]) -> None:
        self._receiver = receiver
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.set_protocol(self)  # the transport asks data_received again

    def _unhook_peer(self) -> None:
        """This side closed: what the peer still sends stays in its buffer (for warm.py or nobody)."""
        peer = self.peer
        if peer is not None:
            peer._forward = None
            if peer._receiver is not peer._buffer:
                peer._set_receiver(peer._buffer)

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
            length = _unpack_length(data, pos + 1)[0]
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

    def take_final_bytes(self) -> tuple[int, int]:
        """The connection's byte counts, read once while its socket is still open."""
        if self.final_bytes is None:
            self.final_bytes = tcp_bytes(self.transport)
        return self.final_bytes

    def eof_received(self) -> bool:
        if self.name == "client":
            self.take_final_bytes()  # the transport closes the socket right after this returns
        self._wake()
        return False  # the protocol has no half-close: closing one end closes the session

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self._unhook_peer()
        peer = self.peer
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
        self._ended = None
        self._paused_peer = False
        if self._receiver is not self._buffer:
            self._set_receiver(self._buffer)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def relay_to(self, peer: Side, *, ended: asyncio.Future[Side]) -> None:
        """From now on, bytes go straight to ``peer``; what was read ahead goes first. ``ended``
        (one future for both sides) completes when either side's connection is lost."""
        self._ended = ended
        self.peer = peer
        assert peer.transport is not None
        self._forward = None if peer.closed else peer.transport.write
        if self.buf:
            pending = bytes(self.buf)
            self.buf.clear()
            self._relay_tracked(pending)
        if self._forward is not None and not self.closed:
            # Untracked, a chunk needs nothing of ours: the peer transport's write takes it.
            self._set_receiver(self._relay_tracked if self.track else self._forward)
        if self.transport is not None:
            self.transport.resume_reading()
        if self.closed:
            peer._forward = None
            if not ended.done():
                ended.set_result(self)
