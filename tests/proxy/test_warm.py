"""Warm backends (issue #12, part 3): a client's backend is reset with DISCARD ALL and handed to
the next client with the same startup parameters, with its real pid — but only when the reset
proves it clean; a backend in an unknown state is closed, never reused."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import psycopg
import pytest

from lakelet.project import create_role
from proxy import codec
from proxy.warm import left_in_open_transaction, reset_outcome
from tests.conftest import poll_until
from tests.proxy.harness import PASSWORD, Harness, relayed_by

NONCE = "0123456789abcdef"


def _clean_reset_output(nonce: str = NONCE) -> bytes:
    row_description = codec.encode_message(b"T", b"\x00\x01?column?\x00" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0))
    return (codec.encode_message(b"C", b"DISCARD ALL\x00") + codec.ready_for_query(b"I") + row_description
            + codec.encode_message(b"D", struct.pack("!hi", 1, len(nonce)) + nonce.encode())
            + codec.encode_message(b"C", b"SELECT 1\x00") + codec.ready_for_query(b"I"))


def test_reset_outcome_needs_the_whole_proof() -> None:
    clean = _clean_reset_output()
    assert reset_outcome(clean, NONCE) is True
    assert reset_outcome(b"leftover output of the client's last query" + clean, NONCE) is True
    for cut in (1, 6, 20, len(clean) - 1):
        assert reset_outcome(clean[:cut], NONCE) in (None, False)
    assert reset_outcome(clean, "another-nonce") is None
    # DISCARD ALL refused (a transaction was open): an error, and the nonce query fails too.
    failed = codec.error_response("ERROR", "25001", "DISCARD ALL cannot run inside a transaction block") \
        + codec.ready_for_query(b"E")
    assert reset_outcome(failed, NONCE) is False
    # The nonce row without DISCARD ALL completing right before it proves nothing.
    no_discard = clean.replace(b"DISCARD ALL", b"DISCARD XYZ")
    assert reset_outcome(no_discard, NONCE) is False
    # A message squeezed between the discard and the row description is not our sequence.
    idle = codec.ready_for_query(b"I")
    squeezed = clean.replace(idle + b"T", idle + codec.parameter_status("x", "y") + b"T", 1)
    assert reset_outcome(squeezed, NONCE) is False


def test_an_open_transaction_is_told_from_a_failed_one() -> None:
    def error(code: str) -> bytes:
        return codec.error_response("ERROR", code, "x") + codec.ready_for_query(b"E")

    # Left open: DISCARD ALL refused (25001), then our SELECT fails (25P02) — roll back and retry.
    assert left_in_open_transaction(error("25001") + error("25P02"))
    assert left_in_open_transaction(error("25001"))  # the SELECT's answer may not have arrived yet
    # Left failed: everything answers 25P02 — the backend is closed.
    assert not left_in_open_transaction(error("25P02") + error("25P02"))
    # A 25P02 of the client's own before our refusal: it had failed already.
    assert not left_in_open_transaction(error("25P02") + error("25001") + error("25P02"))
    # Not ending in a failed transaction at all.
    assert not left_in_open_transaction(error("25001") + codec.ready_for_query(b"I"))


async def _idle_warm(harness: Harness, n: int) -> None:
    await poll_until(lambda: len(harness.proxy.warm) >= n, f"{n} warm backend(s)", timeout=30, every=0.05)


@pytest.mark.parametrize("relay", ["native", "python"])
async def test_next_client_gets_the_same_backend_reset(harness: Harness, relay: str) -> None:
    """Whichever relay moved the session, its Terminate leaves the backend to be reset and kept."""
    with relayed_by(harness, relay):
        await _same_backend_reset(harness)


async def _same_backend_reset(harness: Harness) -> None:
    await harness.proxy.warm.close()  # start from an empty pool
    conn = await harness.apg()
    pid = conn.get_server_pid()
    await conn.execute("SET work_mem = '1234kB'")
    await conn.execute("CREATE TEMP TABLE scratch (x int)")
    await conn.execute("PREPARE p AS SELECT 1")
    await conn.execute("LISTEN somewhere")
    await conn.execute("SELECT pg_advisory_lock(42)")
    await conn.close()
    await _idle_warm(harness, 1)

    reused = harness.proxy.warm.reused
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() == pid
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert harness.proxy.warm.reused == reused + 1
        assert await conn.fetchval("SHOW work_mem") != "1234kB"
        assert await conn.fetchval("SELECT to_regclass('pg_temp.scratch')") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                   "AND pid = pg_backend_pid()") == 0
        assert conn.get_settings().application_name == ""  # the greeting replayed as it started
    finally:
        await conn.close()


async def test_cancel_reaches_a_reused_backend(harness: Harness) -> None:
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    await conn.close()
    await _idle_warm(harness, 1)
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() == pid
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        task.cancel()  # a CancelRequest with the reused backend's pid and the new secret
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_a_client_that_leaves_mid_transaction_has_it_rolled_back(harness: Harness) -> None:
    """Postgres rolls back the transaction of a client that disconnects inside one; the warm
    backend does the same, and is kept only once a second reset proves it clean."""
    await harness.proxy.warm.close()
    setup = await harness.apg()
    await setup.execute("CREATE TABLE IF NOT EXISTS warm_left (x int)")
    await setup.close()
    await _idle_warm(harness, 1)

    rolled_back = harness.proxy.warm.rolled_back
    conn = await harness.apg()
    await conn.execute("BEGIN")
    await conn.execute("INSERT INTO warm_left VALUES (1)")
    await conn.execute("SET LOCAL work_mem = '1234kB'")
    pid = conn.get_server_pid()
    await conn.close()  # Terminate with the transaction open
    await _idle_warm(harness, 1)
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() == pid
        assert await conn.fetchval("SELECT count(*) FROM warm_left") == 0
        assert await conn.fetchval("SHOW work_mem") != "1234kB"
        assert not conn.is_in_transaction()  # the server said idle, not in a transaction
    finally:
        await conn.close()
    assert harness.proxy.warm.rolled_back == rolled_back + 1


async def test_a_client_that_leaves_a_failed_transaction_does_not_lend_its_backend(harness: Harness) -> None:
    """An error or cancel never rolled back (an interrupted client, typically): the backend ends,
    as it would on Postgres when that client goes — tools watching its pid see it go."""
    await harness.proxy.warm.close()
    conn = await harness.apg()
    await conn.execute("BEGIN")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1/0")
    pid = conn.get_server_pid()
    discarded = harness.proxy.warm.discarded
    await conn.close()
    await poll_until(lambda: harness.proxy.warm.discarded > discarded, "the backend closed", timeout=30, every=0.05)
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() != pid
        await _gone(conn, pid)
    finally:
        await conn.close()


async def test_a_client_that_cancelled_a_query_does_not_lend_its_backend(harness: Harness) -> None:
    """An interrupted client (Ctrl-C: cancel, roll back, leave): its backend ends with it, as on
    Postgres, where tools and drivers' tests watch the pid go away."""
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    task.cancel()  # asyncpg sends a CancelRequest
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()  # a clean Terminate from an idle session
    other = await harness.apg()
    try:
        assert other.get_server_pid() != pid
        await _gone(other, pid)
    finally:
        await other.close()


async def test_a_client_arriving_during_a_reset_waits_for_that_backend(harness: Harness) -> None:
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    await conn.close()
    # Straight back in: the reset may still be in flight; the client waits for it rather than
    # opening a second backend.
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() == pid
        assert len(harness.proxy.warm) == 0
    finally:
        await conn.close()


async def test_idle_warm_backends_give_their_slots_to_a_new_client(harness: Harness) -> None:
    """A role limited to one connection: its idle warm backend (another application name) must
    not make the compute refuse the role's next client with 53300."""
    await create_role(harness.endpoints, "main", "limited", PASSWORD)
    admin = await (await harness.endpoints.node("main")).connect()
    try:
        await admin.execute("ALTER ROLE limited CONNECTION LIMIT 1")
    finally:
        await admin.close()
    await harness.proxy.warm.close()

    async def connect(name: str) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="limited", password=PASSWORD,
                                     database="postgres", ssl=False, server_settings={"application_name": name})

    conn = await connect("first")
    await conn.close()
    await _idle_warm(harness, 1)
    conn = await connect("second")
    try:
        assert await conn.fetchval("SHOW application_name") == "second"
        assert len(harness.proxy.warm) == 0
    finally:
        await conn.close()


async def test_a_client_killed_mid_query_does_not_lend_its_backend(harness: Harness) -> None:
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    conn.terminate()  # the socket closes with the query running, no Terminate sent
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError)):
        await task
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() != pid
        await poll_until(lambda: harness.proxy.warm.discarded > 0, "the running backend discarded",
                         timeout=30, every=0.1)
        await _gone(conn, pid)
    finally:
        await conn.close()


async def test_other_startup_parameters_get_another_backend(harness: Harness) -> None:
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    await conn.close()
    await _idle_warm(harness, 1)
    other = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                  database="postgres", ssl=False, server_settings={"application_name": "other"})
    try:
        assert other.get_server_pid() != pid
        assert await other.fetchval("SHOW application_name") == "other"
    finally:
        await other.close()


async def test_a_restarted_compute_never_hands_out_a_dead_backend(harness: Harness) -> None:
    await harness.proxy.warm.close()
    dsn = harness.dsn(options="endpoint=feature")

    def pid_of() -> int:
        with psycopg.connect(dsn) as c:
            return int(c.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]

    first = await asyncio.to_thread(pid_of)
    await _idle_warm(harness, 1)
    await harness.endpoints.suspend("feature")
    assert await asyncio.to_thread(pid_of) != first  # woke the compute, opened a fresh backend


async def _gone(conn: asyncpg.Connection, pid: int) -> None:
    for _ in range(100):
        if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"backend {pid} still runs")


async def test_an_idle_warm_backend_is_closed_after_a_while(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm backend holds a connection slot and keeps DROP DATABASE from working: not forever."""
    monkeypatch.setattr("proxy.warm.IDLE_LIMIT", 0.5)
    await harness.proxy.warm.close()
    conn = await harness.apg()
    pid = conn.get_server_pid()
    await conn.close()
    await _idle_warm(harness, 1)
    await poll_until(lambda: len(harness.proxy.warm) == 0, "the idle warm backend closed", timeout=30, every=0.05)
    conn = await harness.apg()
    try:
        assert conn.get_server_pid() != pid
        await _gone(conn, pid)
    finally:
        await conn.close()


async def test_warm_backends_are_capped_per_branch_across_parameters(harness: Harness) -> None:
    """An application name per process must not fill the compute's slots with idle backends."""
    await harness.proxy.warm.close()
    saved = harness.proxy.warm.per_key
    harness.proxy.warm.per_key = 2
    before = harness.proxy.warm.discarded
    try:
        for name in ("a", "b", "c", "d"):
            conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                         database="postgres", ssl=False, server_settings={"application_name": name})
            await conn.close()
            await asyncio.sleep(0.2)
        await poll_until(lambda: harness.proxy.warm.discarded - before == 2, "the oldest two closed",
                         timeout=30, every=0.05)
        assert len(harness.proxy.warm) == 2
    finally:
        harness.proxy.warm.per_key = saved
