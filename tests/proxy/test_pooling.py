"""Transaction pooling (issue #16): mode selection, lending per transaction, the queue and its
timeout, a client dying mid-transaction, prepared statements, SET, cancel, scale to zero."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.conftest import poll_until
from tests.proxy.harness import PASSWORD, Harness


def pooled(harness: Harness, **kw: object) -> dict[str, object]:
    settings = {"options": "pool=transaction"}
    settings.update(kw.pop("server_settings", {}))  # type: ignore[arg-type]
    return dict(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD, database="postgres",
                ssl=False, server_settings=settings, **kw)


async def apg(harness: Harness, **kw: object) -> asyncpg.Connection:
    return await asyncpg.connect(**pooled(harness, **kw))


@pytest.fixture
def pool_config(harness: Harness):
    cfg = harness.proxy.pooler.config
    saved = (cfg.size, cfg.timeout)
    yield cfg
    cfg.size, cfg.timeout = saved


async def test_smoke(harness: Harness, pool_config) -> None:
    pool_config.size = 2
    a = await apg(harness)
    b = await apg(harness)
    assert await a.fetchval("SELECT 1") == 1
    pids = {await a.fetchval("SELECT pg_backend_pid()"), await b.fetchval("SELECT pg_backend_pid()")}
    assert len(pids) == 1, pids
    async with a.transaction():
        pa = await a.fetchval("SELECT pg_backend_pid()")
        pb = await b.fetchval("SELECT pg_backend_pid()")
        assert pa != pb
    assert await a.fetchval("SELECT $1::int + 1", 41) == 42
    stmt = await a.prepare("SELECT $1::text || 'x'")
    assert await stmt.fetchval("a") == "ax"
    assert await b.fetchval("SELECT $1::text || 'x'", "b") == "bx"
    await a.close()
    await b.close()
