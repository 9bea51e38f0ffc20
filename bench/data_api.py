"""Data API throughput and latency against its floor: the same SQL sent straight through asyncpg.

    .venv/bin/python bench/data_api.py [--seconds S] [--clients N] [--rounds R] [--client wrk|aiohttp]
                                       [--pool P] [--workers W] [--only single|100-row] [--quick]

A real ``lakelet up`` (its own process, with ``--data-api`` and its Data API worker processes,
``--data-api-workers``, one per CPU unless ``--workers`` says otherwise) serves a branch holding
100 categories × 100 items. Two workloads, each run by N concurrent clients for S seconds:

- ``single``: ``GET /items?id=eq.<random>`` — one row by primary key;
- ``embedded``: ``GET /categories?select=id,name,items(id,name,price)&id=eq.<random>`` — a 100-row
  embedded read.

The HTTP load comes from wrk when it is installed (``scripts/setup.sh --bench``), else from aiohttp
in this process. The floor runs, with the same concurrency, the exact statement the Data API builds
for each request (taken from its planner) through an asyncpg pool connected to the compute's Unix
socket: what Postgres alone costs, with no HTTP, no transaction, no role switch. Rounds alternate
Data API / floor so machine noise hits both. Printed: the worker count, requests/s, p50 and p99
latency, the ratios, the CPU the lakelet process and its Data API workers spent per request (and
the workers' share), the CPU the compute's Postgres processes spent per request on each side, and
the floor client's own CPU per query, and the HTTP client's (wrk's) per request. Goals (issue
#15): single ≥ 0.5× its floor with p99 ≤ 10 ms; embedded ≥ 0.5× its floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children: the computes are lakelet's children)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the computes' postgres processes, whatever their session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def data_api_workers(pid: int) -> list[int]:
    """``lakelet up``'s Data API worker processes."""
    out = []
    for p in descendants(pid):
        try:
            if b"dataapi.worker" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            pass
    return out


def workers_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in data_api_workers(pid))


def tree_cpu(pid: int) -> float:
    """CPU seconds of every process below ``pid`` but the Data API workers: the computes'
    Postgres processes (exited ones are not counted: the computes' backends outlive a round,
    since both pools keep their connections)."""
    total = 0.0
    workers = set(data_api_workers(pid))
    for p in descendants(pid):
        if p in workers:
            continue
        try:
            total += cpu_seconds(p)
        except (OSError, ValueError, IndexError):
            pass
    return total


def client_cpu() -> float:
    """CPU seconds of the HTTP client: wrk (a finished child of this process) and this process
    (the aiohttp client, when wrk is not used)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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


WRK_SCRIPT = """
local keys = %d
local path = "%s"
math.randomseed(%d)
request = function()
  return wrk.format("GET", string.format(path, math.random(1, keys)))
end
"""


def run_wrk(base: str, path_format: str, keys: int, clients: int, seconds: float, root: Path,
            seed: int) -> tuple[float, float, float]:
    """wrk (C, epoll) as the HTTP load generator: the client costs far less CPU than a Python one,
    which matters on a small machine where client, server and Postgres share the cores."""
    script = root / "wrk.lua"
    script.write_text(WRK_SCRIPT % (keys, path_format, seed))
    cmd = ["wrk", "-t2", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), base]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def latency(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]

    if re.search(r"Non-2xx or 3xx responses", out):
        raise SystemExit(f"wrk saw errors:\n{out}")
    return rps, latency("50"), latency("99")


class Workload:
    def __init__(self, name: str, path: Callable[[int], str], sql: str, params: Callable[[int], list],
                 wrk_path: str, wrk_keys: int) -> None:
        self.name = name
        self.path = path
        self.wrk_path = wrk_path
        self.wrk_keys = wrk_keys
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
    # Each worker has its own pool: together they hold as many connections as the floor's pool.
    per_worker = max(1, -(-args.pool // args.workers))
    env = {**os.environ, "LAKELET_DATA_API_ANON_ROLE": "bench_anon", "LAKELET_DATA_API_POOL_SIZE": str(per_worker),
           "LAKELET_LOG_LEVEL": "warning", "LAKELET_DATA_API_WORKERS": str(args.workers)}
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
            Workload("single row by key", lambda k: f"items?id=eq.{k}", single_sql, lambda k: [str(k)],
                     "/main/postgres/rest/v1/items?id=eq.%d", CATEGORIES * ITEMS_PER_CATEGORY),
            Workload("100-row embedded read", lambda k: f"categories?select=id,name,items(id,name,price)"
                                                        f"&id=eq.{1 + k % CATEGORIES}",
                     embedded_sql, lambda k: [str(1 + k % CATEGORIES)],
                     "/main/postgres/rest/v1/categories?select=id,name,items(id,name,price)&id=eq.%d", CATEGORIES),
        ]
        base = f"http://127.0.0.1:{api_port}/main/postgres/rest/v1/"
        use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk") is not None)
        connector = aiohttp.TCPConnector(limit=args.clients)
        pool = await asyncpg.create_pool(host=main["host"], port=main["port"], user="lakelet_admin",
                                         database="postgres", min_size=args.clients, max_size=args.clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.sleep(1.0)  # the schema reload after the setup
            for w in workloads:
                if args.only and not w.name.startswith(args.only):
                    continue

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
                for n in range(args.rounds):
                    workers_before = workers_cpu(proc.pid)
                    cpu_before, pg_before = cpu_seconds(proc.pid) + workers_before, tree_cpu(proc.pid)
                    client_before = client_cpu()
                    if use_wrk:
                        rps, p50, p99 = await asyncio.to_thread(
                            run_wrk, f"http://127.0.0.1:{api_port}", w.wrk_path, w.wrk_keys, args.clients,
                            args.seconds, root, n + 1)
                        done = rps * args.seconds
                    else:
                        rps, lat = await drive(args.clients, args.seconds, via_api)
                        p50, p99, done = pct(lat, 0.5), pct(lat, 0.99), len(lat)
                    workers_after = workers_cpu(proc.pid)
                    api_runs.append((rps, p50, p99, (cpu_seconds(proc.pid) + workers_after - cpu_before) / done,
                                     (tree_cpu(proc.pid) - pg_before) / done,
                                     (workers_after - workers_before) / done,
                                     (client_cpu() - client_before) / done))
                    me_before, pg_before = cpu_seconds(os.getpid()), tree_cpu(proc.pid)
                    rate, lat = await drive(args.clients, args.seconds, via_asyncpg)
                    floor_runs.append((rate, pct(lat, 0.5), pct(lat, 0.99), (cpu_seconds(os.getpid()) - me_before)
                                       / len(lat), (tree_cpu(proc.pid) - pg_before) / len(lat)))
                report(w.name, api_runs, floor_runs, args, "wrk" if use_wrk else "aiohttp")
        await pool.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(name: str, api_runs: list, floor_runs: list, args: argparse.Namespace, client: str) -> None:
    """Medians over the rounds of each run's requests/s, p50 and p99."""
    def med(runs: list, i: int) -> float:
        return statistics.median(r[i] for r in runs)

    print(json.dumps({
        "workload": name, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
        "http_client": client, "data_api_workers": args.workers, "data_api_rps": round(med(api_runs, 0)),
        "asyncpg_rps": round(med(floor_runs, 0)),
        "ratio_rps": round(med(api_runs, 0) / med(floor_runs, 0), 3),
        "data_api_p50_ms": round(med(api_runs, 1) * 1000, 2), "data_api_p99_ms": round(med(api_runs, 2) * 1000, 2),
        "asyncpg_p50_ms": round(med(floor_runs, 1) * 1000, 2), "asyncpg_p99_ms": round(med(floor_runs, 2) * 1000, 2),
        "data_api_cpu_us_per_request": round(med(api_runs, 3) * 1e6),
        "data_api_workers_cpu_us_per_request": round(med(api_runs, 5) * 1e6),
        "data_api_postgres_cpu_us_per_request": round(med(api_runs, 4) * 1e6),
        "http_client_cpu_us_per_request": round(med(api_runs, 6) * 1e6),
        "asyncpg_client_cpu_us_per_request": round(med(floor_runs, 3) * 1e6),
        "asyncpg_postgres_cpu_us_per_request": round(med(floor_runs, 4) * 1e6),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and log")
    parser.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto",
                        help="HTTP load generator (auto: wrk when installed, else aiohttp in this process)")
    parser.add_argument("--pool", type=int, default=None,
                        help="the Data API's connections per branch (data_api_pool_size; default: --clients, "
                             "as many as the floor's pool)")
    parser.add_argument("--workers", type=int, default=None,
                        help="Data API worker processes (data_api_workers; default: one per CPU)")
    parser.add_argument("--only", choices=["single", "100-row"], default=None, help="run one workload")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s (make bench)")
    args = parser.parse_args()
    args.pool = args.pool or args.clients
    args.workers = args.workers or len(os.sched_getaffinity(0))
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
