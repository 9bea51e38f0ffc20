"""The relay moves bytes without counting them per chunk: the bytes metric comes from the kernel's
counts of each client connection, for sessions still open and for those that ended."""

from __future__ import annotations

import asyncio
import re
import socket
import struct

from proxy.pipe import TERMINATE, Side
from tests.proxy.harness import Harness


def _bytes(harness: Harness, direction: str) -> int:
    m = re.search(rf'^lakelet_proxy_bytes_total\{{branch="main",direction="{direction}"\}} ([0-9.e+]+)$',
                  harness.metric("lakelet_proxy_bytes_total"), re.M)
    return int(float(m.group(1))) if m else 0


async def test_bytes_moved_are_counted_live_and_after_the_session(harness: Harness) -> None:
    before_in, before_out = _bytes(harness, "in"), _bytes(harness, "out")
    conn = await harness.apg()
    try:
        rows = await conn.fetch("SELECT pad FROM big WHERE id <= 20000")  # about 2.2 MB to the client
        assert len(rows) == 20000
        text = "y" * 40000  # 40 kB from the client
        assert await conn.fetchval("SELECT length($1::text)", text) == 40000
        live_in, live_out = _bytes(harness, "in"), _bytes(harness, "out")
        assert live_out - before_out >= 20000 * 100
        assert live_in - before_in >= 40000
    finally:
        await conn.close()
    after_in, after_out = _bytes(harness, "in"), _bytes(harness, "out")
    assert after_out >= live_out and after_in >= live_in  # a counter: the session's bytes stay counted


async def test_client_sockets_do_not_wait_for_nagle(harness: Harness) -> None:
    """Small writes go out at once (asyncio's loop does not set TCP_NODELAY on accepted sockets)."""
    conn = await harness.apg()
    try:
        assert await conn.fetchval("SELECT 1") == 1
        clients = list(harness.proxy._relaying)
        assert clients
        for side in clients:
            assert side.transport is not None
            sock = side.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await conn.close()


class _Transport:
    """Enough of a transport for a Side: records writes and whether it was closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: object) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def _tracked_pair() -> tuple[Side, _Transport, _Transport]:
    client, compute = Side("client"), Side("compute")
    client_t, compute_t = _Transport(), _Transport()
    client.connection_made(client_t)  # type: ignore[arg-type]
    compute.connection_made(compute_t)  # type: ignore[arg-type]
    client.track = True
    ended: asyncio.Future[Side] = asyncio.get_running_loop().create_future()
    client.relay_to(compute, ended=ended)
    compute.relay_to(client, ended=ended)
    return client, client_t, compute_t


def _msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


async def test_only_a_whole_final_terminate_message_is_taken_for_one() -> None:
    query = _msg(b"Q", b"SELECT 1\x00")
    # A COPY row whose last five bytes look like a Terminate: relayed, the session goes on.
    copy_row = _msg(b"d", b"row\x00" + TERMINATE)
    for chunks, terminated in (
        ([query, TERMINATE], True),
        ([query + TERMINATE], True),
        ([copy_row], False),
        ([copy_row[:7], copy_row[7:]], False),  # split inside the row: its tail still looks like one
        ([query[:3], query[3:] + TERMINATE], True),  # a header split across chunks
        ([query[:9], query[9:], TERMINATE], True),  # a payload split across chunks
        ([copy_row[:-5], copy_row[-5:]], False),  # the fake Terminate arrives as a chunk of its own
    ):
        client, client_t, compute_t = await _tracked_pair()
        for chunk in chunks:
            client.data_received(chunk)
        sent = b"".join(chunks)
        assert client_t.closed is terminated, chunks
        assert bytes(compute_t.written) == (sent[:-5] if terminated else sent), chunks


async def test_the_compute_side_writes_straight_to_the_client_transport() -> None:
    client, client_t, compute_t = await _tracked_pair()
    _, compute_side = client, client.peer
    assert compute_side is not None
    assert compute_side.data_received == client_t.write  # no Python frame of ours per chunk
    compute_side.data_received(b"Z\x00\x00\x00\x05I")
    assert bytes(client_t.written) == b"Z\x00\x00\x00\x05I"
    client.connection_lost(None)  # the client goes: the compute's output is kept, not written
    compute_side.data_received(b"more")
    assert bytes(client_t.written) == b"Z\x00\x00\x00\x05I" and bytes(compute_side.buf) == b"more"
