"""The control plane with a real proxy in front: per-branch state that outlives endpoints, a session
path that never waits on the catalog, and durability stalls that are reported, not silent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from compute import EndpointConfig, EndpointState, IllegalTransition
from compute.endpoint import TRANSITIONS
from lakelet import project
from proxy import Proxy, ProxyConfig
from storage import InvalidName, InvalidTarget
from tests.conftest import poll_until
from tests.storage.conftest import Lake, close_lake, connect, open_lake, sql

PASSWORD = "pw-for-alice"
DEADLINE = 60.0


@pytest.fixture(scope="module")
async def lake(root, service_user, pg) -> AsyncIterator[Lake]:  # noqa: ANN001 - fixtures
    opened = await open_lake(root, service_user, pg)
    await sql(opened, "main", "CREATE TABLE t AS SELECT 1 AS n")
    await project.create_role(opened.endpoints, "main", "alice", PASSWORD, owner=True)
    await sql(opened, "main", "GRANT ALL ON t TO alice")
    await opened.endpoints.create_branch("child", "main")
    yield opened
    await close_lake(opened)


@pytest.fixture(scope="module")
async def proxy(lake: Lake) -> AsyncIterator[Proxy]:
    p = Proxy(lake.endpoints, ProxyConfig(listen_host="127.0.0.1", listen_port=0, wake_timeout=DEADLINE))
    await p.start()
    yield p
    await p.close()


async def session(proxy: Proxy, branch: str) -> asyncpg.Connection:
    return await asyncio.wait_for(asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="alice", password=PASSWORD, database="postgres", ssl=False,
        server_settings={"options": f"endpoint={branch}"}), DEADLINE)


async def test_signals_outlive_a_reset_so_idle_clients_are_not_suspended(lake: Lake, proxy: Proxy) -> None:
    cp = lake.endpoints
    first = await session(proxy, "child")
    signals = cp.signals("child")
    assert signals.sessions == 1
    await cp.reset_branch("child")  # its compute stops: the session ends
    with contextlib.suppress(Exception):
        await first.close(timeout=5)
    assert cp.signals("child") is signals  # the proxy's object is still the branch's
    cp.configure("child", EndpointConfig(suspend_timeout=1))
    second = await session(proxy, "child")
    try:
        assert signals.sessions == 1
        await asyncio.sleep(3)  # three idle timeouts: a compute counting into an orphan would stop
        assert cp.endpoint("child").state == EndpointState.ACTIVE
        assert await second.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await second.close()
    await poll_until(lambda: cp.endpoint("child").state == EndpointState.SUSPENDED,
                     "the idle child to scale to zero", timeout=DEADLINE, every=0.1)
    cp.configure("child", EndpointConfig(suspend_timeout=3600))


async def test_a_stalled_catalog_stalls_no_session(lake: Lake, proxy: Proxy) -> None:
    """Routing, SCRAM and wake of an active branch read memory only: with the catalog's lock held
    by another thread (as a GC or image commit holds it across an fsync), new sessions still open
    and relay. The loop runs in debug mode meanwhile: no callback on the way may block it."""
    held = await session(proxy, "main")  # main is active
    loop = asyncio.get_running_loop()
    slow: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Executing" in record.getMessage():
                slow.append(record.getMessage())

    catch = Catch()
    logging.getLogger("asyncio").addHandler(catch)
    loop.set_debug(True)
    loop.slow_callback_duration = 0.25
    release = threading.Event()
    locked = threading.Event()

    def hold_catalog() -> None:
        with lake.store.catalog._lock:
            locked.set()
            release.wait(120)

    holder = threading.Thread(target=hold_catalog)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        for _ in range(5):
            conn = await session(proxy, "main")
            assert await asyncio.wait_for(conn.fetchval("SELECT sum(n) FROM t"), DEADLINE) == 1
            await conn.close()
        assert await asyncio.wait_for(held.fetchval("SELECT 2"), DEADLINE) == 2
    finally:
        release.set()
        await asyncio.to_thread(holder.join)
        loop.set_debug(False)
        logging.getLogger("asyncio").removeHandler(catch)
        await held.close()
    assert not slow, slow


async def test_bad_input_is_refused_with_a_clear_error(lake: Lake) -> None:
    cp = lake.endpoints
    with pytest.raises(InvalidName, match="is not allowed"):
        await cp.create_branch("main\n", "main")
    with pytest.raises(InvalidTarget, match="must be a string"):
        await cp.create_branch("x1", "main", at=5)
    with pytest.raises(InvalidTarget, match="must be a string"):
        await cp.restore_branch("child", {"lsn": "0/0"})
    with pytest.raises(InvalidName, match="must be a string"):
        await cp.create_branch(["x"], "main")
    with pytest.raises(project.RoleError):
        project.check_role_name("alice\n")
    assert not cp.has_branch("x1") and not cp.has_branch("main\n")


async def test_branch_workflows_keep_memory_and_disk_in_step(lake: Lake) -> None:
    cp = lake.endpoints
    await cp.create_branch("gone", "main")
    await cp.create_branch("gone-kid", "gone")
    assert cp.role_verifier("gone-kid", "alice") == cp.role_verifier("main", "alice") is not None
    await sql(lake, "gone-kid", "SELECT 1")
    home = lake.computes / "gone-kid"
    assert home.is_dir()
    assert sorted(await cp.delete_branch("gone", force=True)) == ["gone", "gone-kid"]
    assert not cp.has_branch("gone") and not cp.has_branch("gone-kid")
    assert cp.role_verifier("gone-kid", "alice") is None
    assert not home.exists() and not (lake.computes / "gone").exists()
    assert "gone-kid" not in {s.branch for s in cp.status()}


def test_illegal_transitions_are_refused() -> None:
    states = set(EndpointState)
    assert set(TRANSITIONS) == states
    assert EndpointState.ACTIVE not in TRANSITIONS[EndpointState.SUSPENDED]  # never skip the start
    assert issubclass(IllegalTransition, RuntimeError)


async def test_stalled_durability_is_reported_and_clears(lake: Lake) -> None:
    """An unwritable archive: the receiver cannot store WAL, commits wait, and the branch says
    so in status (and /healthz, which reads ``stalled()``); restarts back off; it clears once
    the store is writable again and the waiting commit completes."""
    cp = lake.endpoints
    addr = await cp.ensure_ready("main")
    node = cp.active_node("main")
    assert node is not None and node._receiver is not None
    receiver = node._receiver
    wal_dir = Path(await asyncio.to_thread(lake.store.wal_dir, "main"))
    files = [p for p in wal_dir.iterdir() if p.is_file()]
    modes = {p: p.stat().st_mode & 0o777 for p in [wal_dir, *files]}
    for p in files:
        os.chmod(p, 0o400)
    os.chmod(wal_dir, 0o500)
    conn = await connect(addr)
    commit: asyncio.Task[object] | None = None
    try:
        os.kill(receiver.pid() or 0, 9)
        commit = asyncio.create_task(conn.execute("INSERT INTO t VALUES (2)"))
        await poll_until(lambda: "main" in cp.stalled(), "the stall to be reported", timeout=DEADLINE, every=0.1)
        st = next(s for s in cp.status() if s.branch == "main")
        assert st.durability_stalled and "WAL receiver" in st.durability_stalled
        before, started = receiver.restarts, time.monotonic()
        await asyncio.sleep(3)
        # Backing off: a few restarts in these seconds, not a dozen a second.
        assert receiver.restarts - before <= 3 + (time.monotonic() - started), receiver.restarts - before
        assert not commit.done()
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert commit is not None
    await asyncio.wait_for(commit, DEADLINE)
    await poll_until(lambda: not cp.stalled(), "the stall to clear", timeout=DEADLINE, every=0.1)
    assert await conn.fetchval("SELECT count(*) FROM t") == 2
    await conn.close()
