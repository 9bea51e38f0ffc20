"""Transaction pooling at scale (issue #16): 500 concurrent asyncpg and psycopg clients over a pool
of 20, and 1,000 clients arriving at once at a suspended branch — one compute start, all served,
every commit counted. All clients are asyncio clients in this one process."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import psycopg
import pytest
from prometheus_client import generate_latest

from tests.proxy.harness import PASSWORD, Harness


def _starts(harness: Harness, branch: str) -> float:
    text = generate_latest(harness.registry).decode()
    m = re.search(rf'^lakelet_compute_starts_total{{branch="{branch}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _apg(harness: Harness, options: str) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                 database="postgres", ssl=False, server_settings={"options": options}, timeout=120)


@pytest.fixture
def pool_config(harness: Harness):
    cfg = harness.proxy.pooler.config
    saved = (cfg.size, cfg.timeout, harness.proxy.config.auth_timeout)
    harness.proxy.config.auth_timeout = 120  # a thousand handshakes at once on a loaded machine
    yield cfg
    cfg.size, cfg.timeout, harness.proxy.config.auth_timeout = saved


async def test_500_clients_over_a_pool_of_20(harness: Harness, pool_config) -> None:
    pool_config.size = 20
    pool_config.timeout = 120
    admin = await _apg(harness, "pool=transaction")
    await admin.execute("CREATE TABLE commits500 (client int, n int, PRIMARY KEY (client, n))")
    dsn = (f"host=127.0.0.1 port={harness.proxy.port} dbname=postgres user=app password={PASSWORD} "
           "sslmode=disable options=pool=transaction")
    rounds = 4

    async def asyncpg_client(k: int) -> None:
        conn = await _apg(harness, "pool=transaction")
        try:
            for n in range(rounds):
                async with conn.transaction():
                    await conn.execute("INSERT INTO commits500 VALUES ($1, $2)", k, n)
                    assert await conn.fetchval("SELECT count(*) FROM commits500 WHERE client = $1", k) == n + 1
        finally:
            await conn.close()

    async def psycopg_client(k: int) -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
        try:
            for n in range(rounds):
                if n % 2:
                    async with conn.pipeline(), conn.transaction():
                        await conn.execute("INSERT INTO commits500 VALUES (%s, %s)", (k, n))
                        cur = await conn.execute("SELECT count(*) FROM commits500 WHERE client = %s", (k,))
                    assert await cur.fetchone() == (n + 1,)
                else:
                    async with conn.transaction():
                        await conn.execute("INSERT INTO commits500 VALUES (%s, %s)", (k, n))
                        cur = await conn.execute("SELECT count(*) FROM commits500 WHERE client = %s", (k,))
                        assert await cur.fetchone() == (n + 1,)
        finally:
            await conn.close()

    try:
        await asyncio.gather(*(asyncpg_client(k) if k % 5 else psycopg_client(k) for k in range(500)))
        assert await admin.fetchval("SELECT count(*) FROM commits500") == 500 * rounds
        pool = harness.proxy.pooler.pools[("main", "app", "postgres")]
        assert pool.opened <= 20
        assert pool.clients == 1 and pool.active == 0 and pool.waiting == 0
        metrics = harness.metric("lakelet_proxy_pool")
        assert 'lakelet_proxy_pool_wait_seconds_count{branch="main",mode="transaction"}' in metrics
        assert 'lakelet_proxy_pool_size{branch="main",mode="transaction"} 20.0' in metrics
    finally:
        await admin.execute("DROP TABLE IF EXISTS commits500")
        await admin.close()


async def test_1000_clients_at_a_suspended_branch(harness: Harness, pool_config) -> None:
    pool_config.size = 20
    pool_config.timeout = 120
    setup = await _apg(harness, "endpoint=feature")
    await setup.execute("CREATE TABLE commits1000 (client int, n int, PRIMARY KEY (client, n))")
    await setup.close()
    await harness.endpoints.suspend("feature")
    assert harness.endpoints.endpoint("feature").state.value == "suspended"
    starts = _starts(harness, "feature")
    rounds = 3

    async def client(k: int) -> None:
        conn = await _apg(harness, "endpoint=feature pool=transaction")
        try:
            for n in range(rounds):
                async with conn.transaction():
                    await conn.execute("INSERT INTO commits1000 VALUES ($1, $2)", k, n)
                assert await conn.fetchval("SELECT $1::int + $2::int", k, n) == k + n
        finally:
            await conn.close()

    await asyncio.gather(*(client(k) for k in range(1000)))
    assert _starts(harness, "feature") == starts + 1
    check = await _apg(harness, "endpoint=feature")
    try:
        assert await check.fetchval("SELECT count(*) FROM commits1000") == 1000 * rounds
        assert await check.fetchval("SELECT count(DISTINCT client) FROM commits1000") == 1000
    finally:
        await check.close()
