"""Proxy overhead: pgbench select-only through the Lakelet proxy, straight to the compute and
through PgBouncer, in alternating rounds; the new-connection rate (``pgbench -C``); and the
proxy's memory per idle client.

    .venv/bin/python bench/proxy.py [--quick] [--rounds N] [--duration S] [--idle N]

Lakelet runs as a real ``lakelet up`` child process, so its CPU time (the proxy plus the control
plane that shares its event loop) can be read from ``/proc`` around each run and divided by the
transactions it relayed. "direct" is the compute's own Unix socket, i.e. what a client on the
compute's machine would get without any proxy. PgBouncer (``scripts/setup.sh --bench`` installs
it; skipped when missing) runs in session mode with the role's SCRAM verifier, listening on TCP
like the proxy, and pointing at the same compute socket. "bare-relay" (``bench/bare_relay.py``) is
the floor for a relay written in Python on uvloop: TCP in, the compute's socket out, a write per
chunk and nothing else — the proxy's cost above it is the proxy's; its cost above PgBouncer is
the runtime's. "plain-scram" is a plain Postgres 15 on 127.0.0.1 with ``scram-sha-256`` (the
compute's ``shared_buffers`` and ``max_connections``, the same tables): the connection-rate floor
for a client that logs in with a password, since "direct" (trust) skips the key derivation every
password login costs the client.

Goals: proxy TPS ≥ PgBouncer's and CPU per transaction ≤ PgBouncer's; connection rate ≥ direct (the proxy
hands new clients warm backends, reset with DISCARD ALL).

Idle clients: a proxied session also holds a Postgres backend, and ``max_connections`` follows the
compute size, so at most a compute's worth of *authenticated* idle sessions is measured; the full
``--idle`` count is measured as clients that sent their startup packet and sit in SCRAM (the
proxy has offered SASL and waits for the client's first message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lakelet.client import ControlClient, wait_healthy  # noqa: E402
from storage import ADMIN_ROLE  # noqa: E402
from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user  # noqa: E402

PASSWORD = "bench-proxy-pw"
ROLE = "lakelet"
DATABASE = "postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Headroom below max_connections for Lakelet's own admin connections and superuser slots.
BACKEND_MARGIN = 30
# The proxy runs at most this many handshakes per client address at once (the
# ``max_unauthenticated_per_address`` the bench starts Lakelet with, its default): clients parked
# in SCRAM are spread over source addresses 127.0.0.2, 127.0.0.3, … (all loopback) this many each,
# or the ones past it would wait in line behind handshakes that never finish.
PARKED_PER_ADDRESS = 100
# No wait of the bench is unbounded: a client that does not get through its step in this long
# counts as failed (and is reported), a pgbench run gets its duration plus this.
STEP_TIMEOUT = 120.0


class SetupError(RuntimeError):
    """The benchmark could not set up what it measures (the only non-zero exit)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), from /proc/<pid>/stat: kept apart because
    a relay's cost is largely the kernel's socket work, which user-space tuning cannot remove."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle (all processes, interrupts and soft interrupts)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SetupError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int) -> int:
    """Both ends of every idle client live on this machine: the bench needs one descriptor per
    client, the proxy one or two. Children inherit the limit, so raise it before they start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for limits in ((wanted, max(hard, wanted)), (min(wanted, hard), hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return limits[0]
    return soft


def run_bounded(cmd: list[str], what: str, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` capturing text output, with a deadline: a child that hangs (a stuck
    proxy under pgbench, say) ends the bench with a line saying which step it was."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or e.stdout or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise SetupError(f"{what} did not finish within {timeout:.0f}s; last output: {tail.strip()[-500:]!r}") from None


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Cleanup:
    """Everything started, stopped in reverse order on any exit (including Ctrl-C)."""

    actions: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def push(self, name: str, action: Callable[[], None]) -> None:
        self.actions.append((name, action))

    def run(self) -> None:
        while self.actions:
            name, action = self.actions.pop()
            try:
                action()
            except Exception as e:  # cleanup goes on whatever one step did
                print(f"cleanup: {name}: {e}", file=sys.stderr)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pids_under(root: Path) -> list[int]:
    """Processes whose command line names our temp dir: a compute postmaster or WAL receiver
    left behind if ``lakelet up`` had to be killed."""
    out = []
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


@dataclass
class Lakelet:
    root: Path
    idle: int
    cu: float
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _registered: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "lakelet-up.log"

    def start(self, cleanup: Cleanup, timeout: float = 180) -> None:
        env = {
            **os.environ,
            "LAKELET_PASSWORD": PASSWORD,
            # Clients parked in SCRAM for the idle-memory measurement must outlive the default
            # 60 s handshake limit, and all of them must be admitted on top of the authenticated ones.
            "LAKELET_AUTH_TIMEOUT": "900",
            "LAKELET_MAX_CLIENT_CONNECTIONS": str(self.idle + 3000),
            "LAKELET_MAX_UNAUTHENTICATED_PER_ADDRESS": str(PARKED_PER_ADDRESS),
        }
        cu = f"{self.cu:g}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}", "--http", f"127.0.0.1:{self.http_port}",
                 "--suspend-timeout", "86400", "--min-cu", cu, "--max-cu", cu],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
            )
        if not self._registered:
            cleanup.push("lakelet up", self.stop)
            self._registered = True
        proc = self.proc
        if wait_healthy(self.http_port, lambda: proc.poll() is None, timeout):
            return
        if proc.poll() is not None:
            raise SetupError(f"lakelet up exited {proc.returncode}:\n{self.log_tail()}")
        raise SetupError(f"lakelet up not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def endpoint(self, branch: str = "main") -> dict:
        for ep in ControlClient(self.data_dir).call("GET", "/api/v1/endpoints")["endpoints"]:
            if ep["branch"] == branch:
                return ep
        raise SetupError(f"no endpoint {branch!r} in lakelet status")

    def restart(self, cleanup: Cleanup) -> None:
        """A fresh process for the memory measurement: memory that earlier runs allocated and freed
        would otherwise be reused by the idle clients and not show up in RSS."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=90)
        self.start(cleanup)

    def stop(self) -> None:
        """SIGTERM (clean shutdown of the compute), then anything of ours still running."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=90)
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            left = pids_under(self.root)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if left:
                time.sleep(3)


@dataclass
class PgBouncer:
    """PgBouncer on 127.0.0.1 in front of the compute's socket, with the role's SCRAM verifier:
    session mode for bench/proxy.py, transaction mode (``pool_size`` server connections) for
    bench/pooling.py. ``start`` may be called again after a stop (a fresh heap)."""

    root: Path
    user: ServiceUser
    socket_dir: str
    compute_port: int
    verifier: str
    max_clients: int
    pool_mode: str = "session"
    pool_size: int = 64
    name: str = "pgbouncer"  # its directory under ``root``: a second instance takes another
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _registered: bool = False

    def start(self, binary: str, cleanup: Cleanup) -> None:
        """PgBouncer refuses to run as root: its files go to a directory of the service user,
        which can also reach the compute's private socket."""
        home = self.root / self.name
        home.mkdir(exist_ok=True)
        self.user.own(home, 0o700)
        (home / "userlist.txt").write_text(f'"{ROLE}" "{self.verifier}"\n')
        (home / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DATABASE} = host={self.socket_dir} port={self.compute_port} dbname={DATABASE}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {home}/userlist.txt\n"
            f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\nmax_db_connections = 0\n"
            f"max_client_conn = {self.max_clients}\nclient_login_timeout = 900\nquery_wait_timeout = 300\n"
            f"logfile = {home}/pgbouncer.log\nlog_connections = 0\nlog_disconnections = 0\n"
            "ignore_startup_parameters = extra_float_digits\n")
        for name in ("userlist.txt", "pgbouncer.ini"):
            self.user.own(home / name, 0o600)
        self.proc = subprocess.Popen(
            [binary, str(home / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=self.user.preexec, env=self.user.child_env(), cwd="/", start_new_session=True,
        )
        if not self._registered:
            cleanup.push(self.name, lambda: stop_process(self.proc, signal.SIGINT, timeout=10))  # type: ignore[arg-type]
            self._registered = True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = home / "pgbouncer.log"
                raise SetupError(f"pgbouncer exited {self.proc.returncode}: "
                                 f"{log.read_text()[-2000:] if log.exists() else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise SetupError("pgbouncer did not start listening within 20 s")


@dataclass
class PlainPostgres:
    """A plain Postgres 15 cluster as an application reaches one with a password: TCP on
    127.0.0.1, ``scram-sha-256`` for host connections, the compute's ``shared_buffers`` and
    ``max_connections``, the same pgbench tables. It is the floor for the connection rate a client
    that logs in with SCRAM gets without Lakelet: "direct" (trust on the compute's socket) leaves
    out the key derivation every password login costs the client."""

    root: Path
    user: ServiceUser
    pg: PgBinaries
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, settings: dict[str, str], scale: int, cleanup: Cleanup) -> None:
        datadir, sock = self.root / "plain", self.root / "plain-socket"
        for d in (datadir, sock):
            d.mkdir()
            self.user.own(d, 0o700)
        pwfile = self.root / "plain-pw"
        pwfile.write_text(PASSWORD + "\n")
        self.user.own(pwfile, 0o600)
        done = run_bounded([self.pg["initdb"], "-D", str(datadir), "-U", ROLE, f"--pwfile={pwfile}", "-E",
                            "UTF8", "--locale=C.UTF-8", "-N", "--auth-local=trust", "--auth-host=scram-sha-256"],
                           "initdb of the plain postgres", 300, preexec_fn=self.user.preexec,
                           env=self.user.child_env(), cwd="/")
        if done.returncode != 0:
            raise SetupError(f"initdb of the plain postgres failed: {done.stderr.strip()[-1500:]}")
        args = [self.pg["postgres"], "-D", str(datadir), "-k", str(sock), "-c", "listen_addresses=127.0.0.1",
                "-c", f"port={self.port}", "-c", "fsync=off"]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=self.user.preexec, env=self.user.child_env(), cwd="/",
                                     start_new_session=True)
        cleanup.push("plain postgres", lambda: stop_process(self.proc, signal.SIGINT, timeout=30))  # type: ignore[arg-type]
        asyncio.run(self._until_ready(time.monotonic() + 60))
        init = run_bounded([self.pg["pgbench"], "-i", "-q", "-s", str(scale), "-h", "127.0.0.1",
                            "-p", str(self.port), "-U", ROLE, DATABASE],
                           "pgbench -i on the plain postgres", 600, env=pgbench_env())
        if init.returncode != 0:
            raise SetupError(f"pgbench -i on the plain postgres failed: {init.stderr.strip()[-1500:]}")

    async def _until_ready(self, deadline: float) -> None:
        """A log-in that succeeds: the port opens while the server still refuses ("starting up")."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"plain postgres exited {self.proc.returncode}")
            try:
                conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=ROLE, password=PASSWORD,
                                             database=DATABASE, ssl=False, timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise SetupError("plain postgres did not accept a log-in within 60 s") from None
                await asyncio.sleep(0.02)
                continue
            await conn.close()
            return


@dataclass
class BareRelay:
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None


def start_bare_relay(socket_path: str, cleanup: Cleanup) -> BareRelay:
    relay = BareRelay()
    relay.proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "bare_relay.py"), "--listen", str(relay.port), "--socket", socket_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cleanup.push("bare relay", lambda: stop_process(relay.proc, signal.SIGTERM, timeout=10))  # type: ignore[arg-type]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if relay.proc.poll() is not None:
            raise SetupError(f"bench/bare_relay.py exited {relay.proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", relay.port), timeout=1):
            return relay
        time.sleep(0.1)
    raise SetupError("bench/bare_relay.py did not start listening within 20 s")


# -- pgbench --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    pid: int | None  # the process whose CPU time is charged to this target's transactions


@dataclass
class Run:
    tps: float
    txns: int
    cpu_user_s: float | None
    cpu_sys_s: float | None
    client_cpu_s: float = 0.0  # pgbench's own CPU: with SCRAM it derives the key on every connection
    seconds: float = 0.0  # the run's wall time
    lakelet_cpu_s: float | None = None  # the Lakelet process's CPU during another target's run
    machine_s: float = 0.0  # the whole machine's busy CPU meanwhile

    @property
    def machine_us_per_txn(self) -> float:
        return self.machine_s * 1e6 / self.txns if self.txns else 0.0

    @property
    def client_us_per_txn(self) -> float:
        return self.client_cpu_s * 1e6 / self.txns if self.txns else 0.0

    @property
    def cpu_us_per_txn(self) -> float | None:
        if self.cpu_user_s is None or self.cpu_sys_s is None or not self.txns:
            return None
        return (self.cpu_user_s + self.cpu_sys_s) * 1e6 / self.txns

    @property
    def sys_share(self) -> float | None:
        if self.cpu_user_s is None or self.cpu_sys_s is None or not self.cpu_user_s + self.cpu_sys_s:
            return None
        return self.cpu_sys_s / (self.cpu_user_s + self.cpu_sys_s)


def pgbench_env() -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"}


def pgbench(pg: PgBinaries, target: Target, args: list[str], lakelet_pid: int | None = None) -> Run:
    """One pgbench run; with ``lakelet_pid`` (for targets other than the proxy) the Lakelet
    process's CPU meanwhile too: its control plane's cost under that load, with nothing relayed."""
    cmd = [pg["pgbench"], "-h", target.host, "-p", str(target.port), "-U", ROLE, *args, DATABASE]
    lakelet_before = cpu_seconds(lakelet_pid) if lakelet_pid else None
    started = time.monotonic()
    before = cpu_times(target.pid) if target.pid else None
    machine_before = machine_busy_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = float(args[args.index("-T") + 1]) if "-T" in args else 600.0
    out = run_bounded(cmd, f"pgbench {' '.join(args)} against {target.name}", seconds + STEP_TIMEOUT, env=pgbench_env())
    after = cpu_times(target.pid) if target.pid else None
    machine = machine_busy_seconds() - machine_before
    seconds = time.monotonic() - started
    lakelet = cpu_seconds(lakelet_pid) - lakelet_before if lakelet_pid and lakelet_before is not None else None
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (done.ru_utime + done.ru_stime) - (children.ru_utime + children.ru_stime)
    tps = re.search(r"^tps = ([0-9.]+)", out.stdout, re.M)
    txns = re.search(r"^number of transactions actually processed: (\d+)", out.stdout, re.M)
    if out.returncode != 0 or tps is None or txns is None:
        raise SetupError(f"pgbench against {target.name} failed ({out.returncode}): "
                         f"{(out.stderr or out.stdout).strip()[-1500:]}")
    user = sys_ = None
    if before is not None and after is not None:
        user, sys_ = after[0] - before[0], after[1] - before[1]
    return Run(float(tps.group(1)), int(txns.group(1)), user, sys_, client, seconds, lakelet, machine)


def alternate(pg: PgBinaries, targets: list[Target], args: list[str], rounds: int, label: str,
              lakelet_pid: int | None = None) -> dict[str, list[Run]]:
    """Every round runs each target once, starting with a different one each round, so drift in
    a noisy machine's load spreads over all targets instead of favouring one. ``lakelet_pid``'s
    CPU is also read during the other targets' runs."""
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    for r in range(rounds):
        shift = r % len(targets)
        for target in targets[shift:] + targets[:shift]:
            run = pgbench(pg, target, args, None if target.pid == lakelet_pid else lakelet_pid)
            runs[target.name].append(run)
            cpu = f", machine {run.machine_us_per_txn:.1f} µs/txn"
            if run.cpu_us_per_txn is not None and run.sys_share is not None:
                cpu += f", {run.cpu_us_per_txn:.1f} µs CPU/txn ({run.sys_share:.0%} sys)"
            print(f"  {label} round {r + 1}/{rounds} {target.name:<10} {run.tps:10.0f} tps{cpu}", flush=True)
    return runs


def median_tps(runs: list[Run]) -> float:
    return statistics.median(r.tps for r in runs)


def median_cpu(runs: list[Run]) -> float | None:
    values = [v for v in (r.cpu_us_per_txn for r in runs) if v is not None]
    return statistics.median(values) if values else None


def median_machine(runs: list[Run]) -> float:
    return statistics.median(r.machine_us_per_txn for r in runs)


def median_client(runs: list[Run]) -> float:
    return statistics.median(r.client_us_per_txn for r in runs)


def median_lakelet_share(runs: list[Run]) -> float | None:
    """The Lakelet process's CPU during these runs, as a fraction of a core."""
    values = [r.lakelet_cpu_s / r.seconds for r in runs if r.lakelet_cpu_s is not None and r.seconds]
    return statistics.median(values) if values else None


def median_sys(runs: list[Run]) -> float | None:
    values = [v for v in (r.sys_share for r in runs) if v is not None]
    return statistics.median(values) if values else None


# -- idle clients ---------------------------------------------------------------------------------


async def gather_limited(n: int, concurrency: int, make: Callable[[int], object] | Callable[[], object],
                         timeout: float = STEP_TIMEOUT) -> list:
    """Open ``n`` clients, ``concurrency`` handshakes at a time (a burst of thousands would only
    measure the listen backlog). ``make`` gets the client's index when it takes one argument.
    Each client gets ``timeout`` seconds: one that is not through by then counts as failed, and
    the failures are printed (how many, of which kind) instead of waited for."""
    sem = asyncio.Semaphore(concurrency)
    indexed = _takes_index(make)

    async def one(i: int) -> object:
        async with sem:
            opening = make(i) if indexed else make()  # type: ignore[call-arg]
            return await asyncio.wait_for(opening, timeout)  # type: ignore[arg-type]

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    good = [r for r in results if not isinstance(r, BaseException)]
    if errors:
        kinds: dict[str, int] = {}
        for e in errors:
            name = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            kinds[name] = kinds.get(name, 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"  {len(errors)} of {n} clients failed to open ({summary}), e.g. {errors[0]!r}", flush=True)
    return good


def _takes_index(make: Callable[..., object]) -> bool:
    try:
        return len(inspect.signature(make).parameters) >= 1
    except (TypeError, ValueError):
        return False


def parked_source(i: int) -> str:
    """The loopback source address of the i-th parked client: ``PARKED_PER_ADDRESS`` per address
    from 127.0.0.2 on, so each address stays within the proxy's per-address handshake limit."""
    k = 2 + i // PARKED_PER_ADDRESS
    return f"127.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


async def open_in_auth(port: int, source: str = "127.0.0.1") -> asyncio.StreamWriter:
    """A client that sent its StartupMessage and got AuthenticationSASL, then says nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", ROLE), ("database", DATABASE)))
        body = struct.pack("!I", 196608) + params + b"\0"
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await writer.drain()
        kind, length = struct.unpack("!cI", await reader.readexactly(5))
        payload = await reader.readexactly(length - 4)
        if kind != b"R" or struct.unpack("!I", payload[:4])[0] != 10:
            raise ConnectionError(f"expected AuthenticationSASL, got {kind!r} {payload[:80]!r}")
    except BaseException:
        writer.close()
        raise
    return writer


async def open_authenticated(port: int) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=ROLE, password=PASSWORD, database=DATABASE,
                                 ssl=False, timeout=STEP_TIMEOUT)


async def close_all(clients: list) -> None:
    for c in clients:
        if isinstance(c, asyncio.StreamWriter):
            c.close()
        else:
            c.terminate()
    await asyncio.sleep(0)


@dataclass
class IdleResult:
    target: str
    kind: str
    clients: int
    rss_before_kib: int
    rss_after_kib: int
    seconds: float

    @property
    def kib_per_client(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(1, self.clients)


async def measure_idle(target: str, port: int, pid: int, authenticated: int, parked: int) -> list[IdleResult]:
    """Authenticated sessions first, then clients parked in SCRAM on top of them, and only then
    close everything: memory freed by one kind would otherwise be reused by the next and make it
    look free."""
    out: list[IdleResult] = []
    held: list = []
    try:
        for kind, n in (("authenticated", authenticated), ("in-auth", parked)):
            if n <= 0:
                continue
            await asyncio.sleep(1)
            before = rss_kib(pid)
            t0 = time.perf_counter()
            if kind == "authenticated":
                clients = await gather_limited(n, 32, lambda: open_authenticated(port))
            else:  # spread over loopback addresses: see PARKED_PER_ADDRESS
                clients = await gather_limited(n, 256, lambda i: open_in_auth(port, parked_source(i)))
            seconds = time.perf_counter() - t0
            held += clients
            await asyncio.sleep(2)  # let the other side finish whatever the last packets started
            after = rss_kib(pid)
            result = IdleResult(target, kind, len(clients), before, after, seconds)
            out.append(result)
            print(f"  idle {kind:<13} {target:<10} {len(clients):6d} clients in {seconds:5.1f}s: RSS "
                  f"{before / 1024:.1f} → {after / 1024:.1f} MiB, {result.kib_per_client:.2f} KiB/client", flush=True)
    finally:
        await close_all(held)
        await asyncio.sleep(2)
    return out


# -- the benchmark --------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    duration: int
    conn_rounds: int
    conn_duration: int
    clients: int
    scale: int
    idle: int
    cu: float


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        rounds=args.rounds or (2 if quick else 5),
        duration=args.duration or (6 if quick else 15),
        conn_rounds=args.rounds or (2 if quick else 3),
        conn_duration=4 if quick else 10,
        clients=args.clients,
        scale=args.scale,
        idle=args.idle if args.idle is not None else (1000 if quick else 10_000),
        cu=args.cu,
    )


def background_cpu(pid: int, seconds: float = 5.0) -> float:
    """The Lakelet process's CPU while nothing is relayed (control plane and autoscaler ticks),
    as a fraction of a core: part of what the proxy column charges per transaction."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


async def fetch_verifier(socket_dir: str, port: int) -> tuple[str, int, str]:
    conn = await asyncpg.connect(host=socket_dir, port=port, user=ADMIN_ROLE, database=DATABASE, timeout=30)
    try:
        verifier = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", ROLE)
        max_conn = int(await conn.fetchval("SHOW max_connections"))
        shared_buffers = await conn.fetchval("SHOW shared_buffers")
    finally:
        await conn.close()
    return verifier, max_conn, shared_buffers


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM, and SIGINT even when inherited as ignored (a background job), take the same
    cleanup path as Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def fmt(value: float | None, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)  # type: ignore[union-attr]
    return "-".rjust(width) if value is None else format(value, spec)


def report(s: Settings, select: dict[str, list[Run]], connect: dict[str, list[Run]], idle: list[IdleResult],
           idle_cpu: float) -> None:
    names = list(select)
    print()
    print(f"pgbench -S, {s.clients} clients, -j 2, {s.duration}s × {s.rounds} rounds; "
          f"pgbench -C -S {s.conn_duration}s × {s.conn_rounds}; scale {s.scale}; medians")
    print(f"{'target':<11}{'select tps':>12}{'ratio':>8}{'CPU µs/txn':>12}{'sys':>6}{'machine':>9}{'+direct':>9}"
          f"{'conn/s':>10}{'ratio':>8}{'CPU µs/conn':>13}{'sys':>6}{'pgbench µs/conn':>17}")
    direct_machine = median_machine(select["direct"])
    direct_tps, direct_conn = median_tps(select["direct"]), median_tps(connect["direct"])
    for name in names:
        tps, conn = median_tps(select[name]), median_tps(connect[name])
        print(f"{name:<11}{tps:12.0f}{tps / direct_tps:8.2f}{fmt(median_cpu(select[name]), '12.1f')}"
              f"{fmt(median_sys(select[name]), '6.0%')}{median_machine(select[name]):9.1f}"
              f"{median_machine(select[name]) - direct_machine:9.1f}{conn:10.0f}{conn / direct_conn:8.2f}"
              f"{fmt(median_cpu(connect[name]), '13.0f')}{fmt(median_sys(connect[name]), '6.0%')}"
              f"{median_client(connect[name]):17.0f}")
    print(f"CPU: the Lakelet process (proxy + control plane; idle background {idle_cpu * 100:.1f}% of a core), "
          "the bare relay's and the pgbouncer process; sys = kernel share.")
    print("machine: the whole machine's busy CPU per transaction (pgbench, Postgres, the relay, interrupts); "
          "+direct: what the target adds to the direct connection's.")
    loaded = median_lakelet_share(select["direct"])
    if loaded is not None:
        print(f"The Lakelet process while the compute served the direct runs (nothing relayed): {loaded * 100:.2f}% "
              f"of a core, {loaded * 1e6 / median_tps(select['proxy']):.2f} µs per proxied transaction "
              "at the proxy's rate (included in its CPU µs/txn).")
    print("plain-scram: a plain Postgres on 127.0.0.1 with scram-sha-256, the compute's shared_buffers and "
          "max_connections, as an application logs in without Lakelet.")
    print("direct and bare-relay log in with trust on the compute's socket (no SCRAM); pgbouncer keeps server "
          "connections across clients in session mode, the proxy keeps warm backends (reset with DISCARD ALL).")
    print("pgbench µs/conn: the client's own CPU per connection (with SCRAM it derives the password's key, "
          "4096 HMAC rounds, every time) on the same two cores.")
    if idle:
        print(f"{'idle clients':<26}{'clients':>9}{'RSS before':>12}{'RSS after':>11}{'KiB/client':>12}")
        for r in idle:
            print(f"{r.target + ' ' + r.kind:<26}{r.clients:9d}{r.rss_before_kib / 1024:10.1f}Mi"
                  f"{r.rss_after_kib / 1024:9.1f}Mi{r.kib_per_client:12.2f}")
    proxy_ratio = median_tps(select["proxy"]) / direct_tps
    print(f"ratio proxy/direct: {proxy_ratio:.2f} (goal ≥ 0.9)", end="")
    if "pgbouncer" in select:
        print(f"; pgbouncer/direct: {median_tps(select['pgbouncer']) / direct_tps:.2f}", end="")
        p, b = median_cpu(select["proxy"]), median_cpu(select["pgbouncer"])
        if p is not None and b is not None:
            print(f"; CPU/txn proxy/pgbouncer: {p / b:.2f} (goal ≤ 1)", end="")
    p, floor = median_cpu(select["proxy"]), median_cpu(select["bare-relay"])
    if p is not None and floor is not None:
        print(f"; CPU/txn proxy/bare-relay: {p / floor:.2f}", end="")
    print()
    if "pgbouncer" in select:
        b_tps, b_conn = median_tps(select["pgbouncer"]), median_tps(connect["pgbouncer"])
        p_tps, p_conn = median_tps(select["proxy"]), median_tps(connect["proxy"])
        line = (f"proxy/pgbouncer: select TPS {p_tps / b_tps:.2f} (goal ≥ 1), connections/s {p_conn / b_conn:.2f}; "
                f"proxy/direct connections/s {p_conn / direct_conn:.2f} (goal ≥ 1); proxy/plain-scram "
                f"connections/s {p_conn / median_tps(connect['plain-scram']):.2f} (both log in with SCRAM)")
        p_c, b_c = median_cpu(connect["proxy"]), median_cpu(connect["pgbouncer"])
        if p_c is not None and b_c is not None:
            line += f"; CPU/connection proxy/pgbouncer {p_c / b_c:.2f}"
        print(line)


def run(args: argparse.Namespace, cleanup: Cleanup) -> None:
    s = settings_from(args)
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    # Two descriptors per authenticated session (client and compute side), one per parked client.
    nofile = raise_nofile(s.idle + 2 * 2000 + 1000)
    if nofile < s.idle + 2 * 2000 + 1000:
        s.idle = max(0, nofile - 2 * 2000 - 1000)
        print(f"RLIMIT_NOFILE is {nofile}: idle clients lowered to {s.idle}", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="lakelet-bench-proxy-", dir="/tmp"))
    cleanup.push("temp dir", lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)

    print(f"starting lakelet up in {root} (compute pinned at {s.cu:g} CU)", flush=True)
    lake = Lakelet(root, s.idle, s.cu)
    lake.start(cleanup)
    assert lake.proc is not None
    proxy_pid = lake.proc.pid
    print(f"pgbench -i -s {s.scale} through the proxy", flush=True)
    init = run_bounded([pg["pgbench"], "-i", "-q", "-s", str(s.scale), "-h", "127.0.0.1", "-p", str(lake.port),
                        "-U", ROLE, DATABASE], "pgbench -i through the proxy", 600, env=pgbench_env())
    if init.returncode != 0:
        raise SetupError(f"pgbench -i failed: {init.stderr.strip()[-1500:]}")
    ep = lake.endpoint()
    if ep["state"] != "active" or not ep["host"]:
        raise SetupError(f"compute not active after pgbench -i: {json.dumps(ep)}")
    socket_dir, compute_port = str(ep["host"]), int(ep["port"])
    verifier, max_conn, shared_buffers = asyncio.run(fetch_verifier(socket_dir, compute_port))

    targets = [Target("proxy", "127.0.0.1", lake.port, proxy_pid), Target("direct", socket_dir, compute_port, None)]
    plain = PlainPostgres(root, user, pg)
    plain.start({"shared_buffers": shared_buffers, "max_connections": str(max_conn)}, s.scale, cleanup)
    targets.append(Target("plain-scram", "127.0.0.1", plain.port, None))
    relay = start_bare_relay(f"{socket_dir}/.s.PGSQL.{compute_port}", cleanup)
    assert relay.proc is not None
    targets.append(Target("bare-relay", "127.0.0.1", relay.port, relay.proc.pid))
    bouncer_bin = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    bouncer: PgBouncer | None = None
    if bouncer_bin and not args.no_pgbouncer:
        bouncer = PgBouncer(root, user, socket_dir, compute_port, verifier, max_clients=s.idle + 3000)
        bouncer.start(bouncer_bin, cleanup)
        assert bouncer.proc is not None
        targets.append(Target("pgbouncer", "127.0.0.1", bouncer.port, bouncer.proc.pid))
    else:
        print("pgbouncer not found (scripts/setup.sh --bench installs it): comparing proxy and direct only")

    common = ["-n", "-S", "-c", str(s.clients), "-j", "2"]
    for target in targets:  # warm caches, pools and the compute's buffers once per target
        pgbench(pg, target, [*common, "-T", "2"])
    idle_cpu = background_cpu(proxy_pid)
    print(f"select-only: {s.rounds} alternating rounds of {s.duration}s", flush=True)
    select = alternate(pg, targets, [*common, "-T", str(s.duration)], s.rounds, "select", proxy_pid)
    print(f"new connection per transaction: {s.conn_rounds} alternating rounds of {s.conn_duration}s", flush=True)
    connect = alternate(pg, targets, ["-C", *common, "-T", str(s.conn_duration)], s.conn_rounds, "connect",
                        proxy_pid)

    idle: list[IdleResult] = []
    if s.idle > 0:
        authed = max(0, min(s.idle, max_conn - BACKEND_MARGIN))
        addresses = -(-s.idle // PARKED_PER_ADDRESS)
        print(f"idle clients: {authed} authenticated (max_connections {max_conn}), then {s.idle} parked in SCRAM "
              f"from {addresses} loopback addresses ({parked_source(0)}…{parked_source(s.idle - 1)}, "
              f"{PARKED_PER_ADDRESS} each: the proxy's per-address handshake limit); "
              "restarting lakelet up for a fresh heap", flush=True)

        lake.restart(cleanup)
        assert lake.proc is not None
        fresh_pid = lake.proc.pid

        async def idle_phase() -> None:
            # Wake the compute and load what a first session loads, outside the measurement.
            await close_all(await gather_limited(20, 4, lambda: open_authenticated(lake.port)))
            measured = [("proxy", lake.port, fresh_pid)]
            if bouncer is not None and bouncer.proc is not None:
                measured.append(("pgbouncer", bouncer.port, bouncer.proc.pid))
            for name, port, pid in measured:
                idle.extend(await measure_idle(name, port, pid, authed, s.idle))

        asyncio.run(idle_phase())
    report(s, select, connect, idle, idle_cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, 1,000 idle clients (about 2 minutes)")
    ap.add_argument("--rounds", type=int, help="alternating rounds per measurement")
    ap.add_argument("--duration", type=int, help="seconds per select-only pgbench run")
    ap.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale factor (default 10)")
    ap.add_argument("--idle", type=int, help="idle clients for the memory measurement (0 skips it)")
    ap.add_argument("--cu", type=float, default=16,
                    help="compute size, pinned (default 16: max_connections 1600 for authenticated idle clients)")
    ap.add_argument("--no-pgbouncer", action="store_true", help="skip PgBouncer even when installed")
    return run_bench("bench/proxy.py", run, ap.parse_args())


def run_bench(name: str, body: Callable[[argparse.Namespace, Cleanup], None], args: argparse.Namespace) -> int:
    """Run a bench with its cleanup stack: the exit code, one line for a setup failure, and every
    process and directory it started gone afterwards, Ctrl-C and SIGTERM included."""
    cleanup = Cleanup()
    try:
        with interrupts_as_keyboard():
            body(args, cleanup)
    except SetupError as e:
        print(f"{name}: setup failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
