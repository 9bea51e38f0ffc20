"""Branching cost against database size: branch-create time and store growth for a small and a
large database, and how long materializing a data dir from the store takes per GB.

    .venv/bin/python bench/branching.py [--quick] [--creates N]
    .venv/bin/python bench/branching.py --store s3://BUCKET/PREFIX|moto [--quick]

With ``--store``, the same table on a store in a bucket against the local store, side by side
(``bench/s3_store.py``: ``moto`` starts moto's S3 server on loopback; an ``s3://`` URI uses that
bucket, found the standard AWS way).

For each size a fresh store gets one table of wide rows on ``main``, which is then suspended (its
image goes to the store). Creating a branch writes one catalog row, so its time and the store's
growth should not depend on the size: goal under 50 ms and a large/small ratio under 1.2. A
branch at a timestamp also resolves it from the archived WAL (shown for reference: the first one
reads every segment, the next one only what the commit index has not seen). Materialize
is ``Store.materialize`` of a new branch (restoring the image's pages into a data dir); the first
start adds Postgres' recovery and promotion on top.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user  # noqa: E402

MB = 1 << 20
ROW_BYTES = 1000  # ~1 KB per row: 8 rows per heap page


@dataclass
class Result:
    label: str
    db_bytes: int
    create_ms: list[float]
    growth_per_branch: float
    create_at_ms: float
    create_at_warm_ms: float
    materialize_s: float
    first_start_s: float


async def fill(eps: Endpoints, target_mb: int) -> int:
    """One table of ~``target_mb`` MB on main, vacuumed (hint bits and visibility map set, as in a
    database in use), then main suspended: its image goes to the store. Returns the database size."""
    addr = await eps.ensure_ready("main")
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")
    try:
        rows = target_mb * MB // ROW_BYTES
        await conn.execute("CREATE TABLE big AS SELECT g AS n, (SELECT string_agg(md5(g::text || i::text), '') "
                           f"FROM generate_series(1, 30) i) AS pad FROM generate_series(1, {rows}) g")
        await conn.execute("VACUUM big")
        size = int(await conn.fetchval("SELECT pg_database_size('postgres')"))
    finally:
        await conn.close()
    await eps.suspend("main")
    return size


async def time_creates(eps: Endpoints, creates: int) -> tuple[list[float], float]:
    """Create ``creates`` branches of suspended main through the control plane (what the API and
    CLI call): per-create milliseconds, store growth per branch."""
    before = await asyncio.to_thread(eps.store.physical_bytes)
    times = []
    for i in range(creates):
        t0 = time.perf_counter()
        await eps.create_branch(f"b{i}", "main")
        times.append((time.perf_counter() - t0) * 1e3)
    return times, (await asyncio.to_thread(eps.store.physical_bytes) - before) / creates


async def measure(label: str, target_mb: int, creates: int, pg: PgBinaries, user: ServiceUser) -> Result:
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-branching-", dir="/tmp"))
    os.chmod(root, 0o755)
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg,
                    config=EndpointConfig(suspend_timeout=3600), cgroups=False)
    await eps.start()
    try:
        db_bytes = await fill(eps, target_mb)
        # Flush the fill's writeback first: each create fsyncs the catalog, and that fsync should not
        # queue behind a gigabyte of dirty pages from loading the table.
        await asyncio.to_thread(os.sync)
        create_ms, growth = await time_creates(eps, creates)
        now = datetime.now(UTC).isoformat()
        t0 = time.perf_counter()
        await eps.create_branch("at-now", "main", at=now)
        create_at_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()  # again: the commit index now knows every finished segment
        await eps.create_branch("at-now-2", "main", at=now)
        create_at_warm_ms = (time.perf_counter() - t0) * 1e3
        scratch = root / "scratch" / "pgdata"
        scratch.parent.mkdir()
        t0 = time.perf_counter()
        await asyncio.to_thread(store.materialize, "b0", scratch)
        materialize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await eps.ensure_ready("b1")
        first_start_s = time.perf_counter() - t0
    finally:
        await eps.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return Result(label, db_bytes, create_ms, growth, create_at_ms, create_at_warm_ms, materialize_s, first_start_s)


def report(small: Result, large: Result) -> None:
    def row(name: str, fmt: str, a: float, b: float, ratio: bool = True) -> None:
        r = f"{b / a:8.2f}" if ratio and a else f"{'':>8}"
        print(f"{name:34}{fmt.format(a):>14}{fmt.format(b):>14}{r}")

    print(f"{'':34}{small.label:>14}{large.label:>14}{'ratio':>8}")
    row("database size (MB)", "{:.0f}", small.db_bytes / MB, large.db_bytes / MB)
    row("branch create, median (ms)", "{:.2f}", statistics.median(small.create_ms), statistics.median(large.create_ms))
    row("branch create, max (ms)", "{:.2f}", max(small.create_ms), max(large.create_ms))
    row("store growth per branch (bytes)", "{:.0f}", small.growth_per_branch, large.growth_per_branch, False)
    row("branch at a timestamp, first (ms)", "{:.0f}", small.create_at_ms, large.create_at_ms)
    row("branch at a timestamp, again (ms)", "{:.0f}", small.create_at_warm_ms, large.create_at_warm_ms)
    row("materialize (s)", "{:.2f}", small.materialize_s, large.materialize_s)
    row("materialize (s per GB)", "{:.1f}", small.materialize_s / (small.db_bytes / 2**30),
        large.materialize_s / (large.db_bytes / 2**30), False)
    row("first start from the store (s)", "{:.2f}", small.first_start_s, large.first_start_s)
    ratio = statistics.median(large.create_ms) / statistics.median(small.create_ms)
    worst = max(statistics.median(small.create_ms), statistics.median(large.create_ms))
    print(f"branch create: {worst:.2f} ms median (goal < 50 ms), large/small ratio {ratio:.2f} (goal < 1.2)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~10 MB vs ~200 MB instead of ~10 MB vs ~1 GB")
    ap.add_argument("--creates", type=int, default=20, help="branches created per size")
    ap.add_argument("--store", help="s3://BUCKET/PREFIX, or moto: the bucket vs the local store (bench/s3_store.py)")
    args, rest = ap.parse_known_args()
    if args.store:
        import s3_store  # bench/s3_store.py, beside this file

        await s3_store.main(["--store", args.store, *(["--quick"] if args.quick else []), *rest])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.ERROR)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    large_mb = 200 if args.quick else 1024
    small = await measure("~10 MB", 10, args.creates, pg, user)
    large = await measure(f"~{large_mb} MB", large_mb, args.creates, pg, user)
    report(small, large)


if __name__ == "__main__":
    asyncio.run(main())
