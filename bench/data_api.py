"""Data API throughput and latency against its floor: the same SQL sent straight through asyncpg.

    .venv/bin/python bench/data_api.py [--seconds S] [--clients N] [--rounds R]

A real ``lakelet up`` (its own process, with ``--data-api``) serves a branch holding 100 categories
× 100 items. Two workloads, each run by N concurrent clients for S seconds:

- ``single``: ``GET /items?id=eq.<random>`` — one row by primary key;
- ``embedded``: ``GET /categories?select=id,name,items(id,name,price)&id=eq.<random>`` — a 100-row
  embedded read.

The floor runs, from the same client process and with the same concurrency, the exact statement the
Data API builds for each request (taken from its planner), through an asyncpg pool connected to
the compute's Unix socket: what Postgres alone costs, with no HTTP, no JSON parsing, no
transaction, no role switch. Rounds alternate Data API / floor so machine noise hits both. Printed:
requests/s, p50 and p99 latency, and the ratios. Goals (issue #15): single ≥ 0.5× its floor with
p99 ≤ 10 ms; embedded ≥ 0.5× its floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataapi import schema as schema_cache  # noqa: E402
from dataapi.query import Builder, ReadShape, qualified  # noqa: E402
from dataapi.request import parse_query  # noqa: E402
from lakelet.client import ControlClient, wait_healthy  # noqa: E402

CATEGORIES = 100
ITEMS_PER_CATEGORY = 100

SETUP_SQL = f"""
CREATE ROLE bench_anon NOLOGIN;
CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE items (id int PRIMARY KEY, category_id int NOT NULL REFERENCES categories(id), name text NOT NULL,
                    price numeric(10, 2) NOT NULL);
CREATE INDEX ON items (category_id);
INSERT INTO categories SELECT n, 'category ' || n FROM generate_series(1, {CATEGORIES}) n;
INSERT INTO items SELECT n, 1 + (n - 1) / {ITEMS_PER_CATEGORY}, 'item ' || n, (n % 1000) / 10.0
  FROM generate_series(1, {CATEGORIES * ITEMS_PER_CATEGORY}) n;
GRANT USAGE ON SCHEMA public TO bench_anon;
GRANT SELECT ON categories, items TO bench_anon;
ANALYZE;
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(clients: int, seconds: float, one: Callable[[int], Awaitable[None]]) -> tuple[float, list[float]]:
    """N workers issue requests back to back for ``seconds``; returns (requests/s, latencies)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.perf_counter() < stop_at:
            key = rnd.randint(1, CATEGORIES * ITEMS_PER_CATEGORY)
            t0 = time.perf_counter()
            await one(key)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return len(latencies) / (time.perf_counter() - started), latencies


class Workload:
    def __init__(self, name: str, path: Callable[[int], str], sql: str, params: Callable[[int], list]) -> None:
        self.name = name
        self.path = path
        self.sql = sql
        self.params = params


async def planned_sql(conn: asyncpg.Connection, table: str, query: list[tuple[str, str]]) -> tuple[str, list]:
    cache = await schema_cache.load(conn, ("public",))
    q = parse_query(query)
    info = cache.table("public", table)
    st = Builder(cache, q).read(ReadShape(info, qualified("public", table), None, 0), q.select)
    return st.sql, st.params


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-dataapi-", dir="/tmp"))
    os.chmod(root, 0o755)
    data_dir = root / "data"
    pg_port, http_port, api_port = free_port(), free_port(), free_port()
    env = {**os.environ, "LAKELET_DATA_API_ANON_ROLE": "bench_anon", "LAKELET_DATA_API_POOL_SIZE": str(args.clients),
           "LAKELET_LOG_LEVEL": "warning"}
    log = open(root / "up.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{pg_port}",
         "--http", f"127.0.0.1:{http_port}", "--data-api", f"127.0.0.1:{api_port}", "--suspend-timeout", "3600"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        if not wait_healthy(http_port, lambda: proc.poll() is None, 180):
            raise SystemExit(f"lakelet up did not start; see {root / 'up.log'}")
        client = ControlClient(data_dir)
        # Waking the branch: the control API's status shows the compute's socket once it runs.
        urllib.request.urlopen(f"http://127.0.0.1:{api_port}/main/postgres/rest/v1/", timeout=120).read()
        main = next(e for e in client.call("GET", "/api/v1/endpoints")["endpoints"] if e["branch"] == "main")
        conn = await asyncpg.connect(host=main["host"], port=main["port"], user="lakelet_admin", database="postgres")
        await conn.execute(SETUP_SQL)
        await conn.execute("NOTIFY pgrst, 'reload schema'")
        single_sql, _ = await planned_sql(conn, "items", [("id", "eq.1")])
        embedded_sql, _ = await planned_sql(conn, "categories", [("select", "id,name,items(id,name,price)"),
                                                                 ("id", "eq.1")])
        await conn.close()
        workloads = [
            Workload("single row by key", lambda k: f"items?id=eq.{k}", single_sql, lambda k: [str(k)]),
            Workload("100-row embedded read", lambda k: f"categories?select=id,name,items(id,name,price)"
                                                        f"&id=eq.{1 + k % CATEGORIES}",
                     embedded_sql, lambda k: [str(1 + k % CATEGORIES)]),
        ]
        base = f"http://127.0.0.1:{api_port}/main/postgres/rest/v1/"
        connector = aiohttp.TCPConnector(limit=args.clients)
        pool = await asyncpg.create_pool(host=main["host"], port=main["port"], user="lakelet_admin",
                                         database="postgres", min_size=args.clients, max_size=args.clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.sleep(1.0)  # the schema reload after the setup
            for w in workloads:
                async def via_api(key: int, w: Workload = w) -> None:
                    async with session.get(base + w.path(key)) as r:
                        body = await r.read()
                        if r.status != 200 or not body.startswith(b"["):
                            raise SystemExit(f"{w.name}: HTTP {r.status}: {body[:200]!r}")

                async def via_asyncpg(key: int, w: Workload = w) -> None:
                    await pool.fetchrow(w.sql, *w.params(key))

                await drive(args.clients, 1.0, via_api)  # warm both paths
                await drive(args.clients, 1.0, via_asyncpg)
                api_runs, floor_runs = [], []
                for _ in range(args.rounds):
                    api_runs.append(await drive(args.clients, args.seconds, via_api))
                    floor_runs.append(await drive(args.clients, args.seconds, via_asyncpg))
                report(w.name, api_runs, floor_runs, args)
        await pool.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)


def report(name: str, api_runs: list, floor_runs: list, args: argparse.Namespace) -> None:
    api_rate = statistics.median(r for r, _ in api_runs)
    floor_rate = statistics.median(r for r, _ in floor_runs)
    api_lat = [x for _, lat in api_runs for x in lat]
    floor_lat = [x for _, lat in floor_runs for x in lat]
    print(json.dumps({
        "workload": name, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
        "data_api_rps": round(api_rate), "asyncpg_rps": round(floor_rate),
        "ratio_rps": round(api_rate / floor_rate, 3),
        "data_api_p50_ms": round(pct(api_lat, 0.50) * 1000, 2), "data_api_p99_ms": round(pct(api_lat, 0.99) * 1000, 2),
        "asyncpg_p50_ms": round(pct(floor_lat, 0.50) * 1000, 2),
        "asyncpg_p99_ms": round(pct(floor_lat, 0.99) * 1000, 2),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and log")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
