"""Load signals: what the proxy reports per branch, and what the autoscaler reads from a running
compute (CPU and memory from ``/proc``, active backends and commits from Postgres' statistics)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from compute.autoscaler import Sample

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Reading smaps_rollup walks every page table of a process, shared_buffers included: a couple of
# hundred microseconds per backend. Memory only feeds a gauge, so it is read every this many
# samples (the CPU ticks the autoscaler decides on are read on every sample).
MEMORY_EVERY = 15


class LoadSignals:
    """Updated by the proxy on its hot path: plain attributes, no locks, no allocation."""

    __slots__ = ("sessions", "sessions_opened", "bytes_in", "bytes_out", "last_activity", "waiting")

    def __init__(self) -> None:
        self.sessions = 0
        self.sessions_opened = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_activity = time.monotonic()
        self.waiting = 0  # pooled clients in line for a backend (transaction pooling): load not yet served

    @contextmanager
    def held(self) -> Iterator[None]:
        """Count the block as one session, as a client's would be: the autoscaler sees it and
        scale-to-zero waits for it; its end is activity. For rooms other than the proxy (the Data
        API's requests, synced-table runs), whose work is not a proxied session."""
        self.sessions += 1
        self.last_activity = time.monotonic()
        try:
            yield
        finally:
            self.sessions -= 1
            self.last_activity = time.monotonic()


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _read_proc(pids: list[int], memory: bool) -> tuple[dict[int, int], int]:
    """CPU ticks of each live pid, and (when asked) their summed PSS — in a worker thread."""
    ticks = {pid: t for pid in pids if (t := _cpu_ticks(pid)) is not None}
    return ticks, sum(_pss_bytes(p) for p in pids) if memory else 0


class ComputeSampler:
    """Turns a compute's cumulative counters into one ``Sample`` per tick."""

    def __init__(self) -> None:
        self._ticks: dict[int, int] = {}
        self._commits: int | None = None
        self._at = time.monotonic()
        self.last_cpu_seconds = 0.0
        self._conn: asyncpg.Connection | None = None
        self._memory = 0
        self._until_memory = 0

    async def sample(self, pids: list[int], connect: object, sessions: int, waiting: int = 0) -> Sample:
        now = time.monotonic()
        dt = max(now - self._at, 1e-3)
        self._at = now
        read_memory = self._until_memory <= 0
        # /proc reads are file I/O, and smaps_rollup walks page tables (milliseconds for a compute's
        # backends): off the event loop the proxy and the Data API share.
        ticks, memory = await asyncio.to_thread(_read_proc, pids, read_memory)
        delta = sum(t - self._ticks.get(pid, t if not self._ticks else 0) for pid, t in ticks.items())
        self._ticks = ticks
        cpu_seconds = max(0, delta) / CLOCK_TICKS
        self.last_cpu_seconds = cpu_seconds
        if read_memory:
            self._memory = memory
            self._until_memory = MEMORY_EVERY
        self._until_memory -= 1
        active, commits = await self._pg_counts(connect)
        commit_rate = 0.0 if self._commits is None or commits is None else max(0, commits - self._commits) / dt
        if commits is not None:
            self._commits = commits
        return Sample(cpu_cores=cpu_seconds / dt, active_backends=active, sessions=sessions,
                      commits_per_second=commit_rate, memory_bytes=self._memory, waiting=waiting)

    async def _pg_counts(self, connect: object) -> tuple[int, int | None]:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect()  # type: ignore[operator]
            row = await self._conn.fetchrow(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                "        AND backend_type = 'client backend' AND pid <> pg_backend_pid()),"
                "       (SELECT sum(xact_commit) FROM pg_stat_database)::bigint")
            return int(row[0]), int(row[1] or 0)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await self.close()
            return 0, None

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
