"""Computes a previous ``lakelet up`` left running when it died (kill -9, OOM, a crash).

Postgres and ``pg_receivewal`` run in their own sessions, so they outlive the process that
started them, keep their data dirs, and keep writing into the store. At start, before any compute
of ours runs, every ``computes/<branch>/`` is checked: a postmaster named in ``postmaster.pid``
and a receiver named in ``receiver.pid`` that are still alive *and still the program we started
there* (their command line names that directory — pids are reused) are killed, and directories of
branches that no longer exist are removed. The store recovers their branches from WAL, as after
any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

log = logging.getLogger("lakelet.compute")

GONE_TIMEOUT = 30.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid_in(path: Path) -> int | None:
    try:
        first = path.read_text().split()[0]
        return int(first)
    except (OSError, ValueError, IndexError):
        return None


def find_orphans(computes_dir: Path) -> list[tuple[str, int]]:
    """(what, pid) of every live postmaster or receiver under ``computes_dir``."""
    found: list[tuple[str, int]] = []
    if not computes_dir.is_dir():
        return found
    for home in sorted(computes_dir.iterdir()):
        datadir = home / "pgdata"
        pid = _pid_in(datadir / "postmaster.pid")
        if pid is not None and f"-D {datadir}" in _cmdline(pid):
            found.append((f"postgres of {home.name}", pid))
        pid = _pid_in(home / "receiver.pid")
        if pid is not None and "pg_receivewal" in _cmdline(pid):
            found.append((f"WAL receiver of {home.name}", pid))
    return found


async def stop_orphans(computes_dir: Path, branches: set[str]) -> int:
    """Kill what ``find_orphans`` finds, wait until it is gone, and remove the compute dirs of
    branches not in ``branches``. Returns how many processes were stopped."""
    orphans = await asyncio.to_thread(find_orphans, computes_dir)
    for what, pid in orphans:
        log.warning(f"stopping {what} (pid {pid}), left running by a previous lakelet up",
                    extra={"pid": pid})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # each runs as its own session and process group leader
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_TIMEOUT
    for _, pid in orphans:
        # Not our children: watch /proc until the kernel has reaped them (init does).
        while Path(f"/proc/{pid}").exists() and _cmdline(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    if computes_dir.is_dir():
        for home in computes_dir.iterdir():
            if home.is_dir() and home.name not in branches:
                await asyncio.to_thread(shutil.rmtree, home, True)
    return len(orphans)
