"""The proxy test harness: a store, the computes, a proxy in front, one role and two branches;
one per test module (Postgres takes seconds to boot)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from compute import EndpointConfig, Endpoints
from lakelet.project import create_role
from proxy import Proxy, ProxyConfig
from storage import Store
from storage.postgres import PgBinaries, ServiceUser

PASSWORD = "proxy-test-pw"
PSQL = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"


class Harness:
    def __init__(self, proxy: Proxy, endpoints: Endpoints, registry: CollectorRegistry, store: Store) -> None:
        self.proxy = proxy
        self.endpoints = endpoints
        self.registry = registry
        self.store = store
        self.wakes = 0

    def dsn(self, user: str = "app", password: str = PASSWORD, **params: str) -> str:
        base = {"host": "localhost", "port": str(self.proxy.port), "dbname": "postgres", "user": user,
                "password": password, "sslmode": "disable"}
        base.update(params)
        return " ".join(f"{k}={v}" for k, v in base.items())

    async def apg(self) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.proxy.port, user="app", password=PASSWORD,
                                     database="postgres", ssl=False)

    def metric(self, name: str) -> str:
        return "\n".join(ln for ln in generate_latest(self.registry).decode().splitlines() if ln.startswith(name))


@contextlib.contextmanager
def relayed_by(harness: Harness, kind: str) -> Iterator[None]:
    """Sessions opened inside are relayed by the native relay ("native": skipped without a build)
    or by the Python one ("python", as for TLS sessions and where no build exists)."""
    native = harness.proxy.relay
    if kind == "native" and native is None:
        pytest.skip("no native relay build (scripts/setup.sh builds it where cc exists)")
    if kind == "python":
        harness.proxy.relay = None
    try:
        yield
    finally:
        harness.proxy.relay = native


@pytest.fixture(scope="module")
async def harness(root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[Harness]:
    store = Store.open(root / "store", user=service_user, pg=pg)
    store.bootstrap()
    registry = CollectorRegistry()
    endpoints = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg, registry=registry,
                          config=EndpointConfig(suspend_timeout=600), cgroups=False)
    await endpoints.start()
    await create_role(endpoints, "main", "app", PASSWORD, owner=True)
    node = await endpoints.node("main")
    conn = await node.connect()
    await conn.execute("CREATE TABLE big AS SELECT g AS id, repeat('x', 100) AS pad FROM generate_series(1, 200000) g")
    await conn.execute("GRANT ALL ON big TO app")
    await conn.close()
    bp = await node.branch_point()
    store.create_branch("feature", "main", head_lsn=bp)
    proxy = Proxy(endpoints, ProxyConfig(listen_port=0, tls_dir=root / "tls", auth_timeout=2), registry=registry)
    await proxy.start()
    h = Harness(proxy, endpoints, registry, store)
    yield h
    await proxy.close()
    await endpoints.close()
    store.close()
