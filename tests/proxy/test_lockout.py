"""Issue #10 (5): clients that never authenticate cannot lock the real ones out.

Only authenticated sessions count against ``max_client_connections``; one address runs at most
``max_unauthenticated_per_address`` handshakes at once (more wait in line, and past ten times that
are refused); every wait before authentication (in line, the first byte, TLS, the startup packet,
SCRAM) ends at ``auth_timeout``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import pytest

from proxy.admission import PreAuthGate
from proxy.codec import encode_startup
from tests.proxy.harness import PASSWORD, Harness

ATTACKER = "127.0.0.2"  # another loopback address: the attack comes from one address, the user from another
TRICKLERS = 1000


# The attacker runs in its own process, as it would: 1,000 slowloris sockets from one address,
# each sending its startup packet a byte every half second and reconnecting when closed.
ATTACK = r"""
import asyncio, contextlib, resource, socket, sys
port, count, source = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
packet = bytes.fromhex(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * count + 256), hard))

async def trickle(opened):
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            opened.add(id(asyncio.current_task()))
            for i in range(len(packet)):
                await loop.sock_sendall(sock, packet[i:i + 1])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await loop.sock_recv(sock, 1024)
                        break  # refused or closed: start over
        except OSError:
            pass
        finally:
            sock.close()
        await asyncio.sleep(0.2)

async def main():
    opened = set()
    tasks = [asyncio.create_task(trickle(opened)) for _ in range(count)]
    while len(opened) < count:
        await asyncio.sleep(0.1)
    print("ready", flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main())
"""


async def test_a_thousand_trickling_sockets_from_one_address_do_not_keep_a_client_out(harness: Harness) -> None:
    config = harness.proxy.config
    saved = config.max_client_connections, config.max_unauthenticated_per_address, config.auth_timeout
    # A cap far below the attack; a long auth_timeout, so the per-address cap is what protects.
    config.max_client_connections, config.max_unauthenticated_per_address, config.auth_timeout = 50, 20, 20
    packet = encode_startup({"user": "app", "database": "postgres"}).hex()
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ATTACK, str(harness.proxy.port), str(TRICKLERS), ATTACKER, packet,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert attacker.stdout is not None
        line = await asyncio.wait_for(attacker.stdout.readline(), 120)
        assert line == b"ready\n"  # every one of the 1,000 has connected at least once
        for _ in range(3):
            conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app",
                                         password=PASSWORD, database="postgres", ssl=False, timeout=60)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
            assert harness.proxy.unauthenticated(ATTACKER) <= 20
            assert harness.proxy.gate.waiting(ATTACKER) <= 200
    finally:
        attacker.kill()
        await attacker.wait()
        config.max_client_connections, config.max_unauthenticated_per_address, config.auth_timeout = saved
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


async def test_a_burst_from_one_address_waits_in_line_instead_of_being_refused(harness: Harness) -> None:
    """An application server opening many connections at once is one address: beyond the per-address
    handshake limit its connections wait their turn, and all of them get in."""
    config = harness.proxy.config
    saved = config.max_unauthenticated_per_address
    config.max_unauthenticated_per_address = 2
    try:
        conns = await asyncio.gather(*(asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app",
                                                       password=PASSWORD, database="postgres", ssl=False,
                                                       timeout=60) for _ in range(12)))
        try:
            assert [await c.fetchval("SELECT 1") for c in conns] == [1] * 12
        finally:
            await asyncio.gather(*(c.close() for c in conns))
    finally:
        config.max_unauthenticated_per_address = saved
    assert harness.proxy.unauthenticated("127.0.0.1") == 0 and harness.proxy.gate.waiting("127.0.0.1") == 0


async def test_the_gate_passes_slots_on_and_forgets_idle_addresses() -> None:
    gate = PreAuthGate(per_address=1)
    assert gate.admit("a") is True and gate.admit("b") is True  # addresses are apart
    first, second = gate.admit("a"), gate.admit("a")
    assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
    assert [gate.admit("a") for _ in range(8)].count(False) == 0 and gate.admit("a") is False  # line full at 10
    gate.release("a")  # the slot goes to the first in line, not back to the pool
    assert first.done() and gate.active("a") == 1 and gate.waiting("a") == 9
    gate.give_up("a", second)  # a waiter's deadline: it leaves the line
    assert gate.waiting("a") == 8
    gate.give_up("a", first)  # its turn had come, then it gave up: the slot passes on
    assert gate.active("a") == 1 and gate.waiting("a") == 7
    for _ in range(8):
        gate.release("a")
    gate.release("b")
    assert gate._addresses == {}
