"""The compute's WAL receiver: ``pg_receivewal --synchronous`` into the store's WAL archive.

The server names it in ``synchronous_standby_names``, so commits wait for it. If it dies, it is
restarted; commits wait meanwhile instead of being acknowledged without durability. A physical
replication slot keeps the server from recycling WAL the receiver has not yet stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from storage import ADMIN_ROLE
from storage.postgres import last_error_line, run_async

if TYPE_CHECKING:
    from compute.node import ComputeNode

log = logging.getLogger("lakelet.compute.wal")

RECEIVER_NAME = "lakelet_wal"
SLOT_NAME = "lakelet_wal"
CONNECT_TIMEOUT = 30.0


class WalReceiverError(RuntimeError):
    pass


class WalReceiver:
    def __init__(self, node: ComputeNode) -> None:
        self.node = node
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _dsn(self) -> str:
        return (f"host={self.node.socket_dir} port={self.node.port} user={ADMIN_ROLE} "
                f"application_name={RECEIVER_NAME}")

    async def start(self, *, wait_streaming: bool = True) -> None:
        # A slot kept in the data dir from the last run (Postgres writes it under a temporary
        # name and renames it once complete) needs no process spawned on every wake.
        if not (self.node.datadir / "pg_replslot" / SLOT_NAME / "state").exists():
            await self._create_slot()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name=f"walreceiver-{self.node.branch}")
        if wait_streaming:
            await self._wait_streaming()

    async def _create_slot(self) -> None:
        pg, user = self.node.pg, self.node.user
        rc, _, err = await run_async([pg["pg_receivewal"], "--create-slot", "--if-not-exists", "--slot", SLOT_NAME,
                                      "-d", self._dsn(), "-n"], user, check=False)
        if rc != 0:
            raise WalReceiverError(f"cannot create replication slot for branch {self.node.branch!r}: "
                                   f"{last_error_line(err)}")

    async def _spawn(self) -> None:
        wal_dir = await asyncio.to_thread(self.node.store.wal_dir, self.node.branch)
        self._proc = await asyncio.create_subprocess_exec(
            self.node.pg["pg_receivewal"], "-D", str(wal_dir), "--slot", SLOT_NAME, "--synchronous",
            "--no-loop", "-n", "-d", self._dsn(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.node.user.preexec, env=self.node.user.child_env(), start_new_session=True, cwd="/",
        )

    async def _wait_streaming(self) -> None:
        """Ready means the server sees us as its synchronous standby: commits can complete."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            conn = await self.node.connect()
            try:
                state = await conn.fetchval(
                    "SELECT state FROM pg_stat_replication WHERE application_name = $1", RECEIVER_NAME)
            finally:
                await conn.close()
            if state == "streaming":
                return
            await asyncio.sleep(0.02)
        raise WalReceiverError(f"WAL receiver for branch {self.node.branch!r} did not start streaming")

    async def _supervise(self) -> None:
        backoff = 0.05
        while not self._stopping:
            assert self._proc is not None
            _, err = await self._proc.communicate()
            if self._stopping or self.node.stopping or not self.node.alive():
                return
            self.restarts += 1
            log.warning("WAL receiver exited; restarting (commits wait meanwhile)",
                        extra={"branch": self.node.branch, "error": last_error_line(err.decode(errors="replace"))})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            if self._stopping or not self.node.alive():
                return
            with contextlib.suppress(OSError):
                await self._spawn()
                backoff = 0.05

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
