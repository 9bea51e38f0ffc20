"""Issue #12 (1): clients see their compute backend's real process id; the proxy issues only the
secret. Pre-startup garbage is closed quietly, as Postgres does."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import psycopg
import pytest

from proxy.codec import encode_cancel
from tests.proxy.harness import PASSWORD, Harness


async def _apg(harness: Harness, branch: str = "main") -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                 database="postgres", ssl=False, server_settings={"options": f"endpoint={branch}"}
                                 if branch != "main" else None)


async def test_backend_pid_is_the_real_one(harness: Harness) -> None:
    conn = await harness.apg()
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert conn.get_server_pid() == pid
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid) == 1
    finally:
        await conn.close()

    def psycopg_side() -> tuple[int, int]:
        with psycopg.connect(harness.dsn()) as c:
            return c.info.backend_pid, c.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]

    told, real = await asyncio.to_thread(psycopg_side)
    assert told == real


async def test_notify_carries_the_notifiers_real_pid(harness: Harness) -> None:
    def run() -> tuple[int, list[int]]:
        with psycopg.connect(harness.dsn(), autocommit=True) as listener:
            listener.execute("LISTEN pids")
            with psycopg.connect(harness.dsn(), autocommit=True) as sender:
                sender.execute("NOTIFY pids, 'x'")
                sender_pid = sender.info.backend_pid
            return sender_pid, [n.pid for n in listener.notifies(timeout=10, stop_after=1)]

    sender_pid, pids = await asyncio.to_thread(run)
    assert pids == [sender_pid]


async def test_terminating_ones_own_backend_ends_the_session_as_on_postgres(harness: Harness) -> None:
    def run() -> tuple[str | None, str, bool]:
        with psycopg.connect(harness.dsn(), autocommit=True) as c:
            try:
                c.execute("SELECT pg_terminate_backend(%s)", [c.info.backend_pid])
            except psycopg.OperationalError as e:
                return e.sqlstate, str(e), c.closed
            return None, "", c.closed

    sqlstate, message, closed = await asyncio.to_thread(run)
    assert sqlstate == "57P01"  # AdminShutdown, as from plain Postgres
    assert "terminating connection due to administrator command" in message
    assert closed


async def test_cancel_keys_of_two_branches_never_collide_and_a_mixed_key_cancels_nothing(harness: Harness) -> None:
    main, feature = await harness.apg(), await _apg(harness, "feature")
    try:
        main_key = (main.get_server_pid(), main._protocol.backend_secret)
        feature_key = (feature.get_server_pid(), feature._protocol.backend_secret)
        assert main_key != feature_key and main_key[1] != feature_key[1]
        assert harness.proxy.cancels.find(*main_key) is not None
        assert harness.proxy.cancels.find(*feature_key) is not None
        assert harness.proxy.cancels.find(main_key[0], feature_key[1]) is None

        # A CancelRequest with main's pid and feature's secret reaches nothing: the sleep finishes.
        sleeping = asyncio.create_task(main.fetchval("SELECT 7 FROM pg_sleep(1.5)"))
        await asyncio.sleep(0.3)
        _, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.port)
        writer.write(encode_cancel(main_key[0], feature_key[1]))
        await writer.drain()
        writer.close()
        assert await sleeping == 7
    finally:
        await main.close()
        await feature.close()


@pytest.mark.parametrize("payload", [b"X\x00\x00\x00\x04", struct.pack("!iI", 20000, 196608), struct.pack("!i", 3)])
async def test_pre_startup_garbage_is_closed_quietly_and_counted(harness: Harness, payload: bytes) -> None:
    """A driver that sends Terminate before any startup packet reads as a 1.4 GB packet: Postgres
    logs it and closes without a word, and so does the proxy."""
    before = _count(harness)
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.port)
    writer.write(payload)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    assert _count(harness) == before + 1


def _count(harness: Harness) -> float:
    line = harness.metric("lakelet_proxy_invalid_startup_packets_total")
    return float(line.split()[-1]) if line else 0.0
