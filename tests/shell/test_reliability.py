"""``lakelet up`` as an adversary meets it: the data dir is private, a killed ``up`` leaves no
process behind once restarted, a deleted branch leaves no compute dir, and a taken port is
explained."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from lakelet import ports
from tests.conftest import scratch_dir
from tests.shell.lakelet_process import Lakelet, cli, password_of

NOBODY = 65534




def naming(path: Path) -> list[tuple[int, str]]:
    """Processes whose command line names ``path`` (a postmaster's -D, a receiver's -D)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmd and "pytest" not in cmd:
                out.append((int(entry), cmd.strip()))
    return out


def as_user(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def data_root() -> Iterator[Path]:
    with scratch_dir("lakelet-rel-") as path:
        yield path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_private_store_no_orphans_no_leftovers(data_root: Path) -> None:
    data_dir = data_root / "data"
    server = Lakelet(data_dir, extra_args=["--suspend-timeout", "600"])
    server.start()
    try:
        password = password_of(data_dir)
        with psycopg.connect(server.dsn("lakelet", password)) as conn:
            conn.execute("CREATE TABLE secret AS SELECT 'hunter2' AS s")
        cli("branch", "create", "doomed", data_dir=data_dir, check=True)
        with psycopg.connect(server.dsn("lakelet", password, branch="doomed")) as conn:
            assert conn.execute("SELECT s FROM secret").fetchone() == ("hunter2",)

        # 1. Nobody else reads anything: not a file list, not a byte.
        walk = as_user(NOBODY, NOBODY, "find", str(data_dir), "-readable", "-type", "f")
        assert walk.stdout == "" and "Permission denied" in walk.stderr
        grep = as_user(NOBODY, NOBODY, "grep", "-rl", "hunter2", str(data_dir))
        assert grep.stdout == ""
        # Nor does the shared postgres OS user (other clusters run as it) reach the computes.
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pg_user = None
        if pg_user is not None:
            sock = data_dir / "computes" / "main" / "socket"
            psql = as_user(pg_user.pw_uid, pg_user.pw_gid, "/usr/lib/postgresql/15/bin/psql", "-h", str(sock),
                           "-U", "lakelet_admin", "-d", "postgres", "-Atc", "SELECT 1")
            assert psql.returncode != 0 and psql.stdout == "", psql.stdout
        # Even the compute user cannot read the catalog (verifiers) or the packs (rows).
        svc = pwd.getpwnam("lakelet")
        for target in ("store/catalog.db", "store/pages.db", "store/objects"):
            read = as_user(svc.pw_uid, svc.pw_gid, "ls", "-l", str(data_dir / target))
            cat = as_user(svc.pw_uid, svc.pw_gid, "cat", str(data_dir / target))
            assert cat.returncode != 0 or read.returncode != 0, target

        # 2. kill -9 of lakelet up leaves its computes running (own sessions)...
        server.kill()
        orphans = naming(data_dir)
        assert any("postgres" in cmd for _, cmd in orphans), orphans
        # ... and a store made readable meanwhile is made private again at the next start.
        os.chmod(data_dir / "store" / "catalog.db", 0o644)
        os.chmod(data_dir / "store" / "objects", 0o755)
        server.start()
        for pid, cmd in orphans:
            assert not Path(f"/proc/{pid}").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes(), cmd
        assert stat.S_IMODE((data_dir / "store" / "catalog.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "store" / "objects").stat().st_mode) == 0o700
        with psycopg.connect(server.dsn("lakelet", password, branch="doomed")) as conn:
            assert conn.execute("SELECT s FROM secret").fetchone() == ("hunter2",)

        # 3. delete removes the branch's compute dir.
        assert (data_dir / "computes" / "doomed").is_dir()
        cli("branch", "delete", "doomed", data_dir=data_dir, check=True)
        assert not (data_dir / "computes" / "doomed").exists()
        assert server.stop() == 0
    finally:
        server.kill()
    # 4. After a clean stop, nothing names the data dir.
    deadline = time.monotonic() + 30
    while naming(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert naming(data_dir) == []


def test_a_taken_port_is_explained() -> None:
    span = ports.ephemeral_range()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        async def start() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))

        with pytest.raises(ports.BindError) as e:
            asyncio.run(ports.listen("Postgres clients", "127.0.0.1", port, "--listen", start))
        message = str(e.value)
        assert f"cannot listen on 127.0.0.1:{port} for Postgres clients" in message
        assert message.endswith("choose another with --listen") and "\n" not in message
        if span is not None and span[0] <= port <= span[1]:
            assert "ephemeral range" in message
    finally:
        taken.close()


def test_status_says_why_a_branch_failed_or_waits() -> None:
    """The CLI's status table is followed by one line per failed start and per durability stall
    (what /api/v1/endpoints reports)."""
    from lakelet.cli import _status

    class Answer:
        def call(self, method: str, path: str) -> dict:
            assert (method, path) == ("GET", "/api/v1/endpoints")
            row = {"cu": 0, "pid": None, "host": None, "port": None, "connections": 0}
            return {"endpoints": [
                {**row, "branch": "main", "state": "failed", "reason": "could not start: disk",
                 "durability_stalled": None},
                {**row, "branch": "dev", "state": "active", "reason": None, "durability_stalled": "receiver exits"},
                {**row, "branch": "ok", "state": "suspended", "reason": None, "durability_stalled": None},
            ]}

    _, text = _status(Answer(), None)  # type: ignore[arg-type]
    lines = text.splitlines()
    assert lines[-2:] == ["main: failed: could not start: disk", "dev: durability stalled: receiver exits"]
    assert not any(line.startswith("ok:") for line in lines)
