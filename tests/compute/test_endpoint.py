"""Endpoint lifecycle against real computes: wake, suspend, crash, idle scale-to-zero, failure."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from compute import ComputeAddress, EndpointConfig, Endpoints, UnknownBranch, WakeError
from compute.signals import CLOCK_TICKS, compute_cpu_ticks
from storage.postgres import PgBinaries, ServiceUser
from tests.storage.conftest import open_lake

DEADLINE = 30.0  # generous: only a hang should ever reach it


@pytest.fixture(scope="module")
async def endpoints(root: Path, service_user: ServiceUser, pg: PgBinaries,
                    registry: CollectorRegistry) -> AsyncIterator[Endpoints]:
    lake = await open_lake(root, service_user, pg, registry=registry, cgroups=True,
                           config=EndpointConfig(suspend_timeout=300))
    eps = lake.endpoints
    yield eps
    await eps.close()
    assert all(s.state in ("suspended", "failed") for s in eps.status())
    lake.store.close()


def starts(registry: CollectorRegistry, branch: str) -> float:
    return registry.get_sample_value("lakelet_compute_starts_total", {"branch": branch}) or 0.0


async def query(addr: ComputeAddress, sql: str) -> object:
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def make_branch(eps: Endpoints, name: str) -> None:
    """A child of main at main's durable head (main running: the way the control plane does it)."""
    node = await eps.node("main")
    point = await node.branch_point()
    await asyncio.to_thread(eps.store.create_branch, name, "main", head_lsn=point)


async def wait_for_state(eps: Endpoints, branch: str, state: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if next(s for s in eps.status() if s.branch == branch).state == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{branch} never reached {state}: {eps.status()}")


async def test_unknown_branch_is_refused_without_side_effects(endpoints: Endpoints, root: Path) -> None:
    with pytest.raises(UnknownBranch, match="'nope' does not exist"):
        await endpoints.ensure_ready("nope")
    with pytest.raises(UnknownBranch):
        await endpoints.suspend("nope")
    assert not (root / "computes" / "nope").exists()
    assert "nope" not in {s.branch for s in endpoints.status()}
    assert endpoints.role_verifier("nope", "anyone") is None
    assert not endpoints.has_branch("nope")


async def test_suspend_resume_cycles_keep_data(endpoints: Endpoints, registry: CollectorRegistry) -> None:
    addr = await endpoints.ensure_ready("main")
    await query(addr, "CREATE TABLE cycles (n int)")
    before = starts(registry, "main")
    for n in range(3):
        addr = await endpoints.ensure_ready("main")
        st = next(s for s in endpoints.status() if s.branch == "main")
        assert (st.state, st.pid, st.host, st.cu) == ("active", addr.pid, addr.socket_dir, 0.25)
        assert registry.get_sample_value("lakelet_compute_state", {"branch": "main", "state": "active"}) == 1
        await query(addr, f"INSERT INTO cycles VALUES ({n})")
        await endpoints.suspend("main")
        st = next(s for s in endpoints.status() if s.branch == "main")
        assert (st.state, st.pid, st.host) == ("suspended", None, None)
        assert endpoints.active_node("main") is None
        assert registry.get_sample_value("lakelet_compute_state", {"branch": "main", "state": "suspended"}) == 1
    addr = await endpoints.ensure_ready("main")
    assert await query(addr, "SELECT array_agg(n ORDER BY n)::text FROM cycles") == "{0,1,2}"
    assert starts(registry, "main") == before + 3


async def test_thousand_callers_one_start(endpoints: Endpoints, registry: CollectorRegistry) -> None:
    await endpoints.suspend("main")
    before = starts(registry, "main")
    addrs = await asyncio.gather(*(endpoints.ensure_ready("main") for _ in range(1000)))
    assert len(set(addrs)) == 1
    assert starts(registry, "main") == before + 1
    assert await query(addrs[0], "SELECT count(*) FROM cycles") == 3


async def test_session_during_suspend_waits_and_wakes_again(endpoints: Endpoints) -> None:
    addr = await endpoints.ensure_ready("main")
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
    busy = asyncio.create_task(conn.fetchval("SELECT pg_sleep(60)"))
    while await query(addr, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'") == 0:
        await asyncio.sleep(0.05)
    suspend = asyncio.create_task(endpoints.suspend("main"))
    await asyncio.sleep(0)  # the suspend has begun
    assert next(s for s in endpoints.status() if s.branch == "main").state == "suspending"
    woken = await endpoints.ensure_ready("main")
    await suspend
    assert woken.pid != addr.pid
    assert next(s for s in endpoints.status() if s.branch == "main").state == "active"
    # The old session was told the server is going away (FATAL 57P01), not left hanging.
    with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError),
                       match="terminating connection due to administrator command"):
        await busy
    conn.terminate()
    assert await query(woken, "SELECT count(*) FROM cycles") == 3


async def test_killed_compute_returns_to_suspended_and_rewakes_with_data(
        endpoints: Endpoints, registry: CollectorRegistry) -> None:
    addr = await endpoints.ensure_ready("main")
    await query(addr, "CREATE TABLE survivors AS SELECT generate_series(1, 500) AS n")
    before = starts(registry, "main")
    os.kill(addr.pid, signal.SIGKILL)
    await wait_for_state(endpoints, "main", "suspended")
    st = next(s for s in endpoints.status() if s.branch == "main")
    assert "exited unexpectedly" in (st.reason or "")
    addr2 = await endpoints.ensure_ready("main")
    assert addr2.pid != addr.pid
    assert await query(addr2, "SELECT count(*) FROM survivors") == 500
    assert starts(registry, "main") == before + 1


async def test_roles_reach_the_store_without_waking(endpoints: Endpoints) -> None:
    node = await endpoints.node("main")
    conn = await node.connect()
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute("CREATE ROLE alice LOGIN PASSWORD 'secret-one'")
    finally:
        await conn.close()
    await endpoints.suspend("main")  # roles are synced on the way down
    verifier = endpoints.role_verifier("main", "alice")
    assert verifier is not None and verifier.startswith("SCRAM-SHA-256$")
    assert next(s for s in endpoints.status() if s.branch == "main").state == "suspended"
    assert endpoints.role_verifier("main", "nobody") is None


async def admin_backends(addr: ComputeAddress) -> set[int]:
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE usename = 'lakelet_admin' "
                                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        return {r[0] for r in rows}
    finally:
        await conn.close()


async def test_role_sync_keeps_one_session_and_writes_only_changes(endpoints: Endpoints) -> None:
    addr = await endpoints.ensure_ready("main")
    node = await endpoints.node("main")
    changes: list[str | None] = []
    endpoints.store.subscribe(changes.append)
    await node.sync_roles()
    kept = await admin_backends(addr)
    for _ in range(3):
        await node.sync_roles()
        await node.counts()
    # The same admin backend served every read (no backend forked per sync), and roles that did
    # not change were not written again (no store write, no reload of the proxy's snapshot).
    assert await admin_backends(addr) == kept and len(kept) == 1
    assert "main" not in changes
    conn = await node.connect()
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute("CREATE ROLE carol LOGIN PASSWORD 'secret-three'")
    finally:
        await conn.close()
    await node.sync_roles()
    assert changes.count("main") == 1
    verifier = endpoints.role_verifier("main", "carol")
    assert verifier is not None and verifier.startswith("SCRAM-SHA-256$")


async def test_cpu_of_backends_gone_between_readings_is_counted(endpoints: Endpoints) -> None:
    node = await endpoints.node("main")
    assert node.pid is not None
    before, _ = await asyncio.to_thread(compute_cpu_ticks, node.pid)
    conn = await node.connect()
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    await conn.fetchval("SELECT count(*) FROM generate_series(1, 5000000)")  # about half a CPU second
    await conn.close()
    deadline = time.monotonic() + DEADLINE
    while backend in node.process_ids():  # exited and reaped: its time is the postmaster's cutime now
        assert time.monotonic() < deadline, "the backend never exited"
        await asyncio.sleep(0.05)
    after, _ = await asyncio.to_thread(compute_cpu_ticks, node.pid)
    assert before is not None and after is not None
    assert (after - before) / CLOCK_TICKS >= 0.05


async def test_a_tick_reads_only_what_a_decision_needs(endpoints: Endpoints,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = endpoints.endpoint("main")
    node = await endpoints.node("main")
    calls = 0
    real_counts = node.counts

    async def counting() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return await real_counts()

    monkeypatch.setattr(node, "counts", counting)
    monkeypatch.setattr("compute.endpoint.METRICS_EVERY", 1e9)  # no metrics reading due in this test
    signals = endpoints.signals("main")
    cu = endpoint.cu
    try:
        # Pinned size, a proxied session open: nothing to decide and nothing could be idle.
        endpoints.configure("main", EndpointConfig(suspend_timeout=300, min_cu=cu, max_cu=cu))
        signals.sessions += 1
        await endpoint.tick()  # the first tick takes the metrics' first reading
        calls = 0
        for _ in range(3):
            await endpoint.tick()
        assert calls == 0
        # No session: direct clients decide whether it is idle, so Postgres is asked.
        signals.sessions -= 1
        await endpoint.tick()
        assert calls >= 1
        # A size that can change: every tick samples, sessions or not.
        signals.sessions += 1
        endpoints.configure("main", EndpointConfig(suspend_timeout=300))
        calls = 0
        await endpoint.tick()
        assert calls >= 1
    finally:
        signals.sessions -= 1
        endpoints.configure("main", EndpointConfig(suspend_timeout=300))


async def test_ready_answers_without_waiting(endpoints: Endpoints) -> None:
    await make_branch(endpoints, "quick")
    assert endpoints.ready("quick") is None  # suspended: the caller must wake it (ensure_ready)
    addr = await endpoints.ensure_ready("quick")
    assert endpoints.ready("quick") == addr
    await endpoints.suspend("quick")
    assert endpoints.ready("quick") is None
    addr2 = await endpoints.ensure_ready("quick")
    assert endpoints.ready("quick") == addr2 and addr2.pid != addr.pid
    await endpoints.suspend("quick")


async def test_idle_endpoint_scales_to_zero(endpoints: Endpoints) -> None:
    await make_branch(endpoints, "idle")
    endpoints.configure("idle", EndpointConfig(suspend_timeout=1))
    signals = endpoints.signals("idle")
    addr = await endpoints.ensure_ready("idle")
    # While a proxy session is open the compute stays up, however long it is quiet.
    signals.sessions = 1
    await asyncio.sleep(2.5)
    assert next(s for s in endpoints.status() if s.branch == "idle").state == "active"
    signals.sessions = 0
    signals.last_activity = time.monotonic()
    await wait_for_state(endpoints, "idle", "suspended")
    assert (await endpoints.ensure_ready("idle")).pid != addr.pid
    await endpoints.suspend("idle")


async def test_wake_when_a_finished_suspend_has_not_been_cleared_yet(endpoints: Endpoints) -> None:
    """A suspend task that has finished but whose done callback has not run yet (the same loop
    turn) must not make a waking session spin: awaiting a finished task does not yield."""
    await make_branch(endpoints, "turn")
    await endpoints.ensure_ready("turn")
    await endpoints.suspend("turn")
    endpoint = endpoints.endpoint("turn")
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    endpoint._suspending = finished  # type: ignore[assignment]  # as between its end and its callback
    node = await endpoints.node("turn")
    assert node.alive() and endpoint._suspending is None
    await endpoints.suspend("turn")


async def test_failed_start_gives_every_caller_the_same_clear_error(endpoints: Endpoints, root: Path) -> None:
    await make_branch(endpoints, "broken")
    await endpoints.ensure_ready("broken")
    await endpoints.suspend("broken")
    # The suspended compute's data dir is a current cache, so the next start reuses it: spoil it.
    conf = root / "computes" / "broken" / "pgdata" / "postgresql.conf"
    original = conf.read_text()
    conf.write_text(original + "\nthis line is not a setting\n")
    results = await asyncio.gather(*(endpoints.ensure_ready("broken") for _ in range(50)), return_exceptions=True)
    assert all(isinstance(r, WakeError) for r in results)
    assert len({str(r) for r in results}) == 1
    message = str(results[0])
    assert "'broken'" in message and "postgresql.conf" in message and "\n" not in message
    st = next(s for s in endpoints.status() if s.branch == "broken")
    assert st.state == "failed" and st.reason == message
    # Mend it: the next session tries again and succeeds.
    conf.write_text(original)
    addr = await endpoints.ensure_ready("broken")
    assert await query(addr, "SELECT 1") == 1
    await endpoints.suspend("broken")
