"""Cold start: a suspended Lakelet branch → a client's first row through the proxy, against a bare
``postgres`` started directly and polled every 2 ms, on the same machine, in alternating rounds.

    .venv/bin/python bench/wake.py [--quick] [--rounds N]

The floor is the plain thing done directly and polled tightly: ``postgres -D`` on a fresh initdb'd
data dir, started as the service user, and ``SELECT 1`` tried over its Unix socket every 2 ms until
it answers (``pg_ctl start -w`` polls only every 100 ms, which would flatter us). Lakelet is timed
as a user sees it: a real client (asyncpg) connects to the proxy over TCP, authenticates with
SCRAM, which wakes the suspended compute, and runs ``SELECT 1``. The wake's time is split into its
steps (from the compute's own timings): materialize (the data dir from the store), config,
postmaster ready (spawn → accepting connections), catalog (recording the run), WAL receiver (its
slot when missing, and the spawn: commits wait for it to stream, sessions do not) and the
session (everything else: SCRAM, the proxy's backend, the query). Goal: median ratio ≤ 1.3, p99 ≤ 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import uvloop
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from compute.spawn import spawn  # noqa: E402
from lakelet.project import create_role  # noqa: E402
from proxy import Proxy, ProxyConfig  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user, run_async  # noqa: E402

POLL = 0.002
PASSWORD = "bench-wake-pw"


async def poll_select_1(socket_dir: str, port: int, user: str, deadline: float) -> None:
    """Try ``SELECT 1`` every 2 ms until it answers."""
    while True:
        try:
            conn = await asyncpg.connect(host=socket_dir, port=port, user=user, database="postgres", timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(POLL)
            continue
        try:
            await conn.fetchval("SELECT 1")
            return
        finally:
            await conn.close()


class Bare:
    """A plain cluster: initdb once, then start/stop rounds of ``postgres -D``."""

    def __init__(self, root: Path, pg: PgBinaries, user: ServiceUser) -> None:
        self.root, self.pg, self.user = root, pg, user
        self.datadir, self.sock = root / "bare", root / "bare-socket"

    async def init(self) -> None:
        self.sock.mkdir()
        self.user.own(self.sock, 0o700)
        self.user.own(self.root, 0o755)
        await run_async([self.pg["initdb"], "-D", str(self.datadir), "-U", "bench", "--auth=trust", "-E", "UTF8",
                         "--locale=C.UTF-8", "-N"], self.user)

    async def round(self) -> float:
        t0 = time.perf_counter()
        # Started the way the compute starts its postmaster (vfork, setpriv): a fork of this big
        # process would add 15–30 ms to the floor that a shell starting postgres does not pay.
        proc = await spawn(self.user, [self.pg["postgres"], "-D", str(self.datadir), "-k", str(self.sock),
                                       "-c", "listen_addresses=", "-c", "port=5432"], env=self.user.child_env())
        try:
            await poll_select_1(str(self.sock), 5432, "bench", time.monotonic() + 60)
            return time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            await proc.wait()


class Lake:
    """A store, its computes and the proxy in this process; one role with a password."""

    def __init__(self, root: Path, pg: PgBinaries, user: ServiceUser) -> None:
        self.root, self.pg, self.user = root, pg, user

    async def init(self) -> None:
        self.store = await asyncio.to_thread(Store.open, self.root / "store", user=self.user, pg=self.pg)
        await asyncio.to_thread(self.store.bootstrap)
        self.eps = Endpoints(self.store, computes_dir=self.root / "computes", user=self.user, pg=self.pg,
                             config=EndpointConfig(suspend_timeout=3600), registry=CollectorRegistry())
        await self.eps.start()
        await create_role(self.eps, "main", "app", PASSWORD, owner=True)
        self.proxy = Proxy(self.eps, ProxyConfig(listen_port=0), registry=CollectorRegistry())
        await self.proxy.start()
        await self.round()  # the first start materializes from the store: not a wake

    async def session(self) -> float:
        """Connect (SCRAM) and SELECT 1 with the compute already running: the session's own part."""
        t0 = time.perf_counter()
        conn = await asyncpg.connect(host="127.0.0.1", port=self.proxy.port, user="app", password=PASSWORD,
                                     database="postgres", ssl=False, timeout=60)
        try:
            await conn.fetchval("SELECT 1")
            return time.perf_counter() - t0
        finally:
            await conn.close()

    async def round(self) -> tuple[float, dict[str, float]]:
        await self.eps.suspend("main")
        # A wake comes long after the suspend in life: let the suspend's image job finish first.
        await self.eps.endpoint("main").image_job_done()
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        conn = await asyncpg.connect(host="127.0.0.1", port=self.proxy.port, user="app", password=PASSWORD,
                                     database="postgres", ssl=False, timeout=60)
        try:
            await conn.fetchval("SELECT 1")
            total = time.perf_counter() - t0
        finally:
            await conn.close()
        node = self.eps.endpoint("main").node
        steps = dict(getattr(node, "timings", {}) or {})
        steps["session (SCRAM, backend, query)"] = total - sum(steps.values())
        return total, steps

    async def close(self) -> None:
        await self.proxy.close()
        await self.eps.close()
        self.store.close()


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
    bare, lake = Bare(root, pg, user), Lake(root, pg, user)
    bare_s: list[float] = []
    lake_s: list[float] = []
    steps: dict[str, list[float]] = {}
    active: list[float] = []
    try:
        await bare.init()
        await lake.init()
        for _ in range(rounds):  # alternating, so both see the same machine
            bare_s.append(await bare.round())
            total, parts = await lake.round()
            lake_s.append(total)
            for name, seconds in parts.items():
                steps.setdefault(name, []).append(seconds)
            await asyncio.sleep(0.5)  # the WAL receiver and role sync settle
            active.append(await lake.session())
    finally:
        await lake.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"cold start → first row, {rounds} alternating rounds each (milliseconds)")
    print(f"{'':44}{'median':>10}{'p99':>10}{'min':>10}")
    for name, xs in (("bare postgres, SELECT 1 polled every 2 ms", bare_s),
                     ("lakelet: proxy, SCRAM, wake, SELECT 1", lake_s)):
        print(f"{name:44}{statistics.median(xs) * 1e3:10.1f}{pct(xs, 0.99) * 1e3:10.1f}{min(xs) * 1e3:10.1f}")
    print("where the wake's time goes (median per step):")
    for name, xs in steps.items():
        print(f"  {name:42}{statistics.median(xs) * 1e3:10.1f}")
    print(f"  {'(a session on a running compute, for scale)':42}{statistics.median(active) * 1e3:10.1f}")
    print(f"ratio lakelet/bare: median {statistics.median(lake_s) / statistics.median(bare_s):.2f} (goal ≤ 1.3), "
          f"p99 {pct(lake_s, 0.99) / pct(bare_s, 0.99):.2f} (goal ≤ 2)")


if __name__ == "__main__":
    uvloop.run(main())  # the loop lakelet up runs on
