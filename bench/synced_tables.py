"""Synced tables: snapshot load rate and memory, and continuous lag, against honest floors.

    .venv/bin/python bench/synced_tables.py [--quick] [--rows N] [--commits N]

Snapshot: a Delta table of N rows (default 5M, ``--quick`` 300k) loaded by ``sync_once`` into a
fresh table, primary key built and swapped in — side by side with the floor, the same rows as a
CSV file loaded by ``psql \\copy`` into a plain table (no index), on the same compute. Also shown:
asyncpg's binary ``copy_records_to_table`` fed from the same Arrow batches (the binary COPY path
this room does not use, measured so the choice stays honest) and the floor plus a primary key.
Peak memory is the loading process's peak RSS above its baseline (a fresh process per load), for
the table and for a table a tenth its size: bounded means the two are alike.

Continuous: a Delta table receiving a steady stream of small MERGE commits (2 per second), synced
continuously; lag is from the moment ``merge().execute()`` returned (the Delta commit) to the
moment the version is visible in Postgres, polled every 2 ms. Goals: snapshot ≥ 0.7× the floor,
memory independent of size; lag p50 ≤ 1 s, p99 ≤ 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltalake import DeltaTable, write_deltalake  # noqa: E402

from compute import ComputeAddress, EndpointConfig, Endpoints  # noqa: E402
from lakehouse.synced import source as src  # noqa: E402
from lakehouse.synced.applier import sync_once  # noqa: E402
from lakehouse.synced.compute import BranchComputes  # noqa: E402
from lakehouse.synced.service import SyncedTables  # noqa: E402
from lakehouse.synced.spec import SyncedTableSpec  # noqa: E402
from storage import ADMIN_ROLE, Store  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402

CHUNK = 250_000
CDF = {"delta.enableChangeDataFeed": "true"}


def rows(start: int, n: int) -> pa.Table:
    ids = pa.array(range(start, start + n), pa.int64())
    return pa.table({
        "id": ids,
        "name": pc.binary_join_element_wise("item-", pc.cast(ids, pa.string()), ""),
        "price": pc.multiply(pc.cast(ids, pa.float64()), 0.01),
        "qty": pc.cast(pc.bit_wise_and(ids, 1023), pa.int32()),
        "updated": pc.cast(pc.add(pc.multiply(ids, 1000), 1_700_000_000_000_000), pa.timestamp("us", tz="UTC")),
        "category": pc.cast(pc.bit_wise_and(ids, 15), pa.string()),
    })


def make_delta(uri: Path, n: int) -> None:
    for start in range(0, n, CHUNK):
        write_deltalake(str(uri), rows(start, min(CHUNK, n - start)), mode="append",
                        configuration=CDF if start == 0 else None)


def make_csv(uri: Path, path: Path) -> None:
    with open(path, "wb") as f:
        for batch in src.snapshot_batches(DeltaTable(str(uri)), rows(0, 1).column_names):
            pcsv.write_csv(batch, f, pcsv.WriteOptions(include_header=False))


async def admin(addr: ComputeAddress) -> asyncpg.Connection:
    return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN_ROLE, database="postgres")


async def floor_copy(addr: ComputeAddress, csv: Path, psql: str, with_key: bool) -> float:
    conn = await admin(addr)
    try:
        await conn.execute("DROP TABLE IF EXISTS floor; CREATE TABLE floor (id bigint, name text, price double "
                           "precision, qty integer, updated timestamptz, category text)")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        psql, "-h", addr.socket_dir, "-p", str(addr.port), "-U", ADMIN_ROLE, "-d", "postgres", "-q",
        "-v", "ON_ERROR_STOP=1", "-c", f"\\copy floor FROM '{csv}' WITH (FORMAT csv)",
        *(["-c", "ALTER TABLE floor ADD PRIMARY KEY (id)"] if with_key else []))
    assert await proc.wait() == 0
    return time.perf_counter() - t0


class PeakRSS:
    """Samples this process's resident set every 5 ms in a thread (the high-water mark the kernel
    keeps would include import-time peaks, not the load's)."""

    def __init__(self) -> None:
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def child_snapshot(socket_dir: str, port: int, uri: str, target: str) -> None:
    """In a fresh process, so its peak resident set is the load's own: printed as JSON."""
    spec = SyncedTableSpec.make(source=uri, branch="main", target=target, primary_key="id", mode="snapshot")
    conn = await asyncpg.connect(host=socket_dir, port=port, user=ADMIN_ROLE, database="postgres")
    try:
        await conn.execute("CHECKPOINT")
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = await sync_once(conn, spec, full=True)
            took = time.perf_counter() - t0
    finally:
        await conn.close()
    print(json.dumps({"took": took, "rows": result.rows, "base": mem.base, "peak": mem.peak}))


async def ours(addr: ComputeAddress, uri: Path, target: str) -> tuple[float, int, int]:
    """Seconds, rows loaded, and peak RSS growth of a snapshot run in a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child-snapshot", addr.socket_dir, str(addr.port), str(uri), target,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    r = json.loads(out.decode().strip().splitlines()[-1])
    return r["took"], r["rows"], r["peak"] - r["base"]


async def binary_records(addr: ComputeAddress, uri: Path) -> float:
    conn = await admin(addr)
    try:
        await conn.execute("DROP TABLE IF EXISTS bin; CREATE TABLE bin (id bigint, name text, price double "
                           "precision, qty integer, updated timestamptz, category text)")
        await conn.execute("CHECKPOINT")
        columns = rows(0, 1).column_names
        batches = src.Prefetch(iter(src.snapshot_batches(DeltaTable(str(uri)), columns)))

        async def records():  # noqa: ANN202
            while (batch := await asyncio.to_thread(batches.get)) is not None:
                for r in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                    yield r

        t0 = time.perf_counter()
        await conn.copy_records_to_table("bin", records=records(), columns=columns)
        batches.close()
        return time.perf_counter() - t0
    finally:
        await conn.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def continuous_lag(eps: Endpoints, root: Path, commits: int) -> list[float]:
    uri = root / "stream"
    write_deltalake(str(uri), rows(0, 1000), configuration=CDF)
    service = SyncedTables(BranchComputes(eps), root / "synced.json")
    await service.start()
    spec = SyncedTableSpec.make(source=str(uri), branch="main", target="stream", primary_key="id",
                                mode="continuous")
    await service.create(spec)
    committed: dict[int, float] = {}
    visible: dict[int, float] = {}
    done = asyncio.Event()

    def writer() -> None:
        for i in range(commits):
            batch = rows(900 + i * 50, 100)  # half updates, half inserts
            dt = DeltaTable(str(uri))
            dt.merge(batch, predicate="t.id = s.id", source_alias="s", target_alias="t") \
              .when_matched_update_all().when_not_matched_insert_all().execute()
            at = time.perf_counter()
            committed[dt.version()] = at
            time.sleep(0.5)

    async def watch() -> None:
        conn = await admin(await eps.ensure_ready("main"))
        try:
            seen = 0
            while not done.is_set():
                v = await conn.fetchval("SELECT version FROM lakelet_synced.applied WHERE target = 'public.stream'")
                now = time.perf_counter()
                for version in range(seen + 1, v + 1):
                    visible[version] = now
                seen = max(seen, v)
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    await asyncio.to_thread(writer)
    last = max(committed)
    deadline = time.monotonic() + 30
    while last not in visible and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    done.set()
    await watcher
    await service.close()
    return [visible[v] - t for v, t in committed.items() if v in visible]


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    pg, user = find_binaries(), resolve_service_user(None)
    psql = str(Path(pg["initdb"]).with_name("psql"))
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-synced-", dir="/tmp"))
    root.chmod(0o755)
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg, config=EndpointConfig(
        suspend_timeout=3600, min_cu=args.cu, max_cu=args.cu))
    await eps.start()
    try:
        addr = await eps.ensure_ready("main")
        n = args.rows
        small = max(n // 10, 10_000)
        print(f"writing Delta tables of {n:,} and {small:,} rows ...", flush=True)
        await asyncio.to_thread(make_delta, root / "big", n)
        await asyncio.to_thread(make_delta, root / "small", small)
        csv = root / "big.csv"
        await asyncio.to_thread(make_csv, root / "big", csv)

        # Interleaved rounds, medians: the machine is shared and noisy.
        floors, floor_keys, tooks, mems = [], [], [], []
        for _ in range(args.rounds):
            floors.append(await floor_copy(addr, csv, psql, with_key=False))
            floor_keys.append(await floor_copy(addr, csv, psql, with_key=True))
            took, loaded, mem = await ours(addr, root / "big", "big")
            assert loaded == n
            tooks.append(took)
            mems.append(mem)
        floor, floor_key, took = map(statistics.median, (floors, floor_keys, tooks))
        mem = max(mems)
        small_took, _, small_mem = await ours(addr, root / "small", "small")
        binary = await binary_records(addr, root / "big") if not args.skip_binary else None

        print(f"\nsnapshot of {n:,} rows ({csv.stat().st_size / 2**20:.0f} MiB as CSV), 1 compute of {args.cu} CU, "
              f"median of {args.rounds}")
        print(f"  floor: psql \\copy CSV, no index      {n / floor:>12,.0f} rows/s  ({floor:.2f} s)")
        print(f"  floor + ADD PRIMARY KEY               {n / floor_key:>12,.0f} rows/s  ({floor_key:.2f} s)")
        print(f"  lakelet snapshot (CSV from Arrow, key) {n / took:>11,.0f} rows/s  ({took:.2f} s)  "
              f"= {floor / took:.2f}x floor, {floor_key / took:.2f}x floor+key")
        if binary is not None:
            print(f"  asyncpg binary COPY from Arrow rows   {n / binary:>12,.0f} rows/s  ({binary:.2f} s)  "
                  f"= {floor / binary:.2f}x floor (no key)")
        print(f"  peak memory above baseline: {mem / 2**20:.0f} MiB for {n:,} rows, "
              f"{small_mem / 2**20:.0f} MiB for {small:,} rows ({small / small_took:,.0f} rows/s)")

        lags = await continuous_lag(eps, root, args.commits)
        print(f"\ncontinuous: {len(lags)} MERGE commits of 100 rows, 2 per second")
        print(f"  commit → visible: p50 {statistics.median(lags) * 1000:.0f} ms, p99 {pct(lags, 0.99) * 1000:.0f} ms, "
              f"max {max(lags) * 1000:.0f} ms  (goal p50 ≤ 1000 ms, p99 ≤ 2000 ms; poll every 500 ms)")
    finally:
        await eps.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300k rows, 20 commits")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--cu", type=float, default=2.0, help="compute size for the run (fixed)")
    parser.add_argument("--rounds", type=int, default=3, help="snapshot rounds (medians are printed)")
    parser.add_argument("--skip-binary", action="store_true", help="skip the binary COPY comparison")
    parser.add_argument("--child-snapshot", nargs=4, metavar=("SOCKET_DIR", "PORT", "URI", "TARGET"),
                        help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child_snapshot:
        socket_dir, port, uri, target = a.child_snapshot
        asyncio.run(child_snapshot(socket_dir, int(port), uri, target))
        sys.exit(0)
    if a.quick:
        a.rows, a.commits = 300_000, 20
    asyncio.run(main(a))
