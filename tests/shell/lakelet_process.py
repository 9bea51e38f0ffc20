"""Run ``lakelet up`` as a real child process, the way a user does, and talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lakelet.client import wait_healthy
from tests.conftest import scratch_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, data_dir: Path, check: bool = False, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "lakelet.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lakelet {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def cli_json(*args: str, data_dir: Path) -> dict:
    return json.loads(cli(*args, "--json", data_dir=data_dir, check=True).stdout)


@dataclass
class Lakelet:
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 120) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-up-{time.time_ns()}.log"
        log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(self.data_dir),
             "--listen", f"127.0.0.1:{self.port}", "--http", f"127.0.0.1:{self.http_port}", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env},
        )
        proc = self.proc
        if wait_healthy(self.http_port, lambda: proc.poll() is None, timeout):
            return
        if proc.poll() is not None:
            raise AssertionError(f"lakelet up exited {proc.returncode}:\n{self.output()}")
        raise AssertionError(f"lakelet up not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def dsn(self, user: str, password: str, branch: str | None = None, **params: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} dbname=postgres user={user} password={password}",
                 "sslmode=disable"]
        if branch:
            parts.append(f"options=endpoint={branch}")
        parts += [f"{k}={v}" for k, v in params.items()]
        return " ".join(parts)


def password_of(data_dir: Path) -> str:
    """The ``lakelet`` role's password, which ``up`` printed once and keeps in the credentials file."""
    found = re.search(r"^password=(.*)$", (data_dir / "credentials").read_text(), re.M)
    assert found is not None, f"no password in {data_dir / 'credentials'}"
    return found.group(1)


@contextmanager
def running(prefix: str, *extra_args: str) -> Iterator[Lakelet]:
    """A ``lakelet up`` in a scratch dir of its own (for a test module), with a generated password."""
    saved = os.environ.pop("LAKELET_PASSWORD", None)
    try:
        with scratch_dir(prefix) as root:
            server = Lakelet(root / "data", extra_args=list(extra_args))
            server.start()
            try:
                yield server
            finally:
                server.kill()
    finally:
        if saved is not None:
            os.environ["LAKELET_PASSWORD"] = saved
