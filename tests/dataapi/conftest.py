"""One store, one compute and one Data API per test module; many fast HTTP assertions against it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import jwt
import pytest
from prometheus_client import CollectorRegistry

from compute import EndpointConfig, Endpoints
from dataapi import DataAPI, DataAPIConfig
from dataapi.local import LocalComputes
from storage import Store
from storage.postgres import PgBinaries, ServiceUser

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
IDLE_TIMEOUT = 4.0
MAX_BODY = 256 * 1024
FIXTURE_SQL = (Path(__file__).parent / "fixture.sql").read_text()


def token(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def user_token(sub: str = "alice", role: str = "web_user", **extra: object) -> str:
    return token({"role": role, "sub": sub, "exp": int(time.time()) + 600, **extra})


@dataclass
class Api:
    endpoints: Endpoints
    api: DataAPI
    session: aiohttp.ClientSession
    base: str

    def url(self, path: str, branch: str = "main", database: str = "postgres") -> str:
        return f"http://127.0.0.1:{self.api.port}/{branch}/{database}/rest/v1/{path.lstrip('/')}"

    async def request(self, method: str, path: str, *, token: str | None = None, headers: dict | None = None,
                      branch: str = "main", **kw: object) -> tuple[int, dict, object]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.url(path, branch), headers=h, **kw) as r:
            text = await r.text()
            ctype = r.headers.get("Content-Type", "")
            body: object = text
            if text and "json" in ctype:
                import json
                body = json.loads(text)
            return r.status, dict(r.headers), body

    async def get(self, path: str, **kw: object) -> tuple[int, dict, object]:
        return await self.request("GET", path, **kw)

    async def admin(self, sql: str) -> object:
        addr = await self.endpoints.ensure_ready("main")
        conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin",
                                     database="postgres")
        try:
            if ";" in sql:
                await conn.execute(sql)
                return []
            return await conn.fetch(sql)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def api(root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[Api]:
    store = Store.open(root / "store", user=service_user, pg=pg)
    store.bootstrap()
    eps = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg,
                    config=EndpointConfig(suspend_timeout=300), registry=CollectorRegistry())
    await eps.start()
    data_api = DataAPI(LocalComputes(eps), DataAPIConfig(anon_role="web_anon", jwt_secret=SECRET, max_rows=1000,
                                          idle_timeout=IDLE_TIMEOUT, max_body_bytes=MAX_BODY,
                                          pre_request="public.pre_request", schemas=("public", "extra")))
    session = aiohttp.ClientSession()
    try:
        addr = await eps.ensure_ready("main")
        conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
        try:
            await conn.execute(FIXTURE_SQL)
        finally:
            await conn.close()
        await data_api.start("127.0.0.1", 0)
        yield Api(eps, data_api, session, f"http://127.0.0.1:{data_api.port}")
    finally:
        await session.close()
        await data_api.close()
        await eps.close()
        store.close()
