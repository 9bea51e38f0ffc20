"""Ten cold starts at once against the same ten one after another.

    .venv/bin/python bench/cold_starts.py [--branches N] [--mb M]

A fresh store gets one table of ``M`` MB on ``main`` (then suspended: its image goes to the
store) and ``N`` branches of it. Each round drops every local data dir first, so each wake is a
full cold start: restore the image's pages, replay, promote onto the branch's own timeline, answer
a query (the WAL receiver connects off the wake path). The floor is the same N starts done one after
another (what a global start lock made of every burst); the ratio is sequential wall time /
concurrent wall time (1.0 = no overlap).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import ControlPlane, EndpointConfig  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402


async def answer(cp: ControlPlane, branch: str) -> float:
    t0 = time.perf_counter()
    addr = await cp.ensure_ready(branch)
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
    try:
        await conn.fetchval("SELECT count(*) FROM t")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def cold(cp: ControlPlane, root: Path, names: list[str]) -> None:
    await asyncio.gather(*(cp.suspend(b) for b in names))
    for b in names:
        shutil.rmtree(root / "computes" / b, ignore_errors=True)


async def main(branches: int, mb: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-cold-", dir="/tmp"))
    os.chmod(root, 0o755)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    cp = ControlPlane(store, computes_dir=root / "computes", user=user, pg=pg,
                      config=EndpointConfig(suspend_timeout=3600), cgroups=False)
    await cp.start()
    names = [f"b{i}" for i in range(branches)]
    try:
        addr = await cp.ensure_ready("main")
        conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
        # ~1 KB rows are stored as they are (TOAST compresses only rows over ~2 KB).
        await conn.execute(f"CREATE TABLE t AS SELECT g, repeat('x', 1000) AS pad "
                           f"FROM generate_series(1, {mb * 1000}) g")
        await conn.close()
        await cp.suspend("main")
        for b in names:
            await cp.create_branch(b, "main")
            await answer(cp, b)  # first start: the branch's own first timeline
        await cold(cp, root, names)
        t0 = time.perf_counter()
        each = [await answer(cp, b) for b in names]
        sequential = time.perf_counter() - t0
        await cold(cp, root, names)
        t0 = time.perf_counter()
        together = await asyncio.gather(*(answer(cp, b) for b in names))
        concurrent = time.perf_counter() - t0
        print(f"{branches} cold starts of a {mb} MB branch (restore + replay + promote, first query answered):")
        print(f"  one after another: {sequential:6.2f} s wall  (each {min(each):.2f}-{max(each):.2f} s)")
        print(f"  all at once:       {concurrent:6.2f} s wall  (each {min(together):.2f}-{max(together):.2f} s)")
        print(f"  ratio sequential/concurrent: {sequential / concurrent:.2f}x  (1.0 = starts serialized)")
    finally:
        await cp.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--branches", type=int, default=10)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.branches, args.mb))
