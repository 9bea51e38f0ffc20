"""Exactly once, tested by killing: random Delta change sequences, each synced by a child process
that is SIGKILLed after a random number of executed lines of ``lakehouse/synced`` code. After
every kill and every finished run, the Postgres table equals the Delta table at the version
recorded beside it; at the end, at the latest version."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute import ComputeAddress, EndpointConfig, Endpoints
from lakehouse.synced import target
from lakehouse.synced.spec import SyncedTableSpec
from storage import Store
from storage.postgres import PgBinaries, ServiceUser
from tests.lakehouse.synced_support import admin, assert_equal_at_recorded_version, write

REPO = Path(__file__).resolve().parents[2]
COLS = ["id", "v", "n"]
names = itertools.count()
OUTCOMES: list[tuple[int, str]] = []


@pytest.fixture(scope="module")
async def addr(root: Path, service_user: ServiceUser, pg: PgBinaries) -> AsyncIterator[ComputeAddress]:
    store = Store.open(root / "store", user=service_user, pg=pg)
    store.bootstrap()
    eps = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg,
                    config=EndpointConfig(suspend_timeout=600))
    await eps.start()
    yield await eps.ensure_ready("main")
    await eps.close()
    store.close()


def run_child(addr: ComputeAddress, spec: SyncedTableSpec, kill_after: int) -> int:
    """Exit status of one run: 0 when it finished, -9 when it was killed."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lakehouse.synced_child", addr.socket_dir, str(addr.port),
         json.dumps(spec.to_json()), str(kill_after)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    OUTCOMES.append((proc.returncode, proc.stdout.strip()))
    return proc.returncode


async def check(addr: ComputeAddress, spec: SyncedTableSpec) -> int | None:
    conn = await admin(addr)
    try:
        await target.ensure_setup(conn)
        if await target.read_applied(conn, spec.name) is None:
            # Killed before the first snapshot committed: nothing may be visible at all.
            assert not await target.table_exists(conn, spec.schema, spec.table)
            return None
        return await assert_equal_at_recorded_version(conn, spec, COLS)
    finally:
        await conn.close()


ids = st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True)
op = st.one_of(
    st.tuples(st.just("append"), ids), st.tuples(st.just("update"), ids), st.tuples(st.just("delete"), ids),
    st.tuples(st.just("merge"), ids), st.tuples(st.just("overwrite"), ids),
)


def apply(uri: Path, kind: str, keys: list[int], step: int, unique: bool) -> None:
    batch = pa.table({"id": pa.array(keys, pa.int64()), "v": [f"s{step}-{k}" for k in keys],
                      "n": pa.array([step] * len(keys), pa.int32())})
    in_list = ", ".join(map(str, keys))
    if kind == "append" and not unique:  # a timeseries table takes more rows per key
        write(uri, batch)
    elif kind == "append":
        live = set(DeltaTable(str(uri)).to_pyarrow_table(columns=["id"]).column("id").to_pylist())
        fresh = [k for k in keys if k not in live]  # the source keeps its key unique
        if fresh:
            write(uri, batch.filter(pa.compute.is_in(batch.column("id"), pa.array(fresh, pa.int64()))))
    elif kind == "update":
        DeltaTable(str(uri)).update(updates={"v": f"'u{step}'", "n": "n + 1"}, predicate=f"id IN ({in_list})")
    elif kind == "delete":
        DeltaTable(str(uri)).delete(f"id IN ({in_list})")
    elif kind == "merge":
        (DeltaTable(str(uri)).merge(batch, predicate="t.id = s.id", source_alias="s", target_alias="t")
         .when_matched_update_all().when_not_matched_insert_all().execute())
    else:
        write(uri, batch, mode="overwrite")


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=4), kills=st.lists(st.integers(1, 500), min_size=5, max_size=5),
       mode=st.sampled_from(["triggered", "triggered", "snapshot", "timeseries"]))
def test_killed_applier_neither_loses_nor_repeats(addr: ComputeAddress, root: Path, ops: list, kills: list,
                                                  mode: str) -> None:
    n = next(names)
    uri = root / f"delta{n}"
    write(uri, pa.table({"id": pa.array([1, 2, 3], pa.int64()), "v": ["a", "b", "c"],
                         "n": pa.array([0, 0, 0], pa.int32())}))
    spec = SyncedTableSpec.make(source=str(uri), branch="main", target=f"public.killed{n}", primary_key="id",
                                mode="triggered" if mode == "timeseries" else mode,
                                timeseries_key="n" if mode == "timeseries" else None)
    draws = iter(kills)
    for step, (kind, keys) in enumerate([("append", [])] + ops):
        if keys:
            apply(uri, kind, keys, step, unique=spec.timeseries_key is None)
        # Killed (maybe) somewhere in a run, then checked: equal at whatever version it recorded.
        run_child(addr, spec, next(draws))
        asyncio.run(check(addr, spec))
    assert run_child(addr, spec, 0) == 0
    assert asyncio.run(check(addr, spec)) == DeltaTable(str(uri)).version()


def test_the_kills_landed_inside_runs() -> None:
    """The test above is only worth something if it killed runs midway (a run is ~70-400 lines)."""
    killed = sum(1 for code, _ in OUTCOMES if code == -signal.SIGKILL)
    assert killed >= 20 and len(OUTCOMES) - killed >= 10, OUTCOMES
