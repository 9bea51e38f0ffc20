"""Sessions through the proxy to real computes: psql, asyncpg, psycopg and pgbench, TLS, SCRAM
with and without channel binding, routing, cancel, COPY, LISTEN/NOTIFY, hostile input."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import time

import asyncpg
import psycopg
import pytest

from proxy.codec import encode_ssl_request, encode_startup
from storage.postgres import PgBinaries
from tests.proxy.harness import PASSWORD, PSQL, Harness, relayed_by


async def test_psql_simple_query_and_copy(harness: Harness) -> None:
    out = await asyncio.to_thread(subprocess.run, [PSQL, harness.dsn(), "-Atc", "SELECT count(*) FROM big"],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "200000"
    copy = await asyncio.to_thread(
        subprocess.run, [PSQL, harness.dsn(), "-Atc", "\\copy (SELECT id FROM big WHERE id <= 3) TO STDOUT"],
        capture_output=True, text=True, timeout=60)
    assert copy.stdout.split() == ["1", "2", "3"]


async def test_asyncpg_extended_protocol_copy_and_large_result(harness: Harness) -> None:
    conn = await harness.apg()
    try:
        assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
        await conn.execute("CREATE TEMP TABLE t (id int, v text)")
        await conn.copy_records_to_table("t", records=[(i, f"v{i}") for i in range(1000)])
        assert await conn.fetchval("SELECT count(*) FROM t") == 1000
        rows = await conn.fetch("SELECT * FROM big")  # ~25 MB through the relay
        assert len(rows) == 200000 and rows[-1]["id"] == 200000
    finally:
        await conn.close()


async def test_startup_parameters_reach_the_compute_and_its_greeting_reaches_the_client(harness: Harness) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                 database="postgres", ssl=False,
                                 server_settings={"application_name": "greeter", "search_path": "pg_catalog"})
    try:
        settings = conn.get_settings()  # ParameterStatus messages of the compute's greeting
        assert settings.application_name == "greeter"
        assert settings.server_version.startswith(str(conn.get_server_version().major))
        assert await conn.fetchval("SHOW search_path") == "pg_catalog"
        assert await conn.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()") \
            == "greeter"
    finally:
        await conn.close()


async def test_an_error_from_the_compute_during_startup_reaches_the_client(harness: Harness) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError, match='database "no_such_db" does not exist'):
        await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                              database="no_such_db", ssl=False)


async def test_psycopg_sync_and_async_with_listen_notify(harness: Harness) -> None:
    def sync_part() -> list[str]:
        with psycopg.connect(harness.dsn(), autocommit=True) as listener:
            listener.execute("LISTEN ch")
            with psycopg.connect(harness.dsn(), autocommit=True) as sender:
                sender.execute("NOTIFY ch, 'hello'")
            return [n.payload for n in listener.notifies(timeout=10, stop_after=1)]

    assert await asyncio.to_thread(sync_part) == ["hello"]
    async with await psycopg.AsyncConnection.connect(harness.dsn()) as conn:
        cur = await conn.execute("SELECT %s::text || 'd'", ["worl"])
        assert await cur.fetchone() == ("world",)


async def _client_script(script: str, harness: Harness) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with the session's DSN as argv[1] in its own process: libpq's blocking
    cancel holds the GIL, and clients run it from their own processes anyway."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script, harness.dsn()],
                                   capture_output=True, text=True, timeout=120)


async def test_cancel_reaches_the_right_backend(harness: Harness) -> None:
    conn = await harness.apg()
    try:
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        task.cancel()  # asyncpg sends a CancelRequest with the proxy-issued key
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

    # libpq's blocking cancel holds the GIL, so it runs in its own process, as clients do.
    script = (
        "import sys, threading, psycopg\n"
        "with psycopg.connect(sys.argv[1]) as c:\n"
        "    threading.Timer(0.5, c.cancel).start()\n"
        "    try:\n"
        "        c.execute('SELECT pg_sleep(30)')\n"
        "    except psycopg.errors.QueryCanceled as e:\n"
        "        print(e.sqlstate)\n"
    )
    out = await _client_script(script, harness)
    assert out.stdout.strip() == "57014", out.stderr


async def test_a_cancel_has_landed_when_its_connection_closes(harness: Harness) -> None:
    """libpq and asyncpg wait for the cancel connection to close before their next query, because
    Postgres signals the backend first: a cancel of an idle session must never hit the query
    after it. (The proxy used to close as soon as it had written the request.)"""
    script = (
        "import sys, psycopg\n"
        "hit = 0\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
        "    for _ in range(30):\n"
        "        c.cancel()\n"
        "        try:\n"
        "            c.execute('SELECT pg_sleep(0.02)')\n"
        "        except psycopg.errors.QueryCanceled:\n"
        "            hit += 1\n"
        "print(hit)\n"
    )
    out = await _client_script(script, harness)
    assert out.stdout.strip() == "0", (out.stdout, out.stderr)


@pytest.mark.parametrize("binding", ["require", "disable"])
async def test_tls_verify_full_with_and_without_channel_binding(harness: Harness, binding: str) -> None:
    assert harness.proxy.ca_file is not None
    dsn = harness.dsn(sslmode="verify-full", sslrootcert=str(harness.proxy.ca_file), channel_binding=binding)

    def run() -> tuple[bool, int]:
        with psycopg.connect(dsn) as c:
            return c.pgconn.ssl_in_use, c.execute("SELECT 1").fetchone()[0]  # type: ignore[index]

    assert await asyncio.to_thread(run) == (True, 1)


async def test_sslmode_require_with_psql(harness: Harness) -> None:
    out = await asyncio.to_thread(subprocess.run, [PSQL, harness.dsn(sslmode="require"), "-Atc", "SELECT 7"],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr


async def test_branch_chosen_by_options(harness: Harness) -> None:
    def run() -> None:
        with psycopg.connect(harness.dsn(options="endpoint=feature"), autocommit=True) as c:
            c.execute("CREATE TABLE only_on_feature (x int)")
        with psycopg.connect(harness.dsn(), autocommit=True) as c:
            assert c.execute("SELECT to_regclass('only_on_feature')").fetchone() == (None,)
        with psycopg.connect(harness.dsn(options="'-c endpoint=feature -c search_path=public'")) as c:
            assert c.execute("SELECT to_regclass('only_on_feature') IS NOT NULL, current_setting('search_path')"
                             ).fetchone() == (True, "public")

    await asyncio.to_thread(run)  # the proxy shares this event loop: blocking clients run in threads


async def test_unknown_branch_is_a_clear_fatal(harness: Harness) -> None:
    with pytest.raises(psycopg.OperationalError, match='endpoint "nope" does not exist') as err:
        await asyncio.to_thread(psycopg.connect, harness.dsn(options="endpoint=nope"))
    assert "options=endpoint=" in str(err.value)


async def test_wrong_password_does_not_wake_the_compute(harness: Harness) -> None:
    await harness.endpoints.suspend("feature")
    starts_before = harness.metric('lakelet_compute_starts_total{branch="feature"}')
    for user in ("app", "no_such_role"):
        with pytest.raises(psycopg.OperationalError, match=f'password authentication failed for user "{user}"'):
            await asyncio.to_thread(psycopg.connect, harness.dsn(user=user, password="wrong",
                                                                 options="endpoint=feature"))
    assert harness.endpoints.endpoint("feature").state == "suspended"
    assert harness.metric('lakelet_compute_starts_total{branch="feature"}') == starts_before
    assert "lakelet_proxy_auth_failures_total 2.0" in harness.metric("lakelet_proxy_auth_failures_total")


async def _raw_async(port: int, payload: bytes) -> bytes:
    """Send one payload, read until the proxy closes (incomplete packets: after auth_timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def _raw(port: int, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


async def test_hostile_startup_packets_then_a_normal_session(harness: Harness) -> None:
    """Random first packets (the codec's own property tests cover the parser; this covers the
    server loop around it): each is refused or ignored, and a normal session works afterwards."""
    rng = random.Random(5432)
    payloads = [rng.randbytes(rng.randint(1, 200)) for _ in range(40)]
    payloads += [struct.pack("!i", len(p) + 4) + p for p in payloads[:20]]  # plausible lengths
    clients, cancel_keys = harness.proxy.open_clients, len(harness.proxy.cancels)
    replies = await asyncio.gather(*(_raw_async(harness.proxy.port, junk) for junk in payloads))
    for reply in replies:
        assert reply == b"" or reply[:1] in (b"E", b"N", b"S", b"R"), reply
    # Nothing is left behind by them: no connection still counted, no cancel key kept.
    for _ in range(50):
        if harness.proxy.open_clients == clients:
            break
        await asyncio.sleep(0.1)
    assert (harness.proxy.open_clients, len(harness.proxy.cancels)) == (clients, cancel_keys)
    conn = await harness.apg()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_protocol_errors_are_fatal_08p01_and_the_proxy_lives_on(harness: Harness) -> None:
    for payload in (struct.pack("!iI", 8, 1234 << 16),
                    encode_startup({"database": "postgres"}), encode_ssl_request() + b"stuffed bytes"):
        reply = await asyncio.to_thread(_raw, harness.proxy.port, payload)
        assert reply.startswith(b"E") and b"C08P01" in reply, reply
    async with await psycopg.AsyncConnection.connect(harness.dsn()) as c:
        assert await (await c.execute("SELECT 1")).fetchone() == (1,)


async def test_auth_timeout_closes_silent_clients(harness: Harness) -> None:
    started = time.monotonic()
    reply = await asyncio.to_thread(_raw, harness.proxy.port, encode_startup({"user": "app"}))
    assert reply.startswith(b"R")  # asked for SASL, then gave up on us
    assert b"authentication timed out" in reply
    assert time.monotonic() - started < 30


async def test_pgbench_through_the_proxy(harness: Harness, pg: PgBinaries) -> None:
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    args = [pg["pgbench"], "-h", "127.0.0.1", "-p", str(harness.proxy.port), "-U", "app", "postgres"]
    init = await asyncio.to_thread(subprocess.run, [*args[:-1], "-i", "-s", "1", "postgres"], env=env,
                                   capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = await asyncio.to_thread(subprocess.run, [*args[:-1], "-c", "4", "-t", "50", "-M", "extended", "postgres"],
                                  env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 200/200" in run.stdout


async def test_max_client_connections(harness: Harness) -> None:
    harness.proxy.config.max_client_connections = 1
    try:
        async with await psycopg.AsyncConnection.connect(harness.dsn()):
            with pytest.raises(psycopg.OperationalError, match="too many clients"):
                await psycopg.AsyncConnection.connect(harness.dsn())
    finally:
        harness.proxy.config.max_client_connections = 10000


@pytest.mark.parametrize("relay", ["native", "python"])
async def test_slow_reader_does_not_make_the_proxy_buffer(harness: Harness, relay: str) -> None:
    """A client that stops reading a large result: the relay (native or Python) stops reading
    the compute instead of buffering the result in memory."""
    with relayed_by(harness, relay):
        native = harness.proxy.relay
        # psycopg.connect waits without holding the GIL (the proxy runs on this process' loop).
        conn = await asyncio.to_thread(psycopg.connect, harness.dsn())
        conn.pgconn.send_query(b"SELECT repeat('y', 1000) FROM generate_series(1, 100000)")  # ~100 MB
        await asyncio.sleep(2)
        if native is not None:
            assert native.live >= 1  # this session is relayed natively
            buffered = [native.buffered]
        else:
            buffered = [t.get_write_buffer_size() for t in _client_transports(harness)]
        conn.pgconn.finish()
        assert buffered and max(buffered) < 4 << 20  # bounded by a socket's worth, not 100 MB


def _client_transports(harness: Harness) -> list[asyncio.Transport]:
    import gc

    from proxy.pipe import Side

    return [o.transport for o in gc.get_objects()
            if isinstance(o, Side) and o.name == "client" and o.peer is not None and o.transport is not None
            and not o.transport.is_closing()]
