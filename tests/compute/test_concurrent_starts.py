"""Cold starts of different branches run side by side, and one stuck branch stalls no other.

No timings are asserted: concurrency shows as overlapping start intervals, isolation as a healthy
branch answering while the stuck one is still starting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator

import pytest

from tests.conftest import poll_until
from tests.storage.conftest import Lake, close_lake, open_lake, sql

BRANCHES = [f"b{i}" for i in range(10)]
WAKE = 180.0  # ten replays at once on a loaded two-core machine; only a hang should reach it


@pytest.fixture(scope="module")
async def lake(root, service_user, pg) -> AsyncIterator[Lake]:  # noqa: ANN001 - fixtures
    opened = await open_lake(root, service_user, pg)
    await sql(opened, "main", "CREATE TABLE t AS SELECT generate_series(1, 100) AS n")
    await opened.endpoints.suspend("main")  # children branch at main's newest image
    for name in BRANCHES:
        await asyncio.to_thread(opened.store.create_branch, name, "main")
    yield opened
    await close_lake(opened)


async def test_ten_branches_woken_at_once_start_side_by_side(lake: Lake) -> None:
    counts = await asyncio.wait_for(asyncio.gather(*(sql(lake, b, "SELECT count(*) FROM t") for b in BRANCHES)),
                                    WAKE)
    assert counts == [100] * len(BRANCHES)
    nodes = [lake.endpoints.active_node(b) for b in BRANCHES]
    assert all(n is not None for n in nodes)
    # Each start replays and promotes onto its own timeline; they overlap instead of queueing
    # one after another (a global start lock made every interval end before the next began).
    intervals = sorted((n.spawned_at, n.ready_at) for n in nodes if n is not None)
    most = max(sum(1 for s, e in intervals if s <= at < e) for at, _ in intervals)
    assert most >= 3, f"at most {most} of ten starts overlapped: {intervals}"
    timelines = [await asyncio.to_thread(lake.store.catalog.timelines, lake.store.get_branch(b).id)
                 for b in BRANCHES]
    ids = [tli for tls in timelines for tli, _ in tls]
    assert len(ids) == len(set(ids)) == len(BRANCHES), f"timeline IDs not unique: {timelines}"
    await asyncio.gather(*(lake.endpoints.suspend(b) for b in BRANCHES))


async def test_a_stuck_start_does_not_hold_up_another_branch(lake: Lake) -> None:
    stuck, healthy = BRANCHES[0], BRANCHES[1]
    await sql(lake, stuck, "SELECT 1")
    await lake.endpoints.suspend(stuck)  # a clean stop: its data dir is reused as it is
    # A data dir that stays in recovery for good (a standby with nowhere to stream from): its
    # compute never becomes ready, the way a start stalled in a long replay looks.
    datadir = lake.computes / stuck / "pgdata"
    (datadir / "standby.signal").touch()
    os.chown(datadir / "standby.signal", datadir.stat().st_uid, datadir.stat().st_gid)
    waking = asyncio.create_task(lake.endpoints.ensure_ready(stuck))
    pidfile = datadir / "postmaster.pid"
    try:
        await poll_until(pidfile.exists, "the stuck compute to spawn", timeout=60, every=0.05)
        shutil.rmtree(lake.computes / healthy, ignore_errors=True)  # a cold start: restore, replay, promote
        assert await asyncio.wait_for(sql(lake, healthy, "SELECT count(*) FROM t"), WAKE) == 100
        assert not waking.done(), f"the stuck start ended: {waking.exception() if waking.done() else ''}"
        assert next(s for s in lake.endpoints.status() if s.branch == stuck).state == "starting"
    finally:
        # Unstick it: no more standby, and kill its postmaster; the next attempt starts normally.
        (datadir / "standby.signal").unlink(missing_ok=True)
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    await asyncio.wait_for(waking, WAKE)
    assert await sql(lake, stuck, "SELECT count(*) FROM t") == 100
    await asyncio.gather(*(lake.endpoints.suspend(b) for b in (stuck, healthy)))
