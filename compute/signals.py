"""Load signals: what the proxy reports per branch, and what the autoscaler reads from a running
compute (CPU and memory from ``/proc``, active backends and commits from Postgres' statistics)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import asyncpg

from compute.autoscaler import Sample

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Memory only feeds a gauge, so it is read at most this often (seconds; the CPU the autoscaler
# decides on is read on every CPU reading).
MEMORY_EVERY = 15.0


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


def _stat_ticks(pid: int, children: bool = False) -> int | None:
    """utime + stime of a process, plus cutime + cstime (its reaped children's) when asked."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks
    except (OSError, IndexError, ValueError):
        return None


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _resident(pid: int) -> tuple[int, int]:
    """(private, shared) resident bytes of a process: ``RssAnon`` and ``RssShmem`` from
    ``/proc/<pid>/status``, counters the kernel keeps — unlike ``smaps_rollup``, whose page-table
    walk over shared_buffers took about a millisecond per backend (50 ms a reading for a busy
    compute, on a thread of the process that relays every session)."""
    anon = shmem = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(b"RssShmem:"):
                    shmem = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return anon, shmem


def _memory_bytes(pids: list[int]) -> int:
    """A compute's memory: every process's private pages, plus the shared segment once (as much of
    it as the process that touched most has resident)."""
    sizes = [_resident(p) for p in pids]
    return sum(a for a, _ in sizes) + max((s for _, s in sizes), default=0)


def compute_cpu_ticks(postmaster: int, memory: bool = False) -> tuple[int | None, int]:
    """All the CPU a compute has used (clock ticks), and (when asked) its memory — one call in a
    worker thread. The postmaster's own time plus its reaped children's (``cutime``/``cstime``:
    every backend that has exited) plus each live child's: a cumulative total, so two readings
    minutes apart still account for every backend that lived between them, however briefly."""
    total = _stat_ticks(postmaster, children=True)
    if total is None:
        return None, 0
    pids = child_pids(postmaster)
    for pid in pids:
        total += _stat_ticks(pid) or 0
    return total, _memory_bytes([postmaster, *pids]) if memory else 0


Counts = Callable[[], Awaitable[tuple[int, int]]]


class ComputeSampler:
    """Turns a compute's cumulative counters into one ``Sample`` per reading. What a reading takes is
    the caller's choice (see ``Endpoint.tick``): CPU and memory from ``/proc``, active backends and
    commits from Postgres; what is not read keeps its last value."""

    def __init__(self) -> None:
        self._ticks: int | None = None
        self._cpu_at = time.monotonic()
        self._commits: int | None = None
        self._commits_at = time.monotonic()
        self.last_cpu_seconds = 0.0  # CPU used since the previous CPU reading (for a counter)
        self._cpu_cores = 0.0
        self._active = 0
        self._commit_rate = 0.0
        self._memory = 0
        self._memory_at: float | None = None

    async def sample(self, postmaster: int, counts: Counts, sessions: int, waiting: int = 0, *,
                     cpu: bool = True, pg: bool = True) -> Sample:
        self.last_cpu_seconds = 0.0
        if cpu:
            await self._read_cpu(postmaster)
        if pg:
            await self._read_counts(counts)
        return Sample(cpu_cores=self._cpu_cores, active_backends=self._active, sessions=sessions,
                      commits_per_second=self._commit_rate, memory_bytes=self._memory, waiting=waiting)

    async def _read_cpu(self, postmaster: int) -> None:
        now = time.monotonic()
        read_memory = self._memory_at is None or now - self._memory_at >= MEMORY_EVERY
        # /proc reads are file I/O (one file per backend): off the event loop the proxy and the
        # Data API share.
        ticks, memory = await asyncio.to_thread(compute_cpu_ticks, postmaster, read_memory)
        if ticks is None:
            return
        if self._ticks is not None:
            seconds = max(0, ticks - self._ticks) / CLOCK_TICKS
            self.last_cpu_seconds = seconds
            self._cpu_cores = seconds / max(now - self._cpu_at, 1e-3)
        self._ticks, self._cpu_at = ticks, now
        if read_memory:
            self._memory, self._memory_at = memory, now

    async def _read_counts(self, counts: Counts) -> None:
        now = time.monotonic()
        try:
            active, commits = await counts()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._active, self._commits = 0, None
            return
        if self._commits is not None:
            self._commit_rate = max(0, commits - self._commits) / max(now - self._commits_at, 1e-3)
        self._active, self._commits, self._commits_at = active, commits, now


COUNTS_SQL = ("SELECT (SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
              "        AND backend_type = 'client backend' AND pid <> pg_backend_pid()),"
              "       (SELECT sum(xact_commit) FROM pg_stat_database)::bigint")
