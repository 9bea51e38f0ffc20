"""The compute's WAL receiver: ``pg_receivewal --synchronous`` into the store's WAL archive.

The server names it in ``synchronous_standby_names``, so commits wait for it. If it dies, it is
restarted with a growing delay (reset only once it has streamed for a second again, so an unwritable store costs a
restart every few seconds, not a dozen a second); commits wait meanwhile instead of being
acknowledged without durability, and ``stalled`` says why, for status and /healthz. A physical
replication slot keeps the server from recycling WAL the receiver has not yet stored.

It knows its compute only through ``ReceiverHost`` (no import of ``compute.node``), and writes its
pid next to the compute's data dir, so a Lakelet that died can find and stop it at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from compute.spawn import Child, log_tail, spawn
from storage.postgres import PgBinaries, ServiceUser, last_error_line, run_async

log = logging.getLogger("lakelet.compute.wal")

RECEIVER_NAME = "lakelet_wal"
SLOT_NAME = "lakelet_wal"
CONNECT_TIMEOUT = 30.0
PID_FILE = "receiver.pid"
LOG_FILE = "receiver.log"
FIRST_DELAY = 0.05
MAX_DELAY = 5.0
STABLE_AFTER = 1.0  # seconds a restarted receiver must stream before its restart delay starts over


class WalReceiverError(RuntimeError):
    pass


class ReceiverHost(Protocol):
    """What the receiver needs of its compute."""

    branch: str
    pg: PgBinaries
    user: ServiceUser
    socket_dir: Path
    port: int
    home: Path
    datadir: Path
    stopping: bool

    def alive(self) -> bool: ...
    def wal_dir(self) -> Path: ...
    async def replication_state(self) -> str | None: ...


class WalReceiver:
    def __init__(self, host: ReceiverHost, admin_role: str) -> None:
        self.host = host
        self.admin_role = admin_role
        self.restarts = 0
        # Why commits cannot become durable now (the receiver exited and does not stream yet).
        self.stalled: str | None = None
        self._proc: Child | asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _dsn(self) -> str:
        return (f"host={self.host.socket_dir} port={self.host.port} user={self.admin_role} "
                f"application_name={RECEIVER_NAME}")

    async def start(self, *, wait_streaming: bool = True) -> None:
        # A slot kept in the data dir from the last run (Postgres writes it under a temporary
        # name and renames it once complete) needs no process spawned on every wake.
        if not (self.host.datadir / "pg_replslot" / SLOT_NAME / "state").exists():
            await self._create_slot()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name=f"walreceiver-{self.host.branch}")
        if wait_streaming and not await self._streaming(CONNECT_TIMEOUT):
            raise WalReceiverError(f"WAL receiver for branch {self.host.branch!r} did not start streaming")

    async def _create_slot(self) -> None:
        pg, user = self.host.pg, self.host.user
        rc, _, err = await run_async([pg["pg_receivewal"], "--create-slot", "--if-not-exists", "--slot", SLOT_NAME,
                                      "-d", self._dsn(), "-n"], user, check=False)
        if rc != 0:
            raise WalReceiverError(f"cannot create replication slot for branch {self.host.branch!r}: "
                                   f"{last_error_line(err)}")

    async def _spawn(self) -> None:
        wal_dir = await asyncio.to_thread(self.host.wal_dir)
        # Its messages go to a file (read back when it exits): a pipe nobody drains while it runs
        # could fill and stall it, and with it every commit.
        log = self.host.home / LOG_FILE
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._proc = await spawn(self.host.user, [
                self.host.pg["pg_receivewal"], "-D", str(wal_dir), "--slot", SLOT_NAME, "--synchronous",
                "--no-loop", "-n", "-d", self._dsn()], env=self.host.user.child_env(), stderr=fd)
        finally:
            os.close(fd)
        (self.host.home / PID_FILE).write_text(f"{self._proc.pid}\n")

    async def _streaming(self, timeout: float) -> bool:
        """Whether the server sees us as its synchronous standby within ``timeout``: commits can
        complete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.returncode is not None:
                return False
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                if await self.host.replication_state() == "streaming":
                    return True
            await asyncio.sleep(0.02)
        return False

    async def _supervise(self) -> None:
        delay = FIRST_DELAY
        streamed_at: float | None = None
        while not self._stopping:
            assert self._proc is not None
            await self._proc.wait()
            if self._stopping or self.host.stopping or not self.host.alive():
                return
            # A receiver that reaches "streaming" and dies writing a moment later (an unwritable
            # store) has not recovered: the delay starts over only after it streamed a while.
            if streamed_at is not None and time.monotonic() - streamed_at >= STABLE_AFTER:
                delay = FIRST_DELAY
            streamed_at = None
            self.restarts += 1
            why = last_error_line(log_tail(self.host.home / LOG_FILE))
            self.stalled = f"the WAL receiver keeps exiting, commits wait: {why}"
            log.warning("WAL receiver exited; restarting (commits wait meanwhile)",
                        extra={"branch": self.host.branch, "error": why, "delay": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            if self._stopping or not self.host.alive():
                return
            try:
                await self._spawn()
            except OSError as e:
                self.stalled = f"the WAL receiver cannot start, commits wait: {e}"
                continue
            if await self._streaming(CONNECT_TIMEOUT):
                self.stalled = None
                streamed_at = time.monotonic()

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def stop(self, *, drain: bool = False) -> None:
        """Stop supervising; with ``drain`` (the server has shut down) first let the receiver
        finish writing and fsyncing what it got, which it does on its own at end of stream."""
        self._stopping = True
        if drain and self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 10)
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10)
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        (self.host.home / PID_FILE).unlink(missing_ok=True)
