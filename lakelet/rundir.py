"""What a running ``lakelet up`` leaves in its data dir: the lock that keeps a second ``up`` out,
and ``run.json`` (HTTP address + API token) through which the CLI finds it."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


class DataDirBusy(RuntimeError):
    """Another ``lakelet up`` holds this data dir."""


@dataclass(frozen=True)
class RunInfo:
    pid: int
    http: str
    token: str


def run_file(data_dir: Path) -> Path:
    return data_dir / "run.json"


class DataDirLock:
    """An exclusive ``flock`` on ``<data-dir>/lakelet.lock``, held for the life of ``up``.

    The kernel drops the lock when the process dies, so a crash never leaves a stale lock."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lakelet.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusy(
                f"data dir {self.path.parent} is in use by another lakelet up (pid {holder}); "
                "stop it first or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_run_info(data_dir: Path, http: str) -> RunInfo:
    info = RunInfo(pid=os.getpid(), http=http, token=secrets.token_urlsafe(24))
    path = run_file(data_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info.__dict__, f)
    os.replace(tmp, path)
    return info


def read_run_info(data_dir: Path) -> RunInfo | None:
    try:
        raw = json.loads(run_file(data_dir).read_text())
        return RunInfo(pid=int(raw["pid"]), http=str(raw["http"]), token=str(raw["token"]))
    except (OSError, ValueError, KeyError):
        return None


def remove_run_info(data_dir: Path) -> None:
    try:
        run_file(data_dir).unlink()
    except FileNotFoundError:
        pass
