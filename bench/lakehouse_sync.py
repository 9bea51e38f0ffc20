"""Lakehouse sync: lag from commit to visible in Delta, and throughput, each beside its floor.

    .venv/bin/python bench/lakehouse_sync.py [--quick] [--rows N] [--seconds S] [--rate TPS] [--rounds R]

1. **Lag** under a steady write load (``--rate`` transactions/s of 10 rows, for ``--seconds``):
   for every transaction, the time from COMMIT returning to the client until a Delta reader can
   see it (a new ``_delta_log`` commit whose stats cover its ids; the log is listed every 2 ms).
   Floor: the same commits arriving on a raw pgoutput replication stream of a second slot (read
   and discarded), i.e. what any logical-decoding consumer has to wait for.
2. **Throughput** on a ``--rows`` load (transactions of 10,000 rows) written while no one reads
   it, so every reader reads the same WAL from its own slot (all made before the load): the
   syncer (decode, convert, write Delta, confirm) from its first streaming moment until it has
   confirmed the end of the load, against the raw rate of the same stream read and discarded by
   psycopg2 (``read_message`` polled tightly, a ``select`` only when nothing is there). ``--rounds``
   pairs run alternately (raw first, then sync first, …) so a machine whose load drifts weighs on
   both sides alike; the ratio is of the medians. CPU seconds per row of each reader are printed
   too: what the reader itself costs, apart from how fast the walsender produces.

Goals (issue #13): lag p50 ≤ 1 s and p99 ≤ 2 s; ≥ 50k rows/s and ≥ 0.5× the raw decoding rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import psycopg2
import psycopg2.extras

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from lakehouse.syncer import SyncSpec, fmt_lsn, parse_lsn, slot_name  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ADMIN = "lakelet_admin"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Worker:
    def __init__(self, spec: SyncSpec) -> None:
        self.spec = spec
        state = Path(spec.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        spec.save(state / "spec.json")
        self.log = open(state / "worker.log", "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([sys.executable, "-m", "lakehouse.worker", str(state / "spec.json")],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, cwd=REPO)

    def status(self) -> dict:
        try:
            return json.loads((Path(self.spec.state_dir) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def drain(self, lsn: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"drain {lsn}\n".encode())
        self.proc.stdin.flush()

    def wait(self, predicate, timeout: float = 600) -> float:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: see {self.spec.state_dir}/worker.log")
            if predicate(self.status()):
                return time.perf_counter()
            time.sleep(0.005)
        raise TimeoutError("worker did not get there in time")

    def cpu(self) -> float:
        """CPU seconds the worker process has used so far (every thread)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


class RawStream:
    """The floor: a pgoutput stream from its own slot, read and discarded (psycopg2, in a thread)."""

    def __init__(self, dsn: dict, slot: str, publication: str) -> None:
        self.conn = psycopg2.connect(connection_factory=psycopg2.extras.LogicalReplicationConnection, **dsn)
        self.cur = self.conn.cursor()
        self.slot, self.publication = slot, publication
        self.cur.create_replication_slot(slot, output_plugin="pgoutput")
        self.commit_times: list[float] = []
        self.messages = 0
        self.stop_at: int | None = None
        self.done = threading.Event()
        self.cpu = 0.0

    def run(self) -> None:
        import select

        cpu = time.thread_time()
        self.cur.start_replication(slot_name=self.slot, decode=False,
                                   options={"proto_version": "1", "publication_names": self.publication})
        while not self.done.is_set():
            msg = self.cur.read_message()
            if msg is None:
                if self.stop_at is not None and (self.cur.wal_end or 0) >= self.stop_at:
                    break
                select.select([self.cur], [], [], 0.01)
                continue
            self.messages += 1
            if msg.payload[:1] == b"C":
                self.commit_times.append(time.perf_counter())
                self.cur.send_feedback(flush_lsn=msg.data_start)
                if self.stop_at is not None and msg.data_start >= self.stop_at:
                    break
        self.cpu = time.thread_time() - cpu
        self.done.set()

    def close(self) -> None:
        self.done.set()
        self.conn.close()


def delta_visible(log_dir: Path, seen: set[str]) -> int:
    """The greatest ``id`` in Delta commits not seen before (from the add actions' stats)."""
    top = -1
    for name in sorted(os.listdir(log_dir)) if log_dir.is_dir() else []:
        if not name.endswith(".json") or name in seen:
            continue
        seen.add(name)
        for line in (log_dir / name).read_text().splitlines():
            add = json.loads(line).get("add")
            if add and add.get("stats"):
                top = max(top, int(json.loads(add["stats"])["maxValues"].get("id", -1)))
    return top


async def lag_run(conn: asyncpg.Connection, spec: SyncSpec, raw: RawStream, seconds: float, rate: float) -> tuple:
    log_dir = Path(spec.base_uri) / "lb_events_history" / "_delta_log"
    visible_at: dict[int, float] = {}
    stop = threading.Event()

    def poll() -> None:
        seen: set[str] = set()
        top = -1
        while not stop.is_set():
            new = delta_visible(log_dir, seen)
            now = time.perf_counter()
            for i in range(top + 1, new + 1):
                visible_at.setdefault(i, now)
            top = max(top, new)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    reader = threading.Thread(target=raw.run, daemon=True)
    reader.start()
    committed: list[float] = []
    n = int(seconds * rate)
    start = time.perf_counter()
    for t in range(n):
        await conn.execute("INSERT INTO bench.events SELECT $1::int * 10 + g, 'e' FROM generate_series(0, 9) g", t)
        committed.append(time.perf_counter())
        delay = start + (t + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    deadline = time.monotonic() + 60
    while len(visible_at) < n * 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    raw.close()
    sync_lag = [visible_at[t * 10 + 9] - committed[t] for t in range(n) if t * 10 + 9 in visible_at]
    raw_lag = [r - c for r, c in zip(raw.commit_times, committed, strict=False)]
    return sync_lag, raw_lag, n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--rows", type=int, help="rows in the throughput load (default 1,000,000)")
    ap.add_argument("--seconds", type=float, help="length of the lag run (default 30)")
    ap.add_argument("--rate", type=float, default=50.0, help="transactions per second in the lag run")
    ap.add_argument("--rounds", type=int, help="alternating raw/sync throughput pairs (default 3)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-lakehouse-", dir="/tmp"))
    os.chmod(root, 0o755)
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg,
                    config=EndpointConfig(suspend_timeout=3600), cgroups=False)
    await eps.start()
    eps.require_logical("main")
    try:
        addr = await eps.ensure_ready("main")
        conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN, database="postgres")
        await conn.execute("CREATE SCHEMA bench; CREATE TABLE bench.events (id int PRIMARY KEY, v text)")
        dsn = {"host": addr.socket_dir, "port": addr.port, "user": ADMIN, "dbname": "postgres"}
        spec = SyncSpec(branch="main", database="postgres", schema="bench", tables=None,
                        lakehouse_uri=str(root / "lakehouse"), slot=slot_name(1, "postgres", "bench"),
                        host=addr.socket_dir, port=addr.port, user=ADMIN, state_dir=str(root / "sync"))
        worker = Worker(spec)
        worker.wait(lambda s: s.get("state") == "streaming")
        await conn.execute("CREATE PUBLICATION bench_raw FOR TABLES IN SCHEMA bench")

        # 1. lag
        raw = RawStream(dsn, "bench_raw_lag", "bench_raw")
        sync_lag, raw_lag, n = await lag_run(conn, spec, raw, seconds, args.rate)
        print(f"lag, commit → visible, {n} transactions of 10 rows at {args.rate:.0f}/s (milliseconds)")
        print(f"{'':34}{'p50':>9}{'p99':>9}{'max':>9}")
        for name, xs in (("raw pgoutput stream (floor)", raw_lag), ("lakehouse sync → Delta", sync_lag)):
            print(f"{name:34}{pct(xs, .5) * 1e3:9.1f}{pct(xs, .99) * 1e3:9.1f}{max(xs) * 1e3:9.1f}")
        print(f"goal: p50 ≤ 1000, p99 ≤ 2000; measured {len(sync_lag)}/{n} transactions")

        # 2. throughput: the same WAL, read by `rounds` syncers and `rounds` raw streams, alternately.
        target = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        worker.drain(target)
        worker.wait(lambda s: s.get("drained_lsn") and parse_lsn(s["drained_lsn"]) >= parse_lsn(target))
        worker.stop()
        await conn.execute("CREATE TABLE bench.load (id int PRIMARY KEY, a int, b text, c timestamptz)")
        specs = []
        for r in range(args.rounds):  # each its own slot, publication and history, at the load's start
            spec_r = SyncSpec(branch="main", database="postgres", schema="bench", tables=["load"],
                              lakehouse_uri=str(root / f"lakehouse-{r}"), slot=slot_name(100 + r, "postgres", "bench"),
                              host=addr.socket_dir, port=addr.port, user=ADMIN, state_dir=str(root / f"sync-{r}"))
            w = Worker(spec_r)
            w.wait(lambda s: s.get("state") == "streaming")
            w.stop()
            specs.append(spec_r)
        raws = [RawStream(dsn, f"bench_raw_load_{r}", "bench_raw") for r in range(args.rounds)]
        batch = 10_000
        t0 = time.perf_counter()
        for start in range(0, rows, batch):
            await conn.execute("INSERT INTO bench.load SELECT g, g % 1000, 'row ' || g, now() "
                               "FROM generate_series($1::int, $2::int) g", start, min(rows, start + batch) - 1)
        load_s = time.perf_counter() - t0
        end = parse_lsn(str(await conn.fetchval("SELECT pg_current_wal_lsn()::text")))

        def raw_run(r: int) -> tuple[float, float]:
            raw = raws[r]
            raw.stop_at = end
            t0 = time.perf_counter()
            raw.run()
            took = time.perf_counter() - t0
            raw.close()
            return took, raw.cpu

        def sync_run(r: int) -> tuple[float, float]:
            worker = Worker(specs[r])
            t_stream = worker.wait(lambda s: s.get("state") == "streaming")
            cpu = worker.cpu()
            worker.drain(fmt_lsn(end))
            t_done = worker.wait(lambda s: s.get("drained_lsn") and parse_lsn(s["drained_lsn"]) >= end)
            cpu = worker.cpu() - cpu
            synced = worker.status()["tables"]["load"]["rows"]
            worker.stop()
            assert synced == rows, f"synced {synced} rows, loaded {rows}"
            return t_done - t_stream, cpu

        raw_t: list[tuple[float, float]] = []
        sync_t: list[tuple[float, float]] = []
        print(f"\nthroughput, {rows:,} rows in {rows // batch} transactions (loaded by Postgres in {load_s:.1f} s), "
              f"{args.rounds} rounds")
        print(f"{'round':8}{'raw rows/s':>14}{'sync rows/s':>14}{'ratio':>8}"
              f"{'raw cpu µs/row':>17}{'sync cpu µs/row':>17}")
        for r in range(args.rounds):
            if r % 2 == 0:
                raw_t.append(raw_run(r))
                sync_t.append(sync_run(r))
            else:
                sync_t.append(sync_run(r))
                raw_t.append(raw_run(r))
            (rs, rc), (ss, sc) = raw_t[-1], sync_t[-1]
            print(f"{r + 1:<8}{rows / rs:14,.0f}{rows / ss:14,.0f}{rs / ss:8.2f}{rc / rows * 1e6:17.2f}"
                  f"{sc / rows * 1e6:17.2f}")
        raw_s = pct([t for t, _ in raw_t], 0.5)
        sync_s = pct([t for t, _ in sync_t], 0.5)
        print(f"{'raw pgoutput stream (floor)':34}{rows / raw_s:12,.0f} rows/s  (median of {args.rounds})")
        print(f"{'lakehouse sync → Delta':34}{rows / sync_s:12,.0f} rows/s  (median of {args.rounds})")
        print(f"ratio sync/raw: {raw_s / sync_s:.2f} (goal ≥ 0.5); goal ≥ 50,000 rows/s")
        await conn.close()
    finally:
        await eps.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
