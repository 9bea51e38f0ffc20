"""Durable WAL: an acknowledged commit survives kill -9 of the compute together with the loss of
its local disk, and survives its WAL receiver being killed mid-load (commits wait meanwhile)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from compute import ComputeNode
from tests.conftest import poll_until
from tests.storage.conftest import Lake, connect, rows, sql

WRITERS = 4
DEADLINE = 60.0  # generous: only a hang reaches it


async def writer(lake: Lake, first: int, acked: list[int], stop: asyncio.Event) -> None:
    """Insert ``first``, ``first + WRITERS``, … one transaction each, noting every acknowledged one,
    until told to stop or the server goes away."""
    conn = await connect(await lake.endpoints.ensure_ready("main"))
    n = first
    try:
        while not stop.is_set():
            await conn.execute("INSERT INTO acked VALUES ($1)", n)
            acked.append(n)
            n += WRITERS
    except Exception:  # noqa: BLE001 - the compute was killed under us (asyncpg reports it several ways):
        pass  # whatever was in flight is unacknowledged
    finally:
        conn.terminate()


async def wait_until(predicate: Callable[[], object], what: str) -> None:
    await poll_until(predicate, what, timeout=DEADLINE, every=0.01)


async def wait_state(lake: Lake, branch: str, state: str) -> None:
    await wait_until(lambda: next(s for s in lake.endpoints.status() if s.branch == branch).state == state,
                     f"{branch} to be {state}")


def receiver_pid(node: ComputeNode) -> int | None:
    """The streaming pg_receivewal of ``node`` (found by its socket directory on the command line)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_receivewal") and b"--synchronous" in argv and any(
                str(node.socket_dir).encode() in a for a in argv):
            return int(entry)
    return None


async def crash_and_lose_disk(lake: Lake, node_pid: int) -> None:
    """kill -9 the postmaster, then delete every compute's local state."""
    os.kill(node_pid, signal.SIGKILL)
    await wait_state(lake, "main", "suspended")
    shutil.rmtree(lake.computes)


async def test_kill_9_and_lost_disk_keep_every_acknowledged_commit(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE acked (n int PRIMARY KEY)")
    for round_ in range(2):  # the second round crashes a compute that was itself rebuilt from the store
        acked: list[int] = []
        stop = asyncio.Event()
        base = round_ * 1_000_000
        tasks = [asyncio.create_task(writer(lake, base + i, acked, stop)) for i in range(WRITERS)]
        await wait_until(lambda acked=acked: len(acked) >= 300, "300 acknowledged commits")
        node = lake.endpoints.active_node("main")
        assert node is not None and node.pid is not None
        await crash_and_lose_disk(lake, node.pid)  # writers are mid-commit right now
        stop.set()
        await asyncio.gather(*tasks)
        present = set(await rows(lake, "main", "acked"))
        assert set(acked) <= present, f"lost {len(set(acked) - present)} acknowledged commits"
    await lake.endpoints.suspend("main")


async def test_killed_wal_receiver_holds_commits_and_loses_none(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE IF NOT EXISTS acked (n int PRIMARY KEY)")
    await sql(lake, "main", "TRUNCATE acked")
    node = await lake.endpoints.node("main")
    acked: list[int] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer(lake, i, acked, stop)) for i in range(WRITERS)]
    for kill in range(3):
        await wait_until(lambda kill=kill: len(acked) >= 100 * (kill + 1), "commits flowing")
        pid = receiver_pid(node)
        assert pid is not None
        if kill == 0:
            # Frozen receiver: commits are not acknowledged, they wait for the store.
            os.kill(pid, signal.SIGSTOP)
            await assert_commits_wait(lake)
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda pid=pid: receiver_pid(node) not in (None, pid), "the receiver to be restarted")
    count = len(acked)
    await wait_until(lambda: len(acked) >= count + 100, "commits to flow again")
    stop.set()
    await asyncio.gather(*tasks)
    assert node.pid is not None
    await crash_and_lose_disk(lake, node.pid)
    present = set(await rows(lake, "main", "acked"))
    assert set(acked) <= present, f"lost {len(set(acked) - present)} acknowledged commits"
    await lake.endpoints.suspend("main")


async def assert_commits_wait(lake: Lake) -> None:
    """Every writer ends up waiting for synchronous replication, and a commit started now waits
    too: nothing is acknowledged while the receiver is frozen."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
    await wait_for_count(lake, waiting, WRITERS)
    conn = await connect(await lake.endpoints.ensure_ready("main"))
    blocked = asyncio.create_task(conn.execute("INSERT INTO acked VALUES (-1)"))
    try:
        await wait_for_count(lake, waiting, WRITERS + 1)
        assert not blocked.done()
    finally:
        blocked.cancel()
        conn.terminate()
        with contextlib.suppress(BaseException):
            await blocked


async def wait_for_count(lake: Lake, query: str, at_least: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while int(await sql(lake, "main", query)) < at_least:  # type: ignore[call-overload]
        assert time.monotonic() < deadline, f"never reached {at_least}: {query}"
        await asyncio.sleep(0.01)
