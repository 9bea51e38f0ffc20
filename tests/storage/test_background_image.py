"""Background images: while a branch's compute runs on, the store images it whenever the branch
has streamed more WAL than a threshold since its last image. A crash recovery then replays from
that image, branches after it start from it, and GC drops the WAL before its redo point."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from compute import EndpointConfig
from storage import lsn as lsnmod
from storage import wal
from storage.catalog import Catalog, ImageRow
from storage.postgres import PgBinaries, ServiceUser
from storage.store import IMAGE_WAL_THRESHOLD
from tests.storage.conftest import Lake, branch_at_head, close_lake, open_lake, sql
from tests.storage.test_crash import REPO, check_store

THRESHOLD = 2 << 20  # two 1 MB segments: a few batches of rows pass it
BATCH = 4000
INSERT = "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series($1::int, $2::int) g"  # ~1 MB of WAL
DEADLINE = 120.0  # generous: only a hang reaches it


@dataclass
class Imaged:
    image: ImageRow  # the background image of main
    acked: int  # rows 1..acked were acknowledged on main when the image was seen


@pytest.fixture(scope="module")
async def lake(lake_root: Path, service_user: ServiceUser, pg: PgBinaries,
               registry: CollectorRegistry) -> AsyncIterator[Lake]:
    """A store with a small image threshold, and endpoints that check for it twice a second."""
    opened = await open_lake(lake_root, service_user, pg, image_wal_threshold=THRESHOLD, registry=registry,
                             config=EndpointConfig(suspend_timeout=3600, image_check_every=0.5))
    yield opened
    await close_lake(opened)


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def online_images(lake: Lake, branch: str) -> list[ImageRow]:
    return [i for i in lake.store.catalog.images(lake.store.get_branch(branch).id) if i.online]


async def count(lake: Lake, branch: str) -> tuple[int, int]:
    """(rows, highest n) of ``t`` on ``branch``."""
    record = await sql(lake, branch, "SELECT (count(*)::int, coalesce(max(n), 0)) FROM t")
    rows, highest = record  # type: ignore[misc]
    return int(rows), int(highest)


async def crash_and_lose_disk(lake: Lake, branch: str) -> None:
    """kill -9 the branch's postmaster, then delete every compute's local state."""
    node = lake.endpoints.active_node(branch)
    assert node is not None and node.pid is not None
    os.kill(node.pid, signal.SIGKILL)

    async def suspended() -> bool:
        return lake.endpoints.endpoint(branch).state == "suspended"

    await wait_for(suspended, f"{branch} to notice its compute died")
    await lake.endpoints.endpoint(branch).image_job_done()
    shutil.rmtree(lake.computes)


@pytest.fixture(scope="module")
async def imaged(lake: Lake) -> Imaged:
    """Write batches of rows to a running main until a background image of it is in the catalog."""
    await sql(lake, "main", "CREATE TABLE t (n int, pad text)")
    written = 0

    async def write_and_check() -> bool:
        nonlocal written
        await sql(lake, "main", INSERT, written + 1, written + BATCH)
        written += BATCH
        return bool(online_images(lake, "main"))

    await wait_for(write_and_check, "a background image of main")
    acked = written
    # No further images from here on: each test knows which one materialize must pick.
    lake.store.image_wal_threshold = IMAGE_WAL_THRESHOLD
    await lake.endpoints.endpoint("main").image_job_done()
    return Imaged(online_images(lake, "main")[-1], acked)


async def test_background_image_is_taken_while_the_compute_serves(lake: Lake, imaged: Imaged,
                                                                  registry: CollectorRegistry) -> None:
    image = imaged.image
    assert image.redo < image.lsn
    assert lake.endpoints.endpoint("main").state == "active"
    assert await count(lake, "main") == (imaged.acked, imaged.acked)
    assert lake.store.catalog.is_running(image.branch_id)  # the compute writes on past the image
    ok = registry.get_sample_value("lakelet_compute_background_images_total", {"branch": "main", "outcome": "ok"})
    assert ok is not None and ok >= 1
    # The image carries its WAL from the redo point on: it reaches consistency on its own.
    copy = {p.name.removesuffix(".partial") for p in lake.store._ckpt_dir(image.manifest_key).iterdir()}
    assert lsnmod.segment_name(image.tli, image.redo, lake.store._segment_size()) in copy


async def test_crash_recovery_starts_from_the_background_image(lake: Lake, imaged: Imaged) -> None:
    after = imaged.acked + BATCH
    await sql(lake, "main", INSERT, imaged.acked + 1, after)
    row = lake.store.catalog.branch_by_id(imaged.image.branch_id)
    assert row is not None and lake.store._start_image(row) == imaged.image

    await crash_and_lose_disk(lake, "main")
    assert await count(lake, "main") == (after, after)
    # Postgres itself says where replay began: the image's redo point, not the branch's first WAL.
    log = (lake.computes / "main" / "postgres.log").read_text()
    assert f"redo starts at {lsnmod.fmt(imaged.image.redo)}" in log


async def test_branches_after_at_and_before_the_background_image(lake: Lake, imaged: Imaged) -> None:
    total, _ = await count(lake, "main")
    await branch_at_head(lake, "later", "main")
    assert await count(lake, "later") == (total, total)

    image = imaged.image
    await asyncio.to_thread(lake.store.create_branch, "exact", "main", at=lsnmod.fmt(image.lsn))
    exact = lake.store.catalog.branch_by_name("exact")
    assert exact is not None and lake.store._start_image(exact) == image
    rows, highest = await count(lake, "exact")
    # The state at the backup's end: whole batches (each one transaction), no more than were
    # acknowledged when the image was seen.
    assert rows == highest and rows % BATCH == 0 and 0 < rows <= imaged.acked

    # Before the backup's end the image is not consistent yet: an older image serves that target.
    await asyncio.to_thread(lake.store.create_branch, "before", "main", at=lsnmod.fmt(image.redo))
    before = lake.store.catalog.branch_by_name("before")
    assert before is not None
    start = lake.store._start_image(before)
    assert start is not None and start.lsn <= image.redo and start.id != image.id
    earlier, earlier_highest = await count(lake, "before")
    assert earlier == earlier_highest and earlier % BATCH == 0 and earlier <= rows


async def test_gc_drops_wal_before_the_redo_point(lake: Lake, imaged: Imaged) -> None:
    image = imaged.image
    store = lake.store
    seg = store._segment_size()
    wal_dir = store.wal_root / str(image.branch_id)

    def oldest() -> int:
        return min(lsnmod.segment_start(name, seg)[1] for name in wal.segments(wal_dir))

    # 'before' starts from an older image and needs all of main's WAL up to its branch point.
    await lake.endpoints.suspend("before")
    await asyncio.to_thread(store.delete_branch, "before")
    lake.endpoints.forget("before")
    assert oldest() + seg <= image.redo - seg  # there is WAL before the redo point to drop
    total, _ = await count(lake, "main")
    store.retention = timedelta(0)
    try:
        report = await asyncio.to_thread(store.gc)
    finally:
        store.retention = timedelta(days=7)
    assert report.wal_files_deleted > 0
    assert oldest() + seg > image.redo - seg  # all gone but one segment of slack
    assert [i.id for i in store.catalog.images(image.branch_id)] == [image.id]

    await crash_and_lose_disk(lake, "main")
    assert await count(lake, "main") == (total, total)


CHILD = """
import os, sys
from pathlib import Path
from storage import Store
from storage.postgres import find_binaries, resolve_service_user
from tests.storage.crash_child import kill_after
root, lines, host, port = sys.argv[1:]
store = Store.open(Path(root), user=resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER")), pg=find_binaries())
kill_after(int(lines))
store.take_online_image("main", host=host, port=int(port))
sys.settrace(None)
store.close()
"""


async def online_image_in_child(lake: Lake, kill_after_lines: int) -> bool:
    """Take an online image of main in a child process killed (SIGKILL) after ``kill_after_lines``
    lines of storage code; True when it was killed before it finished."""
    node = lake.endpoints.active_node("main")
    assert node is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(lake.store.root), str(kill_after_lines), str(node.socket_dir),
        str(node.port), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, err.decode()
    return False


async def test_kill_9_mid_online_image_leaves_a_consistent_store(lake: Lake, imaged: Imaged) -> None:
    await sql(lake, "main", "SELECT 1")  # wakes main if an earlier test left it down
    before = len(online_images(lake, "main"))
    kills, lines = 0, 30
    while await online_image_in_child(lake, lines):
        kills += 1
        await asyncio.to_thread(check_store, lake)
        lines *= 3
    await asyncio.to_thread(check_store, lake)
    assert kills >= 3 and len(online_images(lake, "main")) > before
    total, _ = await count(lake, "main")
    await crash_and_lose_disk(lake, "main")
    assert await count(lake, "main") == (total, total)


def test_catalog_of_an_older_store_gains_redo_lsn(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE images (id INTEGER PRIMARY KEY, branch_id INTEGER NOT NULL, lsn INTEGER NOT NULL,"
                     " tli INTEGER NOT NULL, manifest_key TEXT NOT NULL, logical_bytes INTEGER NOT NULL,"
                     " created_at REAL NOT NULL);"
                     "INSERT INTO images VALUES (1, 1, 100, 1, 'images/1/x.manifest', 8192, 0);")
    db.close()
    catalog = Catalog(path)
    try:
        (old,) = catalog.images()
        assert not old.online and old.redo == 100
        catalog.add_image(1, 300, 2, "images/1/y.manifest", 8192, redo_lsn=200)
        assert catalog.images()[-1].redo == 200 and catalog.images()[-1].online
    finally:
        catalog.close()
