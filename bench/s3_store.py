"""The store in a bucket against the store on local disk, side by side in one run.

    .venv/bin/python bench/s3_store.py [--quick] [--size-mb 1024] [--pgbench-seconds 30]

The bucket is moto's S3 server on 127.0.0.1 (started here, as the tests do). Two stores get the
same ~1 GB table on ``main`` (then suspended: its image goes to the store):

- branch create: median of 20 creates on each store (one catalog row either way);
- first start of a new branch: from the local store, and from the bucket with an empty pack
  cache (the packs fetched in parallel, then restored) — goal: at most 1.5× the local one;
- a fresh machine: the whole working copy (catalog, page index, WAL) rebuilt from the bucket on an
  empty directory, then ``main``'s first start;
- WAL upload under write load: pgbench (TPC-B-like, 4 clients) on ``main`` of the bucket store;
  how fast Postgres writes WAL, how much the uploader sends, and how far behind the upload is
  (sampled every 0.25 s; goal: the backlog never grows, it stays within about one interval).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import branching  # noqa: E402 - bench/branching.py, beside this file

from compute import EndpointConfig, Endpoints  # noqa: E402
from storage import Store  # noqa: E402
from storage.bucket import open_store  # noqa: E402
from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user  # noqa: E402
from storage.s3objects import S3ObjectStore  # noqa: E402
from tests.s3server import moto_server  # noqa: E402

MB = 1 << 20


@dataclass
class Lake:
    root: Path
    store: Store
    eps: Endpoints


@contextmanager
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-s3-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def open_lake(root: Path, uri: str | None, pg: PgBinaries, user: ServiceUser, interval: float) -> Lake:
    store = await asyncio.to_thread(open_store, uri, root / "store", user=user, pg=pg, upload_interval=interval)
    await asyncio.to_thread(store.bootstrap)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg,
                    config=EndpointConfig(suspend_timeout=3600), cgroups=False)
    await eps.start()
    return Lake(root, store, eps)


async def close_lake(lake: Lake) -> None:
    await lake.eps.close()
    await asyncio.to_thread(lake.store.close)


async def connect(lake: Lake, branch: str) -> asyncpg.Connection:
    addr = await lake.eps.ensure_ready(branch)
    return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="postgres")


async def fill(lake: Lake, target_mb: int) -> int:
    """``bench/branching.py``'s table of ~``target_mb`` MB, its image stored, then synced to disk."""
    size = await branching.fill(lake.eps, target_mb)
    await asyncio.to_thread(os.sync)
    return size


def time_creates(store: Store, prefix: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        store.create_branch(f"{prefix}{i}", "main")
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def first_start(lake: Lake, branch: str) -> float:
    t0 = time.perf_counter()
    conn = await connect(lake, branch)
    try:
        assert await conn.fetchval("SELECT count(*) > 0 FROM big")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def wal_upload(lake: Lake, pg: PgBinaries, user: ServiceUser, seconds: int) -> dict[str, float]:
    objects = lake.store.objects
    assert isinstance(objects, S3ObjectStore)
    uploader = objects.uploader
    addr = await lake.eps.ensure_ready("main")
    env = {"PGHOST": addr.socket_dir, "PGPORT": str(addr.port), "PGUSER": "lakelet_admin", "PGDATABASE": "postgres"}
    init = await asyncio.create_subprocess_exec(
        pg["pgbench"], "-i", "-s", "10", "-q", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=user.preexec, env=user.child_env(env), cwd="/")
    await init.wait()
    conn = await connect(lake, "main")
    try:
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
        sent0 = uploader.bytes_uploaded
        t0 = time.perf_counter()
        bench = await asyncio.create_subprocess_exec(
            pg["pgbench"], "-n", "-c", "4", "-j", "2", "-T", str(seconds), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, preexec_fn=user.preexec, env=user.child_env(env), cwd="/")
        backlog: list[int] = []
        age: list[float] = []
        while bench.returncode is None:
            backlog.append((await asyncio.to_thread(uploader.pending))[1])
            age.append(uploader.backlog_seconds)
            try:
                await asyncio.wait_for(bench.wait(), 0.25)
            except TimeoutError:
                pass
        elapsed = time.perf_counter() - t0
        lsn1 = await conn.fetchval("SELECT pg_current_wal_lsn()")
        written = await conn.fetchval("SELECT $1::pg_lsn - $2::pg_lsn", lsn1, lsn0)
        sent = uploader.bytes_uploaded - sent0
        t1 = time.perf_counter()
        while (await asyncio.to_thread(uploader.pending))[1] > 2 * MB and time.perf_counter() - t1 < 120:
            await asyncio.sleep(0.1)
        drain = time.perf_counter() - t1
    finally:
        await conn.close()
    return {"wal_mb_s": float(written) / MB / elapsed, "sent_mb_s": sent / MB / elapsed,
            "backlog_median_mb": statistics.median(backlog) / MB, "backlog_max_mb": max(backlog) / MB,
            "age_median_s": statistics.median(age), "age_max_s": max(age), "hold_after": uploader.hold_after,
            "drain_s": drain, "seconds": elapsed}


async def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="moto", help="s3://BUCKET/PREFIX (found the standard AWS way), or moto: "
                    "moto's S3 server on 127.0.0.1")
    ap.add_argument("--quick", action="store_true", help="~200 MB and 15 s of pgbench")
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--pgbench-seconds", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0, help="wal_upload_interval of the bucket store")
    args = ap.parse_args(argv)
    size_mb = 200 if args.quick else args.size_mb
    seconds = 15 if args.quick else args.pgbench_seconds
    logging.basicConfig(level=logging.ERROR)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(scratch())
        if args.store == "moto":
            server = stack.enter_context(moto_server())
            os.environ.update(server.env())
            uri, where = f"s3://{server.new_bucket('lakelet-bench')}/bench", "moto on 127.0.0.1"
        else:
            uri, where = f"{args.store.rstrip('/')}/bench-{int(time.time())}", args.store
        local = await open_lake(root / "local", None, pg, user, args.interval)
        bucket = await open_lake(root / "bucket", uri, pg, user, args.interval)
        try:
            sizes = [await fill(local, size_mb), await fill(bucket, size_mb)]
            creates = [await asyncio.to_thread(time_creates, local.store, "c", 20),
                       await asyncio.to_thread(time_creates, bucket.store, "c", 20)]
            start_local = await first_start(local, "c0")
            # The bucket store with an empty pack cache: every pack comes from the bucket.
            await close_lake(bucket)
            shutil.rmtree(root / "bucket" / "store" / "cache")
            bucket = await open_lake(root / "bucket", uri, pg, user, args.interval)
            start_bucket = await first_start(bucket, "c0")
            start_local_2 = await first_start(local, "c1")
            await close_lake(bucket)
            shutil.rmtree(root / "bucket" / "store" / "cache")
            bucket = await open_lake(root / "bucket", uri, pg, user, args.interval)
            start_bucket_2 = await first_start(bucket, "c1")
            await close_lake(bucket)
            shutil.rmtree(root / "bucket")
            t0 = time.perf_counter()
            bucket = await open_lake(root / "bucket", uri, pg, user, args.interval)
            restore_s = time.perf_counter() - t0
            fresh_main = await first_start(bucket, "main")
            upload = await wal_upload(bucket, pg, user, seconds)
            local_wal = sum(p.stat().st_size for p in (root / "bucket" / "store" / "wal").rglob("*") if p.is_file())
            remote = bucket.store.remote_wal
            bucket_wal = sum(size for size, _ in remote.all().values()) if remote is not None else 0
        finally:
            await close_lake(local)
            await close_lake(bucket)

    local_s, bucket_s = statistics.mean([start_local, start_local_2]), statistics.mean([start_bucket, start_bucket_2])
    print(f"database: {sizes[0] / MB:.0f} MB (local store), {sizes[1] / MB:.0f} MB (bucket store); "
          f"S3 = {where}; wal_upload_interval {args.interval}s")
    print(f"{'':44}{'local':>10}{'bucket':>10}{'ratio':>8}")
    lc, bc = statistics.median(creates[0]), statistics.median(creates[1])
    print(f"{'branch create, median of 20 (ms)':44}{lc:10.2f}{bc:10.2f}{bc / lc:8.2f}")
    print(f"{'first start of a new branch (s, mean of 2)':44}{local_s:10.2f}{bucket_s:10.2f}{bucket_s / local_s:8.2f}"
          f"   (runs: {start_local:.2f}/{start_local_2:.2f} vs {start_bucket:.2f}/{start_bucket_2:.2f})")
    print(f"fresh machine: working copy rebuilt from the bucket in {restore_s:.2f} s, then main's first start "
          f"{fresh_main:.2f} s")
    print(f"pgbench -c 4 for {upload['seconds']:.0f} s: Postgres wrote WAL at {upload['wal_mb_s']:.2f} MB/s; "
          f"uploaded {upload['sent_mb_s']:.2f} MB/s (partial segments re-sent as they grow); "
          f"backlog median {upload['backlog_median_mb']:.2f} MB, max {upload['backlog_max_mb']:.2f} MB; "
          f"oldest change not yet uploaded: median {upload['age_median_s']:.2f} s, max {upload['age_max_s']:.2f} s "
          f"(commits wait beyond {upload['hold_after']:.0f} s); drained {upload['drain_s']:.2f} s after the load "
          "stopped")
    print(f"WAL on local disk afterwards: {local_wal / MB:.1f} MB (the tail and image WAL copies); "
          f"finished segments in the bucket only: {bucket_wal / MB:.1f} MB")


if __name__ == "__main__":
    asyncio.run(main())
