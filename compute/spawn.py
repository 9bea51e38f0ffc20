"""Starting the compute's processes (the postmaster, the WAL receiver) without copying Lakelet.

``asyncio.create_subprocess_exec`` forks: under uvloop always (libuv), and under the default loop
whenever a ``preexec_fn`` drops privileges. A fork copies the page tables of the whole Lakelet
process — 15–30 ms for a few hundred MB, on every wake, twice (postmaster and receiver). Here the
child is started with ``vfork`` + ``exec`` (``subprocess.Popen`` without ``preexec_fn``) and the
change of user is done by ``setpriv`` (util-linux) on the far side of the exec; the exit is awaited
through a pidfd on the event loop. Where ``setpriv`` or pidfds are missing, the old way is used.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from storage.postgres import ServiceUser


class Child:
    """A started process: what node.py and walreceiver.py use of an asyncio Process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._exited: asyncio.Future[int] | None = None
        self._pidfd: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        code = self._popen.poll()
        if code is not None:
            return code
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfds: a thread waits instead
                self._exited = asyncio.ensure_future(asyncio.to_thread(self._popen.wait))
            else:
                loop.add_reader(self._pidfd, self._reap)
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        code = self._popen.poll()
        if code is None:
            return  # readable before the zombie is reapable: next time
        loop = asyncio.get_running_loop()
        assert self._pidfd is not None and self._exited is not None
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if not self._exited.done():
            self._exited.set_result(code)


async def spawn(user: ServiceUser, argv: Sequence[str], *, env: dict[str, str],
                stdout: int | IO[bytes] | None = subprocess.DEVNULL,
                stderr: int | IO[bytes] | None = subprocess.DEVNULL) -> Child | asyncio.subprocess.Process:
    """Start ``argv`` as ``user`` in a new session, stdin from /dev/null, cwd /."""
    command, needs_preexec = user.command(argv)
    if needs_preexec:
        return await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, preexec_fn=user.preexec,
            start_new_session=True, env=env, cwd="/")
    popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                             cwd="/", start_new_session=True, close_fds=True)
    return Child(popen)


def log_tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
