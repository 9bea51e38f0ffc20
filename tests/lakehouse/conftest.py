"""Shared pieces of the lakehouse sync suites: one store with one compute per module, a syncer
run as a child process (so tests can kill -9 it), and Delta history read back with deltalake."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from deltalake import DeltaTable

from lakehouse.syncer import SyncSpec, slot_name
from storage.postgres import PgBinaries, ServiceUser
from tests.conftest import scratch_dir
from tests.storage.conftest import Lake, close_lake, open_lake

ADMIN = "lakelet_admin"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lake_root(service_user: ServiceUser) -> Iterator[Path]:
    with scratch_dir("lakelet-lakehouse-") as path:
        yield path


@pytest.fixture(scope="module")
async def lake(lake_root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[Lake]:
    opened = await open_lake(lake_root, service_user, pg)
    opened.endpoints.require_logical("main")  # the tests here run syncers without the manager
    yield opened
    await close_lake(opened)


async def connect(lake: Lake, branch: str = "main", database: str = "postgres") -> asyncpg.Connection:
    addr = await lake.endpoints.ensure_ready(branch)
    return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN, database=database)


def make_spec(lake: Lake, schema: str, *, branch: str = "main", tables: list[str] | None = None,
              database: str = "postgres", **kw: Any) -> SyncSpec:
    node = lake.endpoints.active_node(branch)
    assert node is not None, "wake the branch first"
    branch_id = lake.store.get_branch(branch).id
    state = lake.root / "sync-state" / branch / database / schema
    return SyncSpec(branch=branch, database=database, schema=schema, tables=tables,
                    lakehouse_uri=str(lake.root / "lakehouse"), slot=slot_name(branch_id, database, schema),
                    host=str(node.socket_dir), port=node.port, user=ADMIN, state_dir=str(state), **kw)


class Worker:
    """A syncer child process (``python -m lakehouse.worker``)."""

    def __init__(self, spec: SyncSpec) -> None:
        self.spec = spec
        Path(spec.state_dir).mkdir(parents=True, exist_ok=True)
        self.spec_path = Path(spec.state_dir) / "spec.json"
        spec.save(self.spec_path)
        self.log = open(Path(spec.state_dir) / "worker.log", "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([sys.executable, "-m", "lakehouse.worker", str(self.spec_path)],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, cwd=REPO)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((Path(self.spec.state_dir) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return (Path(self.spec.state_dir) / "worker.log").read_text(errors="replace")[-3000:]


async def wait_for(predicate: Any, what: str, timeout: float = 90.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"{what} did not happen in {timeout:.0f}s")


def history(spec: SyncSpec, table: str) -> list[dict[str, Any]]:
    """The table's Delta history, in change order."""
    uri = f"{spec.base_uri}/lb_{table}_history"
    if not DeltaTable.is_deltatable(uri):
        return []
    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["_sort_by"])


async def kill_while_writing(worker: Worker, spec: SyncSpec, writer: Any, kills: int, rng: random.Random) -> Worker:
    """Run ``writer.run(stop)`` and meanwhile kill -9 the syncer ``kills`` times at random moments,
    restarting it each time; half the kills land before the restarted worker is even streaming
    again. The writer is stopped (and awaited) before this returns the last worker."""
    stop = asyncio.Event()
    writing = asyncio.create_task(writer.run(stop))
    try:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.05, 0.8))
            worker.kill()
            assert not writing.done()
            worker = Worker(spec)
            if rng.random() < 0.5:
                await wait_for(lambda w=worker: w.status().get("state") == "streaming", "restart")
    finally:
        stop.set()
        await writing
    return worker


async def wait_lsn(worker: Worker, conn: asyncpg.Connection, timeout: float = 90.0) -> None:
    """Wait until the syncer confirmed everything committed so far (drain through the current LSN)."""
    target = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    worker.command(f"drain {target}")

    def drained() -> bool:
        st = worker.status()
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited {worker.proc.returncode}: {st}\n{worker.log_text()}")
        d = st.get("drained_lsn")
        return d is not None and _lsn(d) >= _lsn(target)

    await wait_for(drained, f"drain through {target}", timeout)


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class Writer:
    """Small random transactions on one table; ``expected`` is the history they must produce."""

    def __init__(self, conn: asyncpg.Connection, table: str, seed: int) -> None:
        self.conn = conn
        self.table = table
        self.rng = random.Random(seed)
        self.live: dict[int, str] = {}
        self.next_id = 1
        self.expected: list[tuple[str, int, str]] = []

    async def transaction(self) -> None:
        out: list[tuple[str, int, str]] = []
        async with self.conn.transaction():
            for _ in range(self.rng.randint(1, 4)):
                op = self.rng.random()
                if op < 0.5 or not self.live:
                    i, v = self.next_id, f"v{self.next_id}"
                    self.next_id += 1
                    await self.conn.execute(f"INSERT INTO {self.table} VALUES ($1, $2)", i, v)
                    self.live[i] = v
                    out.append(("insert", i, v))
                elif op < 0.8:
                    i = self.rng.choice(sorted(self.live))
                    old, new = self.live[i], self.live[i] + "+"
                    await self.conn.execute(f"UPDATE {self.table} SET v = $2 WHERE id = $1", i, new)
                    self.live[i] = new
                    out += [("update_preimage", i, old), ("update_postimage", i, new)]
                else:
                    i = self.rng.choice(sorted(self.live))
                    await self.conn.execute(f"DELETE FROM {self.table} WHERE id = $1", i)
                    out.append(("delete", i, self.live.pop(i)))
        self.expected += out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.transaction()
            await asyncio.sleep(self.rng.uniform(0, 0.01))
