"""A branch's WAL archive on a tmpfs that fills up under writers, then kill -9 of the compute:
after space comes back the branch wakes every time and every acknowledged row is there.

A full archive stops the receiver mid-segment (commits wait, the branch reports the stall); the
crash then leaves the archive ending wherever the receiver stopped, which is where the restarted
server must be able to fork its timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import asyncpg
import pytest

from compute import ControlPlane
from tests.conftest import poll_until
from tests.storage.conftest import Lake, close_lake, connect, open_lake, sql

POINTS = 4
TMPFS_MB = 64
HEADROOM = 3 << 20  # free space left on the tmpfs before each point's writers start
WAKE = 120.0


def _mount(path: Path, uid: int, gid: int) -> bool:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,uid={uid},gid={gid},mode=0700",
                           "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture(scope="module")
async def lake(root, service_user, pg) -> AsyncIterator[Lake]:  # noqa: ANN001 - fixtures
    opened = await open_lake(root, service_user, pg)
    await sql(opened, "main", "CREATE TABLE acked (n int PRIMARY KEY, pad text)")
    await opened.endpoints.suspend("main")
    await opened.endpoints.create_branch("full", "main")
    yield opened
    await close_lake(opened)


async def _write(conn: asyncpg.Connection, n: int, acked: list[int]) -> None:
    """Commit rows until a commit never returns; each one that returns is acknowledged."""
    while True:
        await conn.execute("INSERT INTO acked SELECT $1, string_agg(md5(random()::text), '') "
                           "FROM generate_series(1, 1500)", n)  # ~48 kB that does not compress
        acked.append(n)
        n += 1


def _filled(cp: ControlPlane, writer: asyncio.Task[None]) -> bool:
    return "full" in cp.stalled() or writer.done()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_kill_9_on_a_full_archive_never_strands_the_branch(lake: Lake) -> None:
    wal_dir = Path(await asyncio.to_thread(lake.store.wal_dir, "full"))
    user = lake.store.user
    if not _mount(wal_dir, user.uid, user.gid):
        pytest.skip("cannot mount a tmpfs here")
    ballast = wal_dir / "ballast"  # not a WAL file name: the receiver and the store ignore it
    cp = lake.endpoints
    rng = random.Random(int.from_bytes(os.urandom(4)))
    acked: list[int] = []
    try:
        for point in range(POINTS):
            ballast.unlink(missing_ok=True)
            addr = await asyncio.wait_for(cp.ensure_ready("full"), WAKE)
            free = shutil.disk_usage(wal_dir).free
            with open(ballast, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, free - HEADROOM))
            conn = await connect(addr)
            writer = asyncio.create_task(_write(conn, 100_000 * (point + 1), acked))
            await poll_until(partial(_filled, cp, writer), "the archive to fill up", timeout=WAKE, every=0.05)
            assert not writer.done(), writer.exception()
            await asyncio.sleep(rng.uniform(0, 1.5))  # commits waiting, receiver retrying
            os.kill(addr.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await writer
            conn.terminate()
            await poll_until(lambda: cp.active_node("full") is None, "the crash to be noticed",
                             timeout=30, every=0.05)
            ballast.unlink()  # space again
            try:
                got = await asyncio.wait_for(sql(lake, "full", "SELECT array_agg(n ORDER BY n) FROM acked"), WAKE)
            except Exception as e:
                raise AssertionError(f"point {point}: the branch did not come back: {e}") from e
            missing = sorted(set(acked) - set(got or []))
            assert not missing, f"point {point}: acknowledged rows lost: {missing[:10]}"
        await cp.suspend("full")
    finally:
        ballast.unlink(missing_ok=True)
        await cp.suspend("full")
        subprocess.run(["umount", "-l", str(wal_dir)], capture_output=True)
