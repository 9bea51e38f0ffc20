"""Transaction pooling (issue #16): mode selection, a backend lent per transaction and returned at
ReadyForQuery I, the queue and pool_timeout, a client dying mid-transaction, SET tracked and
replayed, cancel landing on the right backend, and idle pooled clients letting a compute suspend."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import psycopg
import pytest

from compute import EndpointConfig
from proxy.errors import SessionError
from proxy.handshake import Startup, route
from proxy.pooler import select_mode
from tests.conftest import poll_until
from tests.proxy.harness import PASSWORD, Harness


def pooled(harness: Harness, options: str = "pool=transaction", **kw: object) -> dict[str, object]:
    settings = {"options": options}
    settings.update(kw.pop("server_settings", {}))  # type: ignore[arg-type]
    args: dict[str, object] = dict(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                   database="postgres", ssl=False, server_settings=settings)
    args.update(kw)
    return args


async def apg(harness: Harness, options: str = "pool=transaction", **kw: object) -> asyncpg.Connection:
    return await asyncpg.connect(**pooled(harness, options, **kw))


@pytest.fixture
def pool_config(harness: Harness):
    cfg = harness.proxy.pooler.config
    saved = (cfg.size, cfg.branch_size, cfg.timeout, cfg.mode)
    yield cfg
    cfg.size, cfg.branch_size, cfg.timeout, cfg.mode = saved


def _pool(harness: Harness, branch: str = "main", database: str = "postgres"):
    return harness.proxy.pooler.pools[(branch, "app", database)]


async def _pid(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT pg_backend_pid()")


# -- mode selection -------------------------------------------------------------------------------------


def test_mode_from_options_sni_and_default() -> None:
    for options in ("pool=transaction", "--pool=transaction", "-c pool=transaction", "endpoint=x pool=transaction"):
        params = {"user": "u", "options": options}
        mode, sni = select_mode(params, None, "session")
        assert mode == "transaction" and "pool" not in params.get("options", "")
    params = {"user": "u", "options": "pool=session -c work_mem=1MB"}
    assert select_mode(params, None, "transaction") == ("session", None)
    assert params["options"] == "-c work_mem=1MB"
    assert select_mode({"user": "u"}, None, "transaction") == ("transaction", None)
    assert select_mode({"user": "u"}, None, "session") == ("session", None)
    # Neon's -pooler suffix: the branch is still the first label once the suffix is off.
    mode, sni = select_mode({"user": "u"}, "feature-pooler.db.example.com", "session")
    assert (mode, sni) == ("transaction", "feature.db.example.com")
    startup = Startup({"user": "u"}, 0, (), True, sni)
    assert route(startup, lambda b: b in ("main", "feature"), "main") == "feature"
    assert select_mode({"user": "u"}, "feature.db.example.com", "session") == ("session", "feature.db.example.com")
    with pytest.raises(SessionError, match="pool=sometimes is not a pooling mode"):
        select_mode({"user": "u", "options": "pool=sometimes"}, None, "session")


async def test_pooled_clients_share_a_backend_session_clients_do_not(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    a, b = await apg(harness), await apg(harness)
    s1 = await asyncpg.connect(**pooled(harness, "endpoint=main"))
    s2 = await asyncpg.connect(**pooled(harness, "endpoint=main"))
    try:
        assert await _pid(a) == await _pid(b)  # one idle backend serves both, one transaction at a time
        assert await _pid(s1) != await _pid(s2)
        assert s1.get_server_pid() == await _pid(s1)  # session mode keeps the real pid
        # Session mode in the pool metrics: each session holds a backend; idle pooled clients are not counted.
        metrics = harness.metric("lakelet_proxy_pool_")
        assert 'lakelet_proxy_pool_clients{branch="main",mode="session",state="active"} 2.0' in metrics
        assert 'lakelet_proxy_pool_backends{branch="main",mode="session",state="in_use"} 2.0' in metrics
        async with a.transaction():  # a pooled client in a transaction is not a session-mode one
            await a.fetchval("SELECT 1")
            assert 'lakelet_proxy_pool_clients{branch="main",mode="session",state="active"} 2.0' in \
                harness.metric("lakelet_proxy_pool_clients")
        # The config default: without pool= in the options, pool_mode decides.
        pool_config.mode = "transaction"
        c = await asyncpg.connect(**pooled(harness, "endpoint=main"))
        assert c.get_server_pid() > (1 << 22)  # a pooled client's key names no backend
        await c.close()
        with pytest.raises(asyncpg.PostgresError, match="pool=never is not a pooling mode"):
            await apg(harness, "pool=never")
    finally:
        for conn in (a, b, s1, s2):
            await conn.close()


async def test_pool_size_follows_the_compute(harness: Harness, pool_config) -> None:
    pool_config.size = 0  # from the compute: half of max_connections after the reserved slots
    c = await apg(harness)
    try:
        max_connections = int(await c.fetchval("SHOW max_connections"))
        assert harness.proxy.pooler.size_for("main") == (max_connections - 10) // 2
        assert f'lakelet_proxy_pool_size{{branch="main",mode="transaction"}} {(max_connections - 10) // 2}.0' in \
            harness.metric("lakelet_proxy_pool_size")
    finally:
        await c.close()


async def test_pooler_suffix_on_the_server_name_over_tls(harness: Harness) -> None:
    ca = harness.proxy.ca_file
    dsn = (f"host=main-pooler.lakelet.test hostaddr=127.0.0.1 port={harness.proxy.port} dbname=postgres "
           f"user=app password={PASSWORD} sslmode=verify-ca sslrootcert={ca}")
    async with await psycopg.AsyncConnection.connect(dsn) as c1, await psycopg.AsyncConnection.connect(dsn) as c2:
        assert c1.info.backend_pid > (1 << 22)
        one = await (await c1.execute("SELECT pg_backend_pid()")).fetchone()
        await c1.commit()
        assert one == await (await c2.execute("SELECT pg_backend_pid()")).fetchone()


# -- lending, the queue, timeouts ------------------------------------------------------------------------


async def test_a_transaction_holds_its_backend_and_others_wait(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    a, b = await apg(harness), await apg(harness)
    try:
        await a.fetchval("SELECT 1")
        tr = a.transaction()
        await tr.start()
        mine = await _pid(a)
        waiting = asyncio.create_task(b.fetchval("SELECT pg_backend_pid()"))
        await poll_until(lambda: _pool(harness).waiting == 1, "b waiting for the pool", timeout=10, every=0.02)
        assert not waiting.done()
        # The compute sees the holder and the waiter as load (scale to zero waits, the autoscaler reads
        # it): at once that there is some, the exact count within the janitor's period.
        assert harness.proxy.pooler.signals("main").sessions >= 1
        await poll_until(lambda: harness.proxy.pooler.signals("main").sessions == 2, "both counted", timeout=10,
                         every=0.02)
        assert harness.proxy.pooler.signals("main").waiting == 1
        assert 'lakelet_proxy_pool_clients{branch="main",mode="transaction",state="waiting"} 1.0' in \
            harness.metric("lakelet_proxy_pool_clients")
        assert await _pid(a) == mine  # still the same backend inside the transaction
        await tr.commit()
        assert await asyncio.wait_for(waiting, 10) == mine  # returned at ReadyForQuery I, lent to b
        assert harness.proxy.pooler.signals("main").sessions == 0  # idle pooled clients are no load
    finally:
        await a.close()
        await b.close()


async def test_pool_timeout_is_a_clear_53300(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    pool_config.timeout = 0.5
    a, b = await apg(harness), await apg(harness)
    try:
        tr = a.transaction()
        await tr.start()
        await a.fetchval("SELECT 1")
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncio.wait_for(b.fetchval("SELECT 1"), 10)
        assert err.value.sqlstate == "53300", repr(err.value)
        assert "pool_timeout" in str(err.value)
        # Not fatal: b stays connected, and is served once a backend is free.
        await tr.rollback()
        assert await a.fetchval("SELECT 2") == 2
        assert await b.fetchval("SELECT $1::int", 3) == 3
        with pytest.raises(asyncpg.PostgresError):
            async with a.transaction():
                await a.fetchval("SELECT 1")
                await b.execute("SELECT 1")  # simple query protocol this time
    finally:
        await a.close()
        await b.close()


async def test_the_branch_cap_holds_across_its_pools(harness: Harness, pool_config) -> None:
    """Two databases' pools on one branch share its cap: a pool at room of its own but not of the
    branch waits, an idle backend of another pool is closed to make room, and past pool_timeout
    the waiter gets 53300 — the compute never sees more pooled backends than the cap."""
    pooler = harness.proxy.pooler
    pool_config.size, pool_config.branch_size = 2, 2
    admin = await (await harness.endpoints.node("main")).connect()
    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
        await admin.execute("CREATE DATABASE pool_other OWNER app")

    query = ("SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'")
    for p in pooler.by_branch.get("main", []):  # idle backends of earlier tests' pools
        p.close_idle(time.monotonic() + 1)
    await poll_until(lambda: pooler.branch_opened.get("main", 0) == 0, "no pooled backends", timeout=10, every=0.02)
    await asyncio.sleep(0.5)
    others = {r["pid"] for r in await admin.fetch(query)}  # the session-mode warm backends of the proxy

    async def pooled_backends() -> int:
        """The pooled backends on the compute, once closed ones have exited (on their own time)."""
        for _ in range(100):
            n = len({r["pid"] for r in await admin.fetch(query)} - others)
            if n <= 2:
                return n
            await asyncio.sleep(0.1)
        return n

    a, b, d = await apg(harness), await apg(harness), await apg(harness)
    c, e = await apg(harness, database="pool_other"), await apg(harness, database="pool_other")
    other = _pool(harness, database="pool_other")
    try:
        ta, tb = a.transaction(), b.transaction()
        for conn, tr in ((a, ta), (b, tb)):
            await tr.start()
            await conn.fetchval("SELECT 1")
        waiting = asyncio.create_task(c.fetchval("SELECT current_database()"))
        await poll_until(lambda: other.waiting == 1, "c waiting for room in the branch", timeout=10, every=0.02)
        assert pooler.branch_opened["main"] == 2 and other.opened == 0
        assert await pooled_backends() == 2
        # a's backend comes back idle while another pool of the branch waits: closed, its room c's.
        await ta.commit()
        assert await asyncio.wait_for(waiting, 10) == "pool_other"
        assert (_pool(harness).opened, other.opened, pooler.branch_opened["main"]) == (1, 1, 2)
        # d (postgres) needs a backend: the branch is full, c's idle one in pool_other is closed for it.
        td = d.transaction()
        await td.start()
        assert await d.fetchval("SELECT current_database()") == "postgres"
        assert (_pool(harness).opened, other.opened) == (2, 0)
        assert await pooled_backends() == 2
        # Both room holders in transactions: e's query waits out pool_timeout, a clear 53300.
        pool_config.timeout = 0.5
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncio.wait_for(e.fetchval("SELECT 1"), 10)
        assert err.value.sqlstate == "53300"
        assert pooler.branch_opened["main"] == 2
        await tb.commit()
        assert await asyncio.wait_for(e.fetchval("SELECT current_database()"), 10) == "pool_other"
        await td.rollback()
    finally:
        for conn in (a, b, c, d, e):
            await conn.close()
        await admin.close()


async def test_a_client_dying_mid_transaction_never_lends_its_backend(harness: Harness, pool_config) -> None:
    pool_config.size = 1
    admin = await apg(harness)
    await admin.execute("CREATE TABLE IF NOT EXISTS pool_dying (v text)")
    a = await apg(harness)
    tr = a.transaction()
    await tr.start()
    await a.execute("INSERT INTO pool_dying VALUES ('uncommitted')")
    dead_pid = await _pid(a)
    a.terminate()  # the socket closes, no Terminate, no COMMIT
    # The next client gets a backend quickly, it is not the one left in a transaction, and the
    # insert never happened.
    assert await asyncio.wait_for(admin.fetchval("SELECT count(*) FROM pool_dying"), 10) == 0
    assert await _pid(admin) != dead_pid
    # Killed mid-query: the query is cancelled, the backend closed, the pool serves others.
    b = await apg(harness)
    running = asyncio.create_task(b.fetchval("SELECT pg_sleep(60)"))
    await poll_until(lambda: _pool(harness).in_use == 1 and _pool(harness).active == 1, "b's query running",
                     timeout=10, every=0.02)
    await asyncio.sleep(0.2)
    b_pid = next(iter(_pool(harness).servers)).key.pid
    b.terminate()
    running.cancel()
    for _ in range(300):
        if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", b_pid):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the dead client's query is still running")
    await admin.execute("DROP TABLE pool_dying")
    await admin.close()


async def test_a_transaction_left_idle_is_ended_by_postgres(harness: Harness, pool_config) -> None:
    cfg = harness.proxy.pooler.config
    cfg.idle_transaction_timeout = 0.5
    try:  # a new pool (template1) so its backends start with the timeout
        a = await apg(harness, database="template1")
        other = await apg(harness, database="template1")
    finally:
        cfg.idle_transaction_timeout = 0.0
    try:
        tr = a.transaction()
        await tr.start()
        await a.fetchval("SELECT 1")
        await asyncio.sleep(1.5)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await a.fetchval("SELECT 1")
        assert await other.fetchval("SELECT 3") == 3  # the pool goes on
        await poll_until(lambda: _pool(harness, database="template1").in_use == 0, "the backend gone", timeout=10,
                         every=0.05)
    finally:
        a.terminate()
        await other.close()


# -- SET, cancel ------------------------------------------------------------------------------------------


async def test_set_is_replayed_and_never_leaks(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    a = await apg(harness, server_settings={"application_name": "app-a"})
    b = await apg(harness, options="pool=transaction -c search_path=nowhere,public",
                  server_settings={"application_name": "app-b"})
    try:
        assert a.get_settings().application_name == "app-a"
        assert b.get_settings().application_name == "app-b"
        await a.execute("SET work_mem = '1234kB'")
        for _ in range(3):
            assert await a.fetchval("SHOW work_mem") == "1234kB"
            assert await b.fetchval("SHOW work_mem") != "1234kB"
            assert await a.fetchval("SHOW application_name") == "app-a"
            assert await b.fetchval("SHOW application_name") == "app-b"
            assert await b.fetchval("SHOW search_path") == "nowhere,public"  # as Postgres shows a -c value
            assert await a.fetchval("SHOW search_path") == '"$user", public'
        # While b holds one backend, a lands on the other: still its settings.
        async with b.transaction():
            await b.fetchval("SELECT 1")
            assert await a.fetchval("SHOW work_mem") == "1234kB"
        await a.execute("RESET work_mem")
        assert await a.fetchval("SHOW work_mem") != "1234kB"
        # SET inside a transaction block lasts until its end (as SET LOCAL), and never reaches b.
        async with a.transaction():
            await a.execute("SET work_mem = '2345kB'")
            assert await a.fetchval("SHOW work_mem") == "2345kB"
        assert await b.fetchval("SHOW work_mem") != "2345kB"
        assert await a.fetchval("SHOW work_mem") != "2345kB"
        # A bad SET fails as on Postgres and changes nothing.
        with pytest.raises(asyncpg.PostgresError):
            await a.execute("SET work_mem = 'lots'")
        assert await a.fetchval("SELECT 1") == 1
    finally:
        await a.close()
        await b.close()


async def test_psycopg_set_through_the_extended_protocol_is_tracked(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    dsn = (f"host=127.0.0.1 port={harness.proxy.port} dbname=postgres user=app password={PASSWORD} "
           "sslmode=disable options=pool=transaction")
    p = await psycopg.AsyncConnection.connect(dsn, autocommit=True)  # every statement: Parse, Bind, Execute, Sync
    other = await apg(harness)
    try:
        await p.execute("SET work_mem = '3MB'")
        for _ in range(3):
            assert await (await p.execute("SHOW work_mem")).fetchone() == ("3MB",)
            assert await other.fetchval("SHOW work_mem") != "3MB"
        async with other.transaction():  # other holds one backend: p's next statement lands on the other
            await other.fetchval("SELECT 1")
            assert await (await p.execute("SHOW work_mem")).fetchone() == ("3MB",)
        # A SET in a pipeline whose batch fails did not happen, on Postgres as here.
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with p.pipeline():
                await p.execute("SET work_mem = '5MB'")
                await p.execute("SELECT 1 / %s::int", (0,))
        assert await (await p.execute("SHOW work_mem")).fetchone() == ("3MB",)
        await p.execute("RESET work_mem")
        assert await (await p.execute("SHOW work_mem")).fetchone() != ("3MB",)
    finally:
        await p.close()
        await other.close()


async def test_a_bad_startup_setting_is_refused_at_connect(harness: Harness) -> None:
    with pytest.raises(asyncpg.PostgresError, match="work_mem"):
        await apg(harness, options="pool=transaction -c work_mem=lots")


async def test_cancel_lands_on_the_running_query_only(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    a, b = await apg(harness), await apg(harness)
    try:
        slow_a = asyncio.create_task(a.fetchval("SELECT pg_sleep(30)"))
        slow_b = asyncio.create_task(b.fetchval("SELECT pg_sleep(2)::text || 'done'"))
        await poll_until(lambda: _pool(harness).in_use == 2, "both queries running", timeout=10, every=0.02)
        await asyncio.sleep(0.3)
        slow_a.cancel()  # asyncpg sends a CancelRequest with a's key
        with pytest.raises(asyncio.CancelledError):
            await slow_a
        assert await asyncio.wait_for(slow_b, 20) == "done"  # b's query was not cancelled
        # a's sleep is gone (a is answered long before it would have ended), b's ran to its end.
        assert await asyncio.wait_for(a.fetchval("SELECT 'alive'"), 10) == "alive"
        assert await b.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                                "AND state = 'active'") == 0
        # A client still waiting in line: its query fails as cancelled and never runs.
        pool_config.size = 1
        _pool(harness).close_idle(time.monotonic() + 1)
        await poll_until(lambda: _pool(harness).opened == 0, "idle backends closed", timeout=10, every=0.02)
        holder = await apg(harness)
        tr = holder.transaction()
        await tr.start()
        await holder.fetchval("SELECT 1")
        queued = asyncio.create_task(a.fetchval("SELECT 'ran'"))
        await poll_until(lambda: _pool(harness).waiting == 1, "a in line", timeout=10, every=0.02)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await poll_until(lambda: _pool(harness).waiting == 0, "a out of line", timeout=10, every=0.02)
        await tr.rollback()
        await holder.close()
        assert await asyncio.wait_for(a.fetchval("SELECT 'next'"), 10) == "next"
        pool_config.size = 2
        # psycopg: cancel from another task; the query errors with 57014, the session goes on.
        conn = await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port={harness.proxy.port} dbname=postgres user=app password={PASSWORD} "
            "sslmode=disable options=pool=transaction", autocommit=True)
        try:
            q = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
            await poll_until(lambda: _pool(harness).in_use >= 1, "psycopg's query running", timeout=10, every=0.02)
            await asyncio.sleep(0.3)
            await conn.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(q, 20)
            assert (await (await conn.execute("SELECT 5")).fetchone()) == (5,)
        finally:
            await conn.close()
    finally:
        await a.close()
        await b.close()


# -- scale to zero ------------------------------------------------------------------------------------------


async def test_idle_pooled_clients_let_the_compute_suspend(harness: Harness) -> None:
    endpoints = harness.endpoints
    endpoints.configure("feature", EndpointConfig(suspend_timeout=2))
    try:
        conns = [await apg(harness, "endpoint=feature pool=transaction") for _ in range(3)]
        for c in conns:
            assert await c.fetchval("SELECT count(*) FROM big WHERE id < 10") == 9
        await poll_until(lambda: endpoints.endpoint("feature").state.value == "suspended", "feature suspended",
                         timeout=60, every=0.2)
        assert all(not c.is_closed() for c in conns)
        pool = _pool(harness, "feature")
        await poll_until(lambda: pool.opened == 0, "feature's backends closed", timeout=10, every=0.1)
        # The next transaction wakes it; every client is served.
        results = await asyncio.gather(*(c.fetchval("SELECT $1::int * 2", i) for i, c in enumerate(conns)))
        assert results == [0, 2, 4]
        for c in conns:
            await c.close()
    finally:
        endpoints.configure("feature", EndpointConfig(suspend_timeout=600))


def test_config_keys() -> None:
    from lakelet.config import ConfigError, load

    c = load(env={"LAKELET_POOL_MODE": "transaction", "LAKELET_POOL_SIZE": "20", "LAKELET_POOL_TIMEOUT": "5",
                  "LAKELET_POOL_IDLE_TRANSACTION_TIMEOUT": "60", "LAKELET_POOL_BRANCH_SIZE": "30"})
    assert (c.pool_mode, c.pool_size, c.pool_timeout, c.pool_idle_transaction_timeout) == ("transaction", 20, 5.0, 60.0)
    assert c.pool_branch_size == 30
    assert load(env={}).pool_mode == "session"
    with pytest.raises(ConfigError, match="pool_mode = 'statement'"):
        load(env={"LAKELET_POOL_MODE": "statement"})
