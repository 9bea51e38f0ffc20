"""Commits wait when the bucket falls behind: the WAL receivers are paused until it catches up.

Every compute names its ``pg_receivewal`` as its synchronous standby, so a commit returns only
once the receiver has fsynced it. Pausing the receiver (SIGSTOP) therefore makes commits wait —
in Postgres itself, with no Lakelet code on the commit path — and resuming it (SIGCONT) lets them
complete. The uploader pauses them when the oldest WAL change not yet in the bucket is older than
``hold_after`` seconds (the bucket is failing, or slower than the writers), and resumes them when
the backlog is young again. So beyond that bound a commit is acknowledged only once the machine's
loss could not lose more than ``hold_after`` seconds of it.

The receivers are found by what they are: ``pg_receivewal`` processes writing under this store's
WAL directory (``/proc/<pid>/cmdline``), so the store needs nothing from the compute room.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("lakelet.storage.uploader")


def receivers(wal_root: Path) -> list[int]:
    """Pids of ``pg_receivewal`` processes whose ``-D`` is a directory under ``wal_root``."""
    prefix = str(wal_root).rstrip("/") + "/"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(b"pg_receivewal"):
            continue
        for flag, value in zip(args, args[1:], strict=False):
            if flag in (b"-D", b"--directory") and value.decode(errors="replace").startswith(prefix):
                out.append(int(entry))
    return out


class CommitHold:
    def __init__(self, wal_root: Path) -> None:
        self.wal_root = wal_root
        self.paused: set[int] = set()

    @property
    def holding(self) -> bool:
        return bool(self.paused)

    def hold(self, why: str) -> None:
        """Pause every receiver of this store (new ones too: called again each tick)."""
        fresh = [pid for pid in receivers(self.wal_root) if pid not in self.paused]
        if fresh and not self.paused:
            log.error(f"commits wait: {why}")
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGSTOP)
                self.paused.add(pid)
            except ProcessLookupError:
                pass

    def release(self) -> None:
        if not self.paused:
            return
        for pid in self.paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.clear()
        log.info("commits go on: the bucket caught up")
