"""Issue #10 (5): clients that never authenticate cannot lock the real ones out.

Only authenticated sessions count against ``max_client_connections``; one address holds at most
``max_unauthenticated_per_address`` sockets before authentication; every wait before
authentication (the first byte, TLS, the startup packet, SCRAM) ends at ``auth_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time

import asyncpg
import pytest

from proxy.codec import encode_startup
from tests.proxy.harness import PASSWORD, Harness

ATTACKER = "127.0.0.2"  # another loopback address: the attack comes from one address, the user from another
TRICKLERS = 1000


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def _trickle(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """A slowloris client: connect, send the startup packet a byte at a time, slowly; when the proxy
    closes the socket, connect again — until told to stop."""
    packet = encode_startup({"user": "app", "database": "postgres"})
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((ATTACKER, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            opened[0] += 1
            for i in range(len(packet)):
                await loop.sock_sendall(sock, packet[i:i + 1])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        if not await loop.sock_recv(sock, 1024):
                            break  # closed by the proxy
                        break  # refused with an error: start over
                if stop.is_set():
                    break
        except OSError:
            await asyncio.sleep(0.05)
        finally:
            sock.close()


async def test_a_thousand_trickling_sockets_from_one_address_do_not_keep_a_client_out(harness: Harness) -> None:
    _raise_nofile(4 * TRICKLERS + 1024)
    config = harness.proxy.config
    saved = config.max_client_connections, config.max_unauthenticated_per_address
    config.max_client_connections, config.max_unauthenticated_per_address = 50, 20
    stop = asyncio.Event()
    opened = [0]
    attackers = [asyncio.create_task(_trickle(harness.proxy.port, stop, opened)) for _ in range(TRICKLERS)]
    try:
        while opened[0] < TRICKLERS:  # every trickler has connected at least once
            await asyncio.sleep(0.1)
        for _ in range(3):
            conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app",
                                         password=PASSWORD, database="postgres", ssl=False, timeout=60)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
        assert harness.proxy.unauthenticated(ATTACKER) <= 20
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
        config.max_client_connections, config.max_unauthenticated_per_address = saved
    assert 'outcome="too_many_unauthenticated"' in harness.metric("lakelet_proxy_connections_total")


async def test_a_silent_socket_is_closed_after_auth_timeout(harness: Harness) -> None:
    """Nothing sent at all: the first-byte wait follows auth_timeout (2 s here), not a fixed minute."""
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.port)
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(reader.read(), 30) == b""
    finally:
        writer.close()
    assert time.monotonic() - started < 30


async def test_only_authenticated_sessions_count_against_max_client_connections(harness: Harness) -> None:
    """A socket stuck before authentication does not take the last slot."""
    config = harness.proxy.config
    saved = config.max_client_connections
    config.max_client_connections = 1
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.port)
    writer.write(encode_startup({"user": "app"}))  # now waiting in SCRAM, never answering
    try:
        assert (await reader.read(1)) == b"R"
        conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                     database="postgres", ssl=False)
        try:
            assert await conn.fetchval("SELECT 2") == 2
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                      database="postgres", ssl=False)
        finally:
            await conn.close()
    finally:
        writer.close()
        config.max_client_connections = saved
