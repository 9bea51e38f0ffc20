"""The autoscaler on a real compute under pgbench: the size rises with load, the reloadable
settings follow at once, and the size falls back after the cooldown."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from compute import EndpointConfig, Endpoints, sizes
from storage.postgres import PgBinaries, ServiceUser, run_async
from tests.conftest import poll_until
from tests.storage.conftest import close_lake, open_lake

DEADLINE = 90.0  # generous: only a policy that never reacts should reach it


@pytest.fixture(scope="module")
async def endpoints(root: Path, service_user: ServiceUser, pg: PgBinaries,
                    registry: CollectorRegistry) -> AsyncIterator[Endpoints]:
    lake = await open_lake(root, service_user, pg, registry=registry, cgroups=True,
                           config=EndpointConfig(suspend_timeout=300, min_cu=0.25, max_cu=2, up_after=3, down_after=3))
    yield lake.endpoints
    await close_lake(lake)


def current_cu(eps: Endpoints) -> float:
    return next(s for s in eps.status() if s.branch == "main").cu


async def show(eps: Endpoints, name: str) -> str:
    node = eps.active_node("main")
    assert node is not None
    conn = await node.connect()  # a fresh session: it reads the reloaded configuration
    try:
        return str(await conn.fetchval(f"SHOW {name}"))
    finally:
        await conn.close()


async def wait_until(predicate: Callable[[], object], what: str) -> None:
    await poll_until(predicate, what, timeout=DEADLINE, every=0.25)


async def test_size_follows_pgbench_load(endpoints: Endpoints, pg: PgBinaries, service_user: ServiceUser,
                                         registry: CollectorRegistry) -> None:
    addr = await endpoints.ensure_ready("main")
    env = {"PGHOST": addr.socket_dir, "PGPORT": str(addr.port), "PGUSER": "lakelet_admin", "PGDATABASE": "postgres"}
    await run_async([pg["pgbench"], "-i", "-s", "1", "-q"], service_user, env=env)
    assert current_cu(endpoints) == 0.25
    assert await show(endpoints, "work_mem") == sizes.settings_for(0.25)["work_mem"]

    bench = await asyncio.create_subprocess_exec(
        pg["pgbench"], "-n", "-c", "4", "-j", "2", "-T", "600", "-S",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=service_user.preexec, env=service_user.child_env(env), cwd="/")
    try:
        await wait_until(lambda: current_cu(endpoints) > 0.25, "a scale-up under load")
        high = current_cu(endpoints)
        assert await show(endpoints, "work_mem") == sizes.settings_for(high)["work_mem"]
        assert await show(endpoints, "max_parallel_workers") == sizes.settings_for(high)["max_parallel_workers"]
        # Restart-only settings wait for the next start: recorded, not applied live.
        node = endpoints.active_node("main")
        assert node is not None
        assert node.settings["shared_buffers"] == sizes.settings_for(high)["shared_buffers"]
        assert await show(endpoints, "shared_buffers") == sizes.settings_for(0.25)["shared_buffers"]
        assert (registry.get_sample_value("lakelet_autoscaler_decisions_total",
                                          {"branch": "main", "direction": "up"}) or 0) >= 1
        assert registry.get_sample_value("lakelet_compute_cu", {"branch": "main"}) == high
    finally:
        bench.terminate()
        await bench.wait()

    # A compute lost while large comes back at that size, restart-only settings included.
    node = endpoints.active_node("main")
    assert node is not None and node.pid is not None
    os.kill(node.pid, signal.SIGKILL)
    await wait_until(lambda: endpoints.active_node("main") is None, "crash detection")
    await endpoints.ensure_ready("main")
    restarted = current_cu(endpoints)
    assert restarted > 0.25
    assert await show(endpoints, "shared_buffers") == sizes.settings_for(restarted)["shared_buffers"]

    await wait_until(lambda: current_cu(endpoints) == 0.25, "the fall back to min_cu after the cooldown")
    assert await show(endpoints, "work_mem") == sizes.settings_for(0.25)["work_mem"]
    assert (registry.get_sample_value("lakelet_autoscaler_decisions_total",
                                      {"branch": "main", "direction": "down"}) or 0) >= 1
    assert (registry.get_sample_value("lakelet_compute_cpu_seconds_total", {"branch": "main"}) or 0) > 0
    assert (registry.get_sample_value("lakelet_compute_memory_bytes", {"branch": "main"}) or 0) > 0


async def test_size_range_is_per_endpoint(endpoints: Endpoints) -> None:
    # Raising min_cu on a running endpoint moves it there on the next tick, without any load.
    endpoints.configure("main", EndpointConfig(suspend_timeout=300, min_cu=1, max_cu=2, up_after=3, down_after=3))
    try:
        await wait_until(lambda: current_cu(endpoints) == 1.0, "the move to the new min_cu")
        assert await show(endpoints, "work_mem") == sizes.settings_for(1)["work_mem"]
    finally:
        endpoints.configure("main", EndpointConfig(suspend_timeout=300, up_after=3, down_after=3))
