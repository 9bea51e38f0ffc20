"""Autoscaler reaction time: from the start of a pgbench load to the first scale-up, and from the
end of the load to the return to min_cu, against what the policy promises (up within 5 s;
down after the cooldown, one step per cooldown).

    .venv/bin/python bench/autoscale.py [--quick] [--rounds N] [--cooldown SECONDS]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user, run_async  # noqa: E402

UP_GOAL = 5.0
POLL = 0.05


def cu_of(eps: Endpoints) -> float:
    return next(s for s in eps.status() if s.branch == "main").cu


async def wait_for(eps: Endpoints, predicate: object, limit: float = 120.0) -> float:
    t0 = time.perf_counter()
    while not predicate(cu_of(eps)):  # type: ignore[operator]
        if time.perf_counter() - t0 > limit:
            raise SystemExit(f"no size change within {limit:.0f}s: the autoscaler is not reacting")
        await asyncio.sleep(POLL)
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round with a short cooldown")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--cooldown", type=int, help="seconds of low load before each step down")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rounds = args.rounds or (1 if args.quick else 3)
    cooldown = args.cooldown or (3 if args.quick else 10)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-autoscale-", dir="/tmp"))
    os.chmod(root, 0o755)
    store = await asyncio.to_thread(Store.open, root / "store", user=user, pg=pg)
    await asyncio.to_thread(store.bootstrap)
    config = EndpointConfig(suspend_timeout=3600, min_cu=0.25, max_cu=2, down_after=cooldown)
    eps = Endpoints(store, computes_dir=root / "computes", user=user, pg=pg, config=config)
    await eps.start()
    ups: list[float] = []
    downs: list[float] = []
    try:
        addr = await eps.ensure_ready("main")
        env = {"PGHOST": addr.socket_dir, "PGPORT": str(addr.port), "PGUSER": "lakelet_admin",
               "PGDATABASE": "postgres"}
        await run_async([pg["pgbench"], "-i", "-s", "2", "-q"], user, env=env)
        for _ in range(rounds):
            await wait_for(eps, lambda cu: cu == config.min_cu)
            bench = await asyncio.create_subprocess_exec(
                pg["pgbench"], "-n", "-c", "4", "-j", "2", "-T", "600",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=user.preexec, env=user.child_env(env), cwd="/")
            try:
                ups.append(await wait_for(eps, lambda cu: cu > config.min_cu))
                peak = cu_of(eps)
            finally:
                bench.terminate()
                await bench.wait()
            downs.append(await wait_for(eps, lambda cu: cu == config.min_cu))
    finally:
        await eps.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    steps = 3  # 2 → 1 → 0.5 → 0.25
    down_goal = steps * (cooldown + 1)
    print(f"autoscaler reaction under pgbench (4 clients, 2 cores), {rounds} round(s), cooldown {cooldown}s")
    print(f"{'':34}{'measured s':>12}{'goal s':>10}{'ratio':>8}")
    up = statistics.median(ups)
    down = statistics.median(downs)
    print(f"{'load start → first scale-up':34}{up:12.2f}{UP_GOAL:10.1f}{up / UP_GOAL:8.2f}")
    print(f"{'load end → back at min_cu':34}{down:12.2f}{down_goal:10.1f}{down / down_goal:8.2f}")
    print(f"peak size {peak} CU (min 0.25, max 2)")


if __name__ == "__main__":
    asyncio.run(main())
