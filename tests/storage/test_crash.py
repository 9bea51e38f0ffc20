"""kill -9 in the middle of branch create, image write, branch delete and GC: the store opens,
refers to nothing that is missing, and every branch still materializes with its rows."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from compute import ComputeNode, sizes
from storage import Store, images
from tests.storage.conftest import Lake, from_store_only, rows, sql, suspend_all

REPO = Path(__file__).resolve().parents[2]


async def run_child(store_root: Path, kill_after: int, *operation: str) -> bool:
    """Run ``operation`` in a child process; True when it was killed before it finished."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.storage.crash_child", str(store_root), str(kill_after), *operation,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, err.decode()
    return False


def check_store(lake: Lake) -> None:
    """Open the store afresh (as after a crash) and check that everything the catalog refers to
    exists: manifests, every page they list and the packs holding them, checkpoint copies, and a
    start image for every branch."""
    store = Store.open(lake.store.root, user=lake.store.user, pg=lake.store.pg)
    try:
        for image in store.catalog.images():
            digests = list(images.image_digests(store.objects, image.manifest_key))
            packs: set[str] = set()
            for i in range(0, len(digests), 500):
                chunk = digests[i:i + 500]
                found = store.pages.db.execute(
                    f"SELECT digest, pack FROM pages WHERE digest IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                assert len(found) == len(chunk), f"image {image.id} lost pages"
                packs |= {pack for _, pack in found}
            assert all(store.objects.exists(pack) for pack in packs), f"image {image.id} lost a pack"
            assert any(store._ckpt_dir(image.manifest_key).iterdir()), f"image {image.id} lost its checkpoint"
        for row in store.catalog.branches():
            store._recovery_plan(row)  # raises when no image to start from is left
    finally:
        store.close()


async def kill_through(lake: Lake, *operation: str) -> int:
    """Kill ``operation`` after 30, 90, 270, … lines of storage code until a run gets to the end,
    checking the store after every kill; returns how many runs were killed."""
    kills, lines = 0, 30
    while await run_child(lake.store.root, lines, *operation):
        kills += 1
        await asyncio.to_thread(check_store, lake)
        lines *= 3
    await asyncio.to_thread(check_store, lake)
    return kills


async def clean_datadir_with_new_pages(lake: Lake, branch: str) -> Path:
    """A cleanly shut down data dir of ``branch`` holding pages the store has never seen, that is
    not yet an image (the child process makes it one)."""
    node = ComputeNode(lake.store, branch, computes_dir=lake.root / "scratch", user=lake.store.user,
                       pg=lake.store.pg, settings=sizes.settings_for(0.25))
    await node.start()
    conn = await node.connect()
    try:
        await conn.execute("INSERT INTO c SELECT g, md5(g::text) FROM generate_series(1001, 20000) g")
    finally:
        await conn.close()
    await node.stop(image=False)
    return node.datadir


async def test_kill_9_mid_operation_leaves_a_consistent_store(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE c (n int, pad text)")
    await sql(lake, "main", "INSERT INTO c SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    await lake.endpoints.suspend("main")
    await asyncio.to_thread(lake.store.create_branch, "crashy", "main")
    datadir = await clean_datadir_with_new_pages(lake, "crashy")
    crashy_id = lake.store.get_branch("crashy").id

    assert await kill_through(lake, "create", "born", "main") >= 2
    assert "born" in lake.store.branch_names()

    before = len(lake.store.catalog.images(crashy_id))
    assert await kill_through(lake, "image", "crashy", str(datadir)) >= 4
    assert len(lake.store.catalog.images(crashy_id)) > before

    await asyncio.to_thread(lake.store.create_branch, "doomed", "crashy")
    await asyncio.to_thread(lake.store.create_branch, "doomed-kid", "doomed")
    assert await kill_through(lake, "delete", "doomed") >= 2
    assert not {"doomed", "doomed-kid"} & set(lake.store.branch_names())

    assert await kill_through(lake, "gc") >= 3

    expected = {"main": 1000, "born": 1000, "crashy": 20000}
    await suspend_all(lake)
    await from_store_only(lake, *expected)
    for branch, count in expected.items():
        assert len(await rows(lake, branch, "c")) == count, branch
    await suspend_all(lake)
