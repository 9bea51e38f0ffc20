"""Wake latency: a suspended Lakelet branch → first query answered, against a bare ``pg_ctl start``
of a plain initdb'd cluster → first query, on the same machine.

    .venv/bin/python bench/wake.py [--quick] [--rounds N]

The Lakelet path includes everything a woken session waits for: the single-flight wake, reusing
(or materializing) the data dir, starting Postgres, the synchronous WAL receiver reaching
"streaming", and the first query. Goal: median ratio ≤ 1.3.
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
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user, run_async  # noqa: E402


async def first_query(socket_dir: str, port: int, user: str) -> None:
    conn = await asyncpg.connect(host=socket_dir, port=port, user=user, database="postgres")
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def bare_rounds(root: Path, pg: PgBinaries, user: ServiceUser, rounds: int) -> list[float]:
    datadir, sock = root / "bare", root / "bare-socket"
    sock.mkdir()
    user.own(sock, 0o700)
    user.own(root, 0o755)
    await run_async([pg["initdb"], "-D", str(datadir), "-U", "bench", "--auth=trust", "-E", "UTF8",
                     "--locale=C.UTF-8", "-N"], user)
    opts = f"-k {sock} -c listen_addresses='' -c port=5432"
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await run_async([pg["pg_ctl"], "start", "-w", "-D", str(datadir), "-l", str(root / "bare.log"),
                         "-o", opts], user)
        await first_query(str(sock), 5432, "bench")
        out.append(time.perf_counter() - t0)
        await run_async([pg["pg_ctl"], "stop", "-m", "fast", "-w", "-D", str(datadir)], user)
    return out


async def lakelet_rounds(root: Path, pg: PgBinaries, user: ServiceUser, rounds: int) -> list[float]:
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg, config=EndpointConfig())
    await eps.start()
    out = []
    try:
        await eps.ensure_ready("main")  # the first start materializes from the store: not a wake
        for _ in range(rounds):
            await eps.suspend("main")
            t0 = time.perf_counter()
            addr = await eps.ensure_ready("main")
            await first_query(addr.socket_dir, addr.port, "lakelet_admin")
            out.append(time.perf_counter() - t0)
    finally:
        await eps.close()
        store.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, help="wake rounds per side")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rounds = args.rounds or (5 if args.quick else 30)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-wake-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        bare = await bare_rounds(root, pg, user, rounds)
        lake = await lakelet_rounds(root, pg, user, rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wake → first query, {rounds} rounds each (milliseconds)")
    print(f"{'':28}{'median':>10}{'p99':>10}{'min':>10}")
    for name, xs in (("bare pg_ctl start", bare), ("lakelet ensure_ready", lake)):
        print(f"{name:28}{statistics.median(xs) * 1e3:10.1f}{pct(xs, 0.99) * 1e3:10.1f}{min(xs) * 1e3:10.1f}")
    ratio = statistics.median(lake) / statistics.median(bare)
    print(f"ratio lakelet/bare: median {ratio:.2f}, p99 {pct(lake, 0.99) / pct(bare, 0.99):.2f} (goal ≤ 1.3)")


if __name__ == "__main__":
    asyncio.run(main())
