"""Transaction pooling: many concurrent clients doing short transactions on one branch, through
Lakelet's pooled string and through PgBouncer in transaction mode with the same pool size, side
by side; then the memory each idle pooled client costs.

    .venv/bin/python bench/pooling.py [--quick] [--clients N] [--pool-size N] [--duration S] [--rounds N]
                                      [--control] [--no-prepared] [--idle N]

Load: ``pgbench -n -S -M extended`` (one statement per transaction, the extended protocol every
driver uses) with ``--clients`` connections (default 10,000; --quick 1,000), ``-j 4``, in
alternating rounds. Reported per target: TPS (pgbench's, without connection time), p99 latency
(from pgbench's per-transaction log), the pooler process's CPU per transaction (user + system,
sampled from /proc from the last login to the end of the run, so SCRAM logins are not in it; p99
over the same window), the backends' and pgbench's CPU per transaction and the machine's busy share
over that window (on a saturated machine TPS is the cores over everyone's CPU per transaction, so a
pooler is also judged by what it makes the others spend), and failed or aborted clients; the TPS
ratio of each round. Lakelet alone
also runs ``-M prepared`` (named statements remapped per backend; at most 1,000
clients, as pgbench prepares with a blocking call per client); the PgBouncer found here (1.18)
predates prepared-statement support (1.21), so it gets no such row.

Idle memory: ``--idle`` clients (default: as many as ``--clients``) log in with asyncpg and stay
idle; the RSS growth of the Lakelet process (a fresh one) and of PgBouncer, divided by the number
of clients. A pooled idle client holds no backend, so this is the proxy's cost alone.

``--control`` adds a second PgBouncer, identical to the first, as a third target in every round:
its ratio to the first is what this machine alone makes of two equal poolers, the yardstick for
Lakelet's ratio (each comparison printed per round, and as a geometric mean with a 95 % interval).

Goals (issue #16): every client served with no error; TPS ≥ PgBouncer's; ≤ 10 KiB per idle
pooled client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib.util
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _load_proxy_bench():  # noqa: ANN202 - the module
    """bench/proxy.py's process helpers (lakelet up, cleanup, /proc readers), loaded by path: the
    bench directory is not a package and ``proxy`` is the proxy room's name."""
    spec = importlib.util.spec_from_file_location("bench_proxy", REPO / "bench" / "proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_proxy"] = module
    spec.loader.exec_module(module)
    return module


bp = _load_proxy_bench()
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402

ROLE, DATABASE, PASSWORD = bp.ROLE, bp.DATABASE, bp.PASSWORD
CONTROL = "pgbouncer-ctl"  # --control: a second, identical PgBouncer


@dataclass
class Target:
    name: str
    port: int
    pid: int
    options: str = ""  # PGOPTIONS


@dataclass
class Result:
    target: str
    mode: str
    tps: float
    txns: int
    p99_ms: float
    cpu_us: float
    backend_us: float
    failed: int
    client_us: float = float("nan")  # pgbench's own CPU per transaction
    busy: float = float("nan")  # the machine's busy share of its cores over the window (1.0: saturated)


def _window(prefix: str, start: float, end: float) -> tuple[int, float]:
    """Transactions that ended inside [start, end] (epoch seconds) and their p99 latency in ms, from
    pgbench's per-transaction log (client, number, latency µs, script, epoch s, µs)."""
    latencies: list[int] = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and start <= int(parts[4]) + int(parts[5]) / 1e6 <= end:
                    latencies.append(int(parts[2]))
        os.unlink(path)
    if not latencies:
        return 0, float("nan")
    latencies.sort()
    return len(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000


def children_cpu(ppid: int) -> dict[int, float]:
    """CPU seconds of each child of ``ppid`` (a compute's postmaster: its backends and helpers)
    alive now."""
    with open(f"/proc/{ppid}/task/{ppid}/children") as f:
        pids = f.read().split()
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[int(pid)] = bp.cpu_seconds(int(pid))
    return out


class CpuSampler(threading.Thread):
    """The pooler process's CPU seconds, the compute's (its backends'), pgbench's and the whole
    machine's busy time, sampled with wall-clock time, so CPU per transaction is taken over a steady
    window after every client has logged in. On a saturated machine TPS is its cores over the sum
    of everyone's CPU per transaction: a pooler also costs what it makes the others spend."""

    def __init__(self, pid: int, postmaster: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.postmaster = postmaster
        self.client = 0  # pgbench's pid, once started
        self.samples: list[tuple[float, float, dict[int, float], float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                client = bp.cpu_seconds(self.client) if self.client else float("nan")
                self.samples.append((time.time(), bp.cpu_seconds(self.pid), children_cpu(self.postmaster), client,
                                     bp.machine_busy_seconds()))
            self.stop.wait(0.25)

    def between(self, start: float, end: float) -> tuple[float, float, float, float]:
        """Over the samples inside [start, end]: the pooler's, the backends' and pgbench's CPU
        seconds, and the machine's busy share of its cores."""
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return float("nan"), float("nan"), float("nan"), float("nan")
        # Per backend, over those alive at the end (one that exited meanwhile — the other pooler's
        # idle backends closing — must not subtract its whole life's CPU).
        first, last = inside[0], inside[-1]
        backends = sum(cpu - first[2].get(pid, 0.0) for pid, cpu in last[2].items())
        busy = (last[4] - first[4]) / (last[0] - first[0]) / (os.cpu_count() or 1)
        return last[1] - first[1], backends, last[3] - first[3], busy


def pgbench(pgbench_bin: str, target: Target, clients: int, duration: int, mode: str, logdir: Path,
            threads: int, postmaster: int, quiet: bool = False) -> Result:
    prefix = str(logdir / f"log-{target.name}-{mode}")
    cmd = [pgbench_bin, "-h", "127.0.0.1", "-p", str(target.port), "-U", ROLE, "-n", "-S", "-M", mode,
           "-c", str(clients), "-j", str(threads), "-T", str(duration), "-l", f"--log-prefix={prefix}", DATABASE]
    env = {**bp.pgbench_env(), "PGOPTIONS": target.options}
    sampler = CpuSampler(target.pid, postmaster)
    sampler.start()
    began = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        sampler.client = proc.pid
        stdout, stderr = proc.communicate()
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    ended = time.time()
    sampler.stop.set()
    sampler.join()
    tps = re.search(r"^tps = ([0-9.]+)", out.stdout, re.M)
    txns = re.search(r"^number of transactions actually processed: (\d+)", out.stdout, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out.stdout, re.M)
    connect = re.search(r"^initial connection time = ([0-9.]+) ms", out.stdout, re.M)
    aborted = len(re.findall(r"aborted", out.stderr))
    if txns is None or (tps is None and int(txns.group(1)) > 0):
        raise bp.SetupError(f"pgbench against {target.name} failed ({out.returncode}): "
                            f"{(out.stderr or out.stdout).strip()[-1500:]}")
    logins = float(connect.group(1)) / 1000 if connect else 0.0
    if tps is None:
        print(f"  {target.name}: the clients' logins took the whole {duration}s run; raise --duration", flush=True)
    # The steady window: from a second after the last login to a second before the end.
    start, end = max(began + logins + 1, ended - 1 - 0.6 * duration), ended - 1
    n, p99 = _window(prefix, start, end)
    nan = float("nan")
    cpu, backends, client, busy = sampler.between(start, end) if end - start >= 2 else (nan, nan, nan, nan)
    result = Result(target.name, mode, float(tps.group(1)) if tps else 0.0, int(txns.group(1)), p99,
                    cpu * 1e6 / n if n else nan, backends * 1e6 / n if n else nan,
                    (int(failed.group(1)) if failed else 0) + aborted + (out.returncode != 0),
                    client * 1e6 / n if n else nan, busy)
    if quiet:
        return result
    print(f"  {target.name:<16} -M {mode:<9} {result.tps:9.0f} tps  p99 {result.p99_ms:8.1f} ms  "
          f"{result.cpu_us:7.1f} µs CPU/txn  backends {result.backend_us:5.1f}  pgbench {result.client_us:5.1f} "
          f"µs/txn  machine busy {result.busy:4.0%}  errors {result.failed}  (logins {logins:.1f}s)", flush=True)
    return result


async def _open_pooled(port: int, options: str) -> asyncpg.Connection:
    settings = {"options": options} if options else {}
    return await asyncpg.connect(host="127.0.0.1", port=port, user=ROLE, password=PASSWORD, database=DATABASE,
                                 ssl=False, timeout=300, server_settings=settings)


async def idle_memory(name: str, port: int, pid: int, n: int, options: str) -> float:
    """KiB of RSS per idle logged-in client of process ``pid``."""
    warm = await bp.gather_limited(20, 4, lambda: _open_pooled(port, options))
    for c in warm:
        await c.fetchval("SELECT 1")
    await asyncio.sleep(1)
    before = bp.rss_kib(pid)
    t0 = time.perf_counter()
    clients = await bp.gather_limited(n, 32, lambda: _open_pooled(port, options))
    seconds = time.perf_counter() - t0
    await asyncio.sleep(2)
    after = bp.rss_kib(pid)
    per = (after - before) / max(1, len(clients))
    print(f"  idle {name:<16} {len(clients):6d} clients in {seconds:5.1f}s: RSS {before / 1024:.1f} → "
          f"{after / 1024:.1f} MiB, {per:.2f} KiB/client", flush=True)
    await bp.close_all([*warm, *clients])
    await asyncio.sleep(2)
    return per


def pooler_build(pid: int) -> str:
    """Whether the Lakelet process runs the pooler's modules compiled (proxy/native.py): its
    mypyc library is mapped into the process."""
    with open(f"/proc/{pid}/maps") as f:
        if "lakelet_pooler__mypyc" in f.read():
            return "compiled (mypyc)"
    return "interpreted (no build: scripts/setup.sh compiles it)"


def run(args: argparse.Namespace, cleanup: object) -> None:
    clients = args.clients or (1000 if args.quick else 10_000)
    idle = args.idle if args.idle is not None else clients
    duration = args.duration or (30 if args.quick else 150)  # -T includes the clients logging in
    rounds = args.rounds or (1 if args.quick else 2)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    wanted = max(clients, idle) + 2000  # per process: each side of the clients lives in its own
    if bp.raise_nofile(wanted) < wanted:
        raise bp.SetupError(f"RLIMIT_NOFILE cannot be raised to {wanted}: lower --clients")
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-pooling-", dir="/tmp"))
    cleanup.push("temp dir", lambda: shutil.rmtree(root, ignore_errors=True))  # type: ignore[attr-defined]
    os.chmod(root, 0o755)
    os.environ.update({"LAKELET_POOL_SIZE": str(args.pool_size), "LAKELET_POOL_TIMEOUT": "300"})
    print(f"starting lakelet up in {root} (compute pinned at {args.cu:g} CU, pool_size {args.pool_size})", flush=True)
    lake = bp.Lakelet(root, max(clients, idle), args.cu)
    lake.start(cleanup)
    init = subprocess.run([pg["pgbench"], "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(lake.port),
                           "-U", ROLE, DATABASE], capture_output=True, text=True, env=bp.pgbench_env())
    if init.returncode != 0:
        raise bp.SetupError(f"pgbench -i failed: {init.stderr.strip()[-1500:]}")
    ep = lake.endpoint()
    socket_dir, compute_port, postmaster = str(ep["host"]), int(ep["port"]), int(ep["pid"])
    verifier, _, _ = asyncio.run(bp.fetch_verifier(socket_dir, compute_port))
    targets = [Target("lakelet-pooled", lake.port, lake.proc.pid, "pool=transaction")]
    print(f"lakelet's pooler: {pooler_build(lake.proc.pid)}", flush=True)
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    bouncer: bp.PgBouncer | None = None
    if binary and not args.no_pgbouncer:
        bouncer = bp.PgBouncer(root, user, socket_dir, compute_port, verifier, max_clients=max(clients, idle) + 2000,
                               pool_mode="transaction", pool_size=args.pool_size)
        bouncer.start(binary, cleanup)
        targets.append(Target("pgbouncer-tx", bouncer.port, bouncer.proc.pid))  # type: ignore[union-attr]
        if args.control:  # the same PgBouncer again: what the machine alone makes of two equal poolers
            twin = bp.PgBouncer(root, user, socket_dir, compute_port, verifier, max_clients=clients + 2000,
                                pool_mode="transaction", pool_size=args.pool_size, name="pgbouncer-control")
            twin.start(binary, cleanup)
            targets.append(Target(CONTROL, twin.port, twin.proc.pid))  # type: ignore[union-attr]
    else:
        print("pgbouncer not found (scripts/setup.sh --bench installs it): Lakelet only")
    logdir = root / "logs"
    logdir.mkdir()
    results: list[Result] = []
    print(f"pgbench -S, {clients} clients, -j {args.threads}, {duration}s, {rounds} alternating round(s)", flush=True)
    # Untimed, short, through each target in turn: the first timed run is not the one that warms
    # the compute's caches and opens the pool's backends.
    for target in targets:
        pgbench(pg["pgbench"], target, min(clients, 200), 5, "extended", logdir, args.threads, postmaster, quiet=True)
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for target in order:
            results.append(pgbench(pg["pgbench"], target, clients, duration, "extended", logdir, args.threads,
                                   postmaster))
        # pgbench prepares each client's statements with a blocking call in a thread shared by
        # thousands of clients: behind a deep line that serializes logins, not the pooler; 1,000 at most.
        if not args.no_prepared:
            results.append(pgbench(pg["pgbench"], targets[0], min(clients, 1000), duration, "prepared", logdir,
                                   args.threads, postmaster))

    memory: dict[str, float] = {}
    if idle > 0:
        print(f"idle clients: {idle} logged in and idle; restarting lakelet up and pgbouncer for fresh heaps",
              flush=True)
        lake.restart(cleanup)
        if bouncer is not None and binary:
            bp.stop_process(bouncer.proc, signal.SIGINT, timeout=10)
            bouncer.start(binary, cleanup)

        async def idle_phase() -> None:
            memory["lakelet-pooled"] = await idle_memory("lakelet-pooled", lake.port, lake.proc.pid, idle,
                                                         "pool=transaction")
            if bouncer is not None:
                memory["pgbouncer-tx"] = await idle_memory("pgbouncer-tx", bouncer.port, bouncer.proc.pid, idle, "")

        asyncio.run(idle_phase())
    report(clients, duration, args.pool_size, args.threads, results, memory)


def report(clients: int, duration: int, pool_size: int, threads: int, results: list[Result],
           memory: dict[str, float]) -> None:
    print()
    print(f"{clients} clients, pool size {pool_size}, pgbench -S -j {threads} -T {duration}; medians over rounds")
    print(f"{'target':<16}{'mode':>10}{'tps':>10}{'p99 ms':>10}{'CPU µs/txn':>12}{'backends µs':>13}"
          f"{'pgbench µs':>12}{'errors':>8}{'KiB/idle':>10}")
    rows: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rows.setdefault((r.target, r.mode), []).append(r)
    med: dict[tuple[str, str], tuple[float, float, float, float, float, int]] = {}
    for (target, mode), rs in rows.items():
        med[(target, mode)] = (statistics.median(r.tps for r in rs), statistics.median(r.p99_ms for r in rs),
                               statistics.median(r.cpu_us for r in rs), statistics.median(r.backend_us for r in rs),
                               statistics.median(r.client_us for r in rs), sum(r.failed for r in rs))
        tps, p99, cpu, backends, client, failed = med[(target, mode)]
        mem = memory.get(target)
        print(f"{target:<16}{mode:>10}{tps:10.0f}{p99:10.1f}{cpu:12.1f}{backends:13.1f}{client:12.1f}{failed:8d}"
              f"{'' if mem is None or mode != 'extended' else format(mem, '10.2f')}")
    lake, bouncer = med.get(("lakelet-pooled", "extended")), med.get(("pgbouncer-tx", "extended"))
    if lake and bouncer:
        print(f"lakelet/pgbouncer: TPS {lake[0] / bouncer[0]:.2f} (goal ≥ 1), p99 {lake[1] / bouncer[1]:.2f}, "
              f"CPU/txn {lake[2] / bouncer[2]:.2f}, backends' CPU/txn {lake[3] / bouncer[3]:.2f}, "
              f"pgbench's CPU/txn {lake[4] / bouncer[4]:.2f}", end="")
        if "lakelet-pooled" in memory and "pgbouncer-tx" in memory:
            print(f", KiB/idle client {memory['lakelet-pooled']:.2f} vs {memory['pgbouncer-tx']:.2f} (goal ≤ 10)",
                  end="")
        print()
        per_round("lakelet/pgbouncer", rows[("lakelet-pooled", "extended")], rows[("pgbouncer-tx", "extended")])
        if (CONTROL, "extended") in rows:
            per_round("control: pgbouncer/pgbouncer", rows[(CONTROL, "extended")], rows[("pgbouncer-tx", "extended")])


# t(0.975, df): the 95 % two-sided quantile of Student's t for a handful of rounds (df above 30: 2.0).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06, 30: 2.04}


def per_round(label: str, these: list[Result], those: list[Result]) -> None:
    """The TPS and CPU ratios of each round (runs of the same round sit side by side in time), and
    the geometric mean of the TPS ratios with its 95 % interval: with ``--control`` the same line for
    PgBouncer against itself says how far apart two equal poolers land on this machine."""
    pairs = list(zip(these, those, strict=False))
    tps = [a.tps / b.tps for a, b in pairs]
    print(f"{label}: TPS ratio per round " + ", ".join(f"{r:.2f}" for r in tps)
          + "; pooler CPU/txn ratio " + ", ".join(f"{a.cpu_us / b.cpu_us:.2f}" for a, b in pairs))
    if len(tps) >= 2:
        logs = [math.log(r) for r in tps]
        mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
        t = next((v for df, v in sorted(_T95.items()) if df >= len(logs) - 1), 2.0)  # the table's next df up
        print(f"  {label}: geometric mean TPS ratio {math.exp(mean):.3f}, 95 % interval "
              f"{math.exp(mean - t * se):.3f}–{math.exp(mean + t * se):.3f} over {len(tps)} rounds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 clients, one 30 s round each")
    ap.add_argument("--clients", type=int, help="concurrent pgbench clients (default 10,000)")
    ap.add_argument("--idle", type=int, help="idle clients for the memory measurement (default: --clients; 0 skips)")
    ap.add_argument("--pool-size", type=int, default=20, help="backends per pool, both poolers (default 20)")
    ap.add_argument("--duration", type=int, help="seconds per pgbench run")
    ap.add_argument("--rounds", type=int, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=4, help="pgbench threads (-j; default 4: logins are sequential "
                    "per thread)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale factor (default 10)")
    ap.add_argument("--cu", type=float, default=0.25, help="compute size, pinned (default 0.25: max_connections 100)")
    ap.add_argument("--no-pgbouncer", action="store_true")
    ap.add_argument("--control", action="store_true", help="a second PgBouncer as a third target: the TPS ratio "
                    "of two equal poolers, this machine's noise floor for the comparison")
    ap.add_argument("--no-prepared", action="store_true", help="skip Lakelet's -M prepared runs (more rounds in the "
                    "same time)")
    return bp.run_bench("bench/pooling.py", run, ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
