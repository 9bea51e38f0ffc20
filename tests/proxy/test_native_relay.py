"""The native relay (proxy/relay.c): which sessions it takes, that it moves every byte in order
under back-pressure both ways, and that it lets go of everything — sockets, buffers, its thread —
when a session or the proxy ends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy import Proxy, ProxyConfig
from proxy import relay as native
from tests.proxy.harness import PASSWORD, Harness


def _relay(harness: Harness) -> native.Relay:
    if harness.proxy.relay is None:
        pytest.skip("no native relay build (scripts/setup.sh builds it where cc exists)")
    return harness.proxy.relay


async def _until(predicate, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_plain_sessions_go_native_and_tls_ones_stay_in_python(harness: Harness) -> None:
    relay = _relay(harness)
    await _until(lambda: relay.live == 0)
    conn = await harness.apg()
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert relay.live == 1
        assert harness.metric("lakelet_proxy_relay_native_sessions") == "lakelet_proxy_relay_native_sessions 1.0"
    finally:
        await conn.close()
    await _until(lambda: relay.live == 0)
    tls = await psycopg.AsyncConnection.connect(harness.dsn(sslmode="require"))
    try:
        cur = await tls.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert await cur.fetchone() == (False,)  # the proxy terminates TLS; the compute hop is local
        assert tls.pgconn.ssl_in_use
        assert relay.live == 0  # its bytes are decrypted in Python, so relayed there
    finally:
        await tls.close()


async def test_large_payloads_both_ways_arrive_whole_and_in_order(harness: Harness) -> None:
    """Megabytes each way, more than a socket buffer holds: partial writes and back-pressure in
    both directions, checked byte for byte by digest on each side."""
    _relay(harness)
    conn = await harness.apg()
    try:
        payload = os.urandom(6 << 20)
        digest = await conn.fetchval("SELECT md5($1::bytea)", payload)
        assert digest == hashlib.md5(payload).hexdigest()
        rows = await conn.fetch("SELECT id, md5(pad || id::text) AS h FROM big ORDER BY id")
        assert len(rows) == 200000
        assert all(r["h"] == hashlib.md5(("x" * 100 + str(r["id"])).encode()).hexdigest() for r in rows[::997])
        assert [r["id"] for r in rows] == list(range(1, 200001))
        echoed = await conn.fetchval("SELECT $1::bytea", payload)
        assert echoed == payload
    finally:
        await conn.close()


async def test_a_client_that_vanishes_mid_result_frees_its_session(harness: Harness) -> None:
    relay = _relay(harness)
    await _until(lambda: relay.live == 0)
    fds = _open_fds()
    conn = await asyncio.to_thread(psycopg.connect, harness.dsn())
    conn.pgconn.send_query(b"SELECT repeat('z', 1000) FROM generate_series(1, 200000)")  # ~200 MB, unread
    await _until(lambda: relay.buffered > 0)  # the client's socket is full: the relay holds the rest
    os.close(conn.pgconn.socket)  # gone without a word, as a killed process goes
    await _until(lambda: relay.live == 0)
    assert relay.buffered == 0
    await _until(lambda: _open_fds() <= fds)  # the proxy's sockets closed too, none leaked
    async with await psycopg.AsyncConnection.connect(harness.dsn()) as again:  # and it still serves
        assert await (await again.execute("SELECT 1")).fetchone() == (1,)


async def test_proxy_shutdown_stops_native_sessions_and_their_thread(harness: Harness, tmp_path: Path) -> None:
    _relay(harness)
    fds = _open_fds()
    proxy = Proxy(harness.endpoints, ProxyConfig(listen_port=0, tls_dir=tmp_path / "tls", auth_timeout=2,
                                                 warm_backends=0))
    await proxy.start()
    assert proxy.relay is not None
    conns = [await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", password=PASSWORD,
                                   database="postgres", ssl=False) for _ in range(3)]
    busy = asyncio.ensure_future(conns[0].fetchval("SELECT pg_sleep(30)"))
    await _until(lambda: proxy.relay is not None and proxy.relay.live == 3)
    await proxy.close()
    assert proxy.relay is None
    with pytest.raises((asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError,
                        asyncpg.exceptions.AdminShutdownError)):
        await asyncio.wait_for(busy, 20)
    for c in conns:
        c.terminate()
    await _until(lambda: _open_fds() <= fds)


async def test_a_backend_that_ends_the_session_reaches_the_client_first(harness: Harness) -> None:
    """The compute says FATAL and closes: the client reads the FATAL (as from plain Postgres),
    then the end — the relay delivers a side's last words before ending the session."""
    relay = _relay(harness)
    victim = await psycopg.AsyncConnection.connect(harness.dsn())
    killer = await harness.apg()
    try:
        pid = (await (await victim.execute("SELECT pg_backend_pid()")).fetchone())[0]
        sleeping = asyncio.ensure_future(victim.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.2)
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(psycopg.errors.AdminShutdown, match="terminating connection due to administrator"):
            await asyncio.wait_for(sleeping, 20)
    finally:
        await victim.close()
        await killer.close()
    await _until(lambda: relay.live == 0)


def test_an_edited_source_or_the_switch_means_the_python_relay(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if native.library() is None:
        pytest.skip("no native relay build")
    edited = tmp_path / "relay.c"
    shutil.copy(native.SOURCE, edited)
    with edited.open("a") as f:
        f.write("/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.library() is None  # no build of this text: never an older build's behaviour
    monkeypatch.undo()
    assert native.library() is not None
    monkeypatch.setenv("LAKELET_INTERPRETED", "1")
    assert native.library() is None
    assert native.Relay.open(asyncio.new_event_loop()) is None
