"""One compute: a PostgreSQL server for one branch, on a data dir the store materialized.

It listens only on a Unix socket in a directory that only the service user can enter, and it
streams its WAL into the store as a synchronous standby (``pg_receivewal --synchronous``), so a
commit is acknowledged only once the store holds it. ``stop`` shuts it down cleanly and hands the
data dir to the store as an image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import asyncpg

from compute import logical_slots
from compute.signals import COUNTS_SQL, child_pids
from compute.spawn import Child, spawn
from compute.walreceiver import RECEIVER_NAME, SLOT_NAME, WalReceiver
from storage import ADMIN_ROLE, Materialized, Store
from storage.postgres import PgBinaries, ServiceUser, last_error_line, quote_literal, run_async
from storage.store import WAL_SEGMENT_MB

log = logging.getLogger("lakelet.compute")

PORT = 5432
START_TIMEOUT = 600.0
READY_POLL = 0.002  # how often postmaster.pid is read while a compute starts
INCLUDE_LINE = "include_if_exists = 'lakelet.conf'"


def _postmaster_ready(pid_file: Path, pid: int | None) -> bool:
    """postmaster.pid names ``pid`` (not a previous run's) and its status line says "ready"."""
    try:
        lines = pid_file.read_text().split("\n")
    except OSError:
        return False
    return len(lines) > 7 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


class ComputeStartError(Exception):
    """The compute did not start; the message is the Postgres log line that says why."""


class ComputeNode:
    def __init__(self, store: Store, branch: str, *, computes_dir: Path, user: ServiceUser, pg: PgBinaries,
                 settings: dict[str, str], durability: str = "store") -> None:
        self.store = store
        self.branch = branch
        self.user = user
        self.pg = pg
        self.settings = dict(settings)
        self.durability = durability
        self.home = computes_dir / branch
        self.datadir = self.home / "pgdata"
        self.socket_dir = self.home / "socket"
        self.log_file = self.home / "postgres.log"
        self.port = PORT
        self.pid: int | None = None
        self._proc: Child | asyncio.subprocess.Process | None = None
        self._receiver: WalReceiver | None = None
        self._computes_dir = computes_dir
        self.stopping = False
        # When this start spawned Postgres and when it was ready to serve (monotonic seconds).
        self.spawned_at = 0.0
        self.ready_at = 0.0
        self.timings: dict[str, float] = {}  # the last start's steps, in seconds
        self._step_at = 0.0
        # One kept admin session for the periodic reads (load counts, role sync): a connection
        # per read would fork a backend and load its catalog caches every few seconds.
        self._admin: asyncpg.Connection | None = None
        self._admin_lock = asyncio.Lock()

    # -- start ----------------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for d in (self._computes_dir, self.home, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.user.share_dir(self._computes_dir)
        self.user.own(self.home, 0o700)
        self.user.own(self.socket_dir, 0o700)

    def _write_config(self) -> None:
        conf = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "port": str(self.port),
            # "logical" where a lakehouse sync runs (settings, or a sync slot in the data dir).
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            # Replay runs without hot standby, so a compute may restart at a smaller size than the
            # one that wrote the WAL (hot standby insists on settings at least as large).
            "hot_standby": "off",
            "synchronous_commit": "on",
            "synchronous_standby_names": RECEIVER_NAME if self.durability == "store" else "",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] ",
            "password_encryption": "scram-sha-256",
            "fsync": "on",
            **self.settings,
        }
        text = "".join(f"{k} = {quote_literal(v)}\n" for k, v in conf.items())
        (self.datadir / "lakelet.conf").write_text(text)
        main_conf = self.datadir / "postgresql.conf"
        if INCLUDE_LINE not in main_conf.read_text():
            with open(main_conf, "a") as f:
                f.write(f"\n{INCLUDE_LINE}\n")
        # ALTER SYSTEM values from the previous run must not shadow this run's size.
        auto = self.datadir / "postgresql.auto.conf"
        if auto.exists():
            lines = auto.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines if ln.split("=", 1)[0].strip() not in conf]
            auto.write_text("".join(keep))
        (self.datadir / "pg_hba.conf").write_text(
            "# Only the private socket exists; its directory is reachable by the service user alone.\n"
            "local all all trust\nlocal replication all trust\n")
        for name in ("lakelet.conf", "pg_hba.conf", "postgresql.auto.conf"):
            if (self.datadir / name).exists():
                self.user.own(self.datadir / name, 0o600)

    async def _stop_stale(self) -> None:
        """A postmaster left running by a Lakelet that died holds the data dir: stop it."""
        if (self.datadir / "postmaster.pid").exists():
            await run_async([self.pg["pg_ctl"], "stop", "-D", str(self.datadir), "-m", "immediate", "-w"],
                            self.user, check=False)

    def _step(self, name: str) -> None:
        """Time since the previous step, kept by name (bench/wake.py prints where a wake goes)."""
        now = time.monotonic()
        self.timings[name] = now - self._step_at
        self._step_at = now

    async def start(self) -> None:
        started = self._step_at = time.monotonic()
        self._prepare_dirs()
        # No lock across branches: the store hands each promotion its own timeline ID, so cold
        # starts of different branches (restore, replay) run side by side.
        await self._stop_stale()
        # One trip to a thread for all the file work before the spawn (each trip is a wake-up of
        # the loop on a busy machine).
        prepared = await asyncio.to_thread(self._prepare)
        try:
            self.spawned_at = time.monotonic()
            await self._spawn()
            await self._wait_ready()
            self._step("postmaster ready")
            # The WAL receiver is spawned but not waited for: with durability = "store" it is the
            # synchronous standby, so a commit made before it streams waits for it like any other,
            # and sessions need not wait for it to begin. (Spawned here rather than by a background
            # task: pg_receivewal then runs even if the caller stops running the event loop.)
            self._receiver = WalReceiver(self, ADMIN_ROLE)
            if prepared.needs_recovery:  # the store's WAL directory must know the new timeline first
                await asyncio.to_thread(self.store.note_timeline, self.branch, self.datadir, prepared.timeline)
                self._step("catalog")
                await self._receiver.start(wait_streaming=False)
                self._step("WAL receiver spawned")
            else:
                await asyncio.gather(asyncio.to_thread(self.store.mark_running, self.branch),
                                     self._receiver.start(wait_streaming=False))
                self._step("catalog + WAL receiver spawned")
            self.ready_at = time.monotonic()
        except BaseException:
            self.store.release_timeline(prepared.timeline)
            await self.kill()
            raise
        log.info("compute started", extra={"branch": self.branch, "pid": self.pid,
                                           "seconds": round(time.monotonic() - started, 3),
                                           "replayed": prepared.needs_recovery})

    def _prepare(self) -> Materialized:
        """The data dir at the store's head, the branch's sync slots kept, the config written."""
        branch_id = self.store.get_branch(self.branch).id
        logical_slots.stash(self.datadir, self.home, branch_id)
        prepared = self.store.materialize(self.branch, self.datadir)
        try:
            self._restore_sync_slots(branch_id, prepared.needs_recovery)
            self._step("materialize")
            self._write_config()
            self._step("config")
        except BaseException:
            self.store.release_timeline(prepared.timeline)
            raise
        return prepared

    def _restore_sync_slots(self, branch_id: int, rebuilt: bool) -> None:
        """Lakehouse-sync slots survive a rebuilt data dir (see compute.logical_slots)."""
        # The endpoint starts a branch with a sync enabled with wal_level = logical; any other
        # branch's sync slots are orphans.
        enabled = self.settings.get("wal_level") == "logical"
        slots, removed = logical_slots.restore(
            self.datadir, self.home, branch_id, wal_files=lambda: self.store.wal_files(branch_id),
            copy_segment=self.store.copy_wal_segment, seg_size=WAL_SEGMENT_MB << 20, user=self.user,
            rebuilt=rebuilt, enabled=enabled)
        if removed:
            log.info("lakehouse-sync slots removed: not this branch's sync", extra={"branch": self.branch,
                                                                                    "slots": removed})
        if slots:  # Postgres refuses to start with a logical slot under a lower wal_level
            self.settings.update(logical_slots.SETTINGS)

    async def _spawn(self) -> None:
        self.log_file.touch()
        self.user.own(self.log_file, 0o600)
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND)
        try:
            # vfork + setpriv, not a fork of Lakelet: see compute/spawn.py (on every wake's path).
            self._proc = await spawn(self.user, [self.pg["postgres"], "-D", str(self.datadir)],
                                     env=self.user.child_env(), stdout=log_fd, stderr=log_fd)
        finally:
            os.close(log_fd)
        self.pid = self._proc.pid

    def log_tail(self, size: int = 16384) -> str:
        """The end of the compute's log, without the noise of our own readiness probes."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - size))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(ln for ln in text.splitlines() if "the database system is starting up" not in ln)

    async def _wait_ready(self) -> None:
        """Until the postmaster accepts connections outside recovery. It says so itself: line 8 of
        postmaster.pid becomes "ready" (with hot_standby off, only once recovery has ended). The
        file is read every 2 ms (pg_ctl reads it every 100 ms) — a read of a page-cached file,
        where a probe connection would fork a backend each time."""
        deadline = time.monotonic() + START_TIMEOUT
        pid_file = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.returncode is not None:
                raise ComputeStartError(f"compute for branch {self.branch!r} exited during start: "
                                        f"{last_error_line(self.log_tail())}")
            if _postmaster_ready(pid_file, self.pid):
                return
            await asyncio.sleep(READY_POLL)
        raise ComputeStartError(f"compute for branch {self.branch!r} not ready after {START_TIMEOUT:.0f}s: "
                                f"{last_error_line(self.log_tail())}")

    # -- run ------------------------------------------------------------------------------------

    def wal_dir(self) -> Path:
        """Where the receiver stores this branch's WAL (the store's archive directory)."""
        return self.store.receiver_dir(self.branch)

    async def replication_state(self) -> str | None:
        """The receiver's state as the server sees it (``streaming`` once commits can complete)."""
        conn = await self.connect()
        try:
            return await conn.fetchval(
                "SELECT state FROM pg_stat_replication WHERE application_name = $1", RECEIVER_NAME)
        finally:
            await conn.close()

    def durability_stalled(self) -> str | None:
        """Why commits cannot become durable now, or None (see ``WalReceiver.stalled``)."""
        return self._receiver.stalled if self._receiver is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait_exit(self) -> int:
        if self._proc is None:
            return 0
        return await self._proc.wait()

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(host=str(self.socket_dir), port=self.port, user=ADMIN_ROLE,
                                     database="postgres", timeout=10)

    async def apply_settings(self, settings: dict[str, str]) -> None:
        conn = await self.connect()
        try:
            for name, value in settings.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = {quote_literal(value)}")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        self.settings.update(settings)

    async def admin_fetch(self, sql: str) -> list[asyncpg.Record]:
        """``sql`` on the kept admin session (opened on first use, and again after any failure)."""
        async with self._admin_lock:
            if self._admin is None or self._admin.is_closed():
                self._admin = await self.connect()
            try:
                return await self._admin.fetch(sql, timeout=10)
            except BaseException:
                conn, self._admin = self._admin, None
                conn.terminate()
                raise

    async def close_admin(self) -> None:
        conn, self._admin = self._admin, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()

    async def counts(self) -> tuple[int, int]:
        """Active client backends (other than ours) and commits so far: the load the autoscaler
        and scale-to-zero read from Postgres."""
        row = (await self.admin_fetch(COUNTS_SQL))[0]
        return int(row[0]), int(row[1] or 0)

    async def sync_roles(self) -> dict[str, str | None]:
        """The compute's login roles and verifiers into the store — written (and the proxy's
        snapshot reloaded) only when they differ from what the store holds."""
        rows = await self.admin_fetch("SELECT rolname, CASE WHEN rolcanlogin THEN rolpassword END FROM pg_authid")
        roles = {r[0]: r[1] for r in rows if r[0] != ADMIN_ROLE}
        await asyncio.to_thread(self._store_roles, roles)
        return roles

    def _store_roles(self, roles: dict[str, str | None]) -> None:
        if self.store.roles(self.branch) != roles:
            self.store.set_roles(self.branch, roles)

    async def durable_lsn(self) -> str:
        conn = await self.connect()
        try:
            value = await conn.fetchval(
                "SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = $1", RECEIVER_NAME)
        finally:
            await conn.close()
        if value is None:
            raise ComputeStartError(f"the WAL receiver of branch {self.branch!r} is not connected")
        return str(value)

    async def branch_point(self, timeout: float = 30.0) -> str:
        """A restore-point record, returned once the store holds it: a child branch replays up to
        (not including) it, so it sees every commit acknowledged before this call."""
        conn = await self.connect()
        try:
            # The xid makes this transaction write a commit record after the point, and a
            # synchronous commit returns only once the receiver has flushed it: so WAL past the
            # point is durable at once instead of after the next unrelated write.
            async with conn.transaction():
                point = await conn.fetchval("SELECT pg_create_restore_point('lakelet-branch')::text")
                await conn.fetchval("SELECT pg_current_xact_id()")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                durable = await conn.fetchval(
                    "SELECT flush_lsn > $1::text::pg_lsn FROM pg_stat_replication WHERE application_name = $2",
                    point, RECEIVER_NAME)
                if durable:
                    return str(point)
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
        raise ComputeStartError(f"branch point {point} of {self.branch!r} did not reach the store in {timeout:.0f}s")

    def process_ids(self) -> list[int]:
        if self.pid is None:
            return []
        return [self.pid, *child_pids(self.pid)]

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self, *, image: bool = True) -> None:
        """Fast shutdown (sessions get FATAL 57P01), the receiver drains, the store takes the image."""
        self.stopping = True
        await self.close_admin()
        if self.alive():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGINT)  # Postgres' "fast" shutdown
            try:
                await asyncio.wait_for(self._proc.wait(), 60)
            except TimeoutError:
                await self.kill()
                raise ComputeStartError(f"compute for branch {self.branch!r} did not shut down in 60s") from None
        if self._receiver is not None:
            await self._receiver.stop(drain=True)
            self._receiver = None
        self.pid = None
        if image and (self.datadir / "PG_VERSION").exists():
            await asyncio.to_thread(self.store.take_image, self.branch, self.datadir)

    async def kill(self) -> None:
        """SIGKILL the postmaster, its backends and the receiver (a crash, or a failed start)."""
        if self._admin is not None:
            self._admin.terminate()
            self._admin = None
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()
        if self._receiver is not None:
            await self._receiver.stop()
            self._receiver = None
        self.pid = None


__all__ = ["ComputeNode", "ComputeStartError", "SLOT_NAME"]
