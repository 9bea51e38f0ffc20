"""Shared pieces of the storage suites: a store with real computes over it, and small helpers to
talk to a branch's Postgres through its private socket."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from compute import ComputeAddress, EndpointConfig, Endpoints
from storage import Store
from storage.bucket import open_store
from storage.postgres import PgBinaries, ServiceUser
from tests.conftest import environ, scratch_dir
from tests.s3server import S3Server, moto_server

ADMIN = "lakelet_admin"


@dataclass
class Lake:
    """A store and the endpoints that run computes over it, sharing one root directory."""

    root: Path
    store: Store
    endpoints: Endpoints

    @property
    def computes(self) -> Path:
        return self.root / "computes"


async def open_lake(root: Path, user: ServiceUser, pg: PgBinaries, store_uri: str | None = None, *,
                    config: EndpointConfig | None = None, registry: CollectorRegistry | None = None,
                    cgroups: bool = False, **store_args: object) -> Lake:
    """The one way the suites build "a store with a control plane over it" (bootstrapped, started)."""
    store = await asyncio.to_thread(open_store, store_uri, root / "store", user=user, pg=pg,
                                    **store_args)  # type: ignore[arg-type]
    await asyncio.to_thread(store.bootstrap)
    endpoints = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg,
                          config=config or EndpointConfig(suspend_timeout=3600), registry=registry, cgroups=cgroups)
    await endpoints.start()
    return Lake(root, store, endpoints)


async def close_lake(lake: Lake) -> None:
    await lake.endpoints.close()
    lake.store.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, found by the store's boto3 the standard way (environment)."""
    with moto_server() as server, environ(server.env()):
        yield server


# Modules whose tests also run on a store in a bucket (moto's S3 server on loopback): durability
# and GC cover what the bucket changes (packs through the cache, WAL uploads, deferred deletes);
# test_s3_store covers branches and point in time on it. LAKELET_TEST_S3=all runs every module
# that can on both backends (about 5 minutes more).
S3_MODULES = {"test_durability", "test_gc"}
# These open the store as a local directory themselves (their own fixture; child processes).
LOCAL_ONLY = {"test_background_image", "test_crash"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        every = os.environ.get("LAKELET_TEST_S3") == "all" and module not in LOCAL_ONLY
        metafunc.parametrize("store_backend", ["file", "s3"] if every or module in S3_MODULES else ["file"],
                             scope="module")


@pytest.fixture(scope="module")
def lake_root(service_user: ServiceUser, store_backend: str) -> Iterator[Path]:
    with scratch_dir(f"lakelet-storage-{store_backend}-") as path:
        yield path


@pytest.fixture(scope="module")
async def lake(lake_root: Path, service_user: ServiceUser, pg: PgBinaries, store_backend: str,
               request: pytest.FixtureRequest) -> AsyncIterator[Lake]:
    """One store per test module: bootstrapping and first starts are the slow part of every test."""
    store_args: dict[str, object] = {}
    if store_backend == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        store_args = {"store_uri": f"s3://{server.new_bucket()}/store", "upload_interval": 0.2}
    opened = await open_lake(lake_root, service_user, pg, **store_args)  # type: ignore[arg-type]
    yield opened
    await close_lake(opened)


async def connect(addr: ComputeAddress) -> asyncpg.Connection:
    return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN, database="postgres")


async def sql(lake: Lake, branch: str, statement: str, *args: object) -> object:
    """One statement on ``branch`` (waking its compute); returns the first column of the first row."""
    conn = await connect(await lake.endpoints.ensure_ready(branch))
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


async def rows(lake: Lake, branch: str, table: str) -> list[int]:
    """The ``n`` column of ``table`` on ``branch``, sorted; [] when the table does not exist there."""
    exists = await sql(lake, branch, "SELECT to_regclass($1) IS NOT NULL", table)
    if not exists:
        return []
    values = await sql(lake, branch, f"SELECT coalesce(array_agg(n ORDER BY n), '{{}}') FROM {table}")
    return list(values)  # type: ignore[call-overload]


async def branch_at_head(lake: Lake, name: str, parent: str) -> None:
    """A child at the parent's durable head, the way the control plane makes one: a restore point
    in the running parent when it runs, else the end of what the store holds."""
    node = lake.endpoints.active_node(parent)
    head = None
    if node is not None:
        head = await node.branch_point()
    await asyncio.to_thread(lake.store.create_branch, name, parent, head_lsn=head)


async def from_store_only(lake: Lake, *branches: str) -> None:
    """Suspend ``branches`` and drop their local data dirs: the next start builds everything from
    the store (image + archived WAL)."""
    for branch in branches:
        await lake.endpoints.suspend(branch)
        shutil.rmtree(lake.computes / branch, ignore_errors=True)


async def suspend_all(lake: Lake) -> None:
    for status in lake.endpoints.status():
        if status.state in ("active", "starting", "suspending"):
            await lake.endpoints.suspend(status.branch)
