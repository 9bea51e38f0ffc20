"""A point in time by timestamp through the commit index gives exactly what reading every commit
of the history gives — cold, warm, after more WAL, and across a branch point — and a warm index
reads only the segments it has not seen."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from storage import wal
from storage.commits import CommitIndex
from tests.storage.conftest import Lake, branch_at_head, sql, suspend_all

# ~48 KB of incompressible text per commit, so commits spread over the store's 1 MB segments.
WIDE_ROW = "INSERT INTO spread SELECT $1, string_agg(md5(random()::text), '') FROM generate_series(1, 1500)"


async def _commit_some(lake: Lake, branch: str, first: int, count: int) -> None:
    for n in range(first, first + count):
        await sql(lake, branch, WIDE_ROW, n)
        if n % 2 == 0:
            await sql(lake, branch, "SELECT pg_switch_wal()")  # more segments, more boundaries


def _reference(lake: Lake, branch: str, when: datetime) -> int | None:
    """The answer from every commit record of the history, read in full."""
    row = lake.store.catalog.branch_by_name(branch)
    assert row is not None
    commits = [r for r in lake.store._records(row) if r.commit_time is not None and r.commit_time <= when]
    return commits[-1].lsn if commits else None


def _moments(lake: Lake, branch: str) -> list[datetime]:
    """Every commit time of the history, a microsecond either side, and the gaps between them."""
    row = lake.store.catalog.branch_by_name(branch)
    assert row is not None
    times = sorted(r.commit_time for r in lake.store._records(row) if r.commit_time is not None)
    us = timedelta(microseconds=1)
    out = [t + d for t in times for d in (-us, timedelta(0), us)]
    out += [a + (b - a) / 2 for a, b in zip(times, times[1:], strict=False)]
    return out


def _indexed(lake: Lake, branch: str, when: datetime) -> int | None:
    row = lake.store.catalog.branch_by_name(branch)
    assert row is not None
    return lake.store.commits.last_commit(lake.store._pieces(row), when)


async def test_commit_index_agrees_with_a_full_read(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    await sql(lake, "main", "CREATE TABLE spread (n int, pad text)")
    await _commit_some(lake, "main", 1, 24)
    moments = _moments(lake, "main")
    assert len(moments) > 60
    cold = [_indexed(lake, "main", t) for t in moments]
    assert cold == [_reference(lake, "main", t) for t in moments]
    assert sum(lsn is not None for lsn in cold) > 40

    # Warm, and as after a restart (a new index over the same file): the same answer, reading a
    # few segments (the unfinished tail and one candidate) instead of all of them.
    store = lake.store
    reopened = CommitIndex(store.pg, store.user, store.commits.seg_size, store.root / "commits.db")
    reopened.readable = store.readable_wal  # (as Store wires it: segments may be in a bucket only)
    monkeypatch.setattr(store, "commits", reopened)
    reads: list[int] = []
    real_scan = wal.scan

    def counting_scan(*args: object, **kw: object) -> list[wal.WalRecord]:
        reads.append(len(args[2]))  # type: ignore[arg-type]
        return real_scan(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(wal, "scan", counting_scan)
    middle = len(moments) // 2
    assert _indexed(lake, "main", moments[middle]) == cold[middle]
    segments = len(lake.store.wal_files(1))
    assert segments >= 12 and sum(reads) <= 6, (reads, segments)
    monkeypatch.undo()
    reopened.close()

    # More WAL after the index was built, then a child branch that carries on from main's head.
    await _commit_some(lake, "main", 100, 8)
    await branch_at_head(lake, "spread-child", "main")
    await _commit_some(lake, "spread-child", 200, 8)
    await _commit_some(lake, "main", 300, 4)  # main moves on; the child's history must not see it
    for branch in ("main", "spread-child"):
        moments = _moments(lake, branch)
        assert [_indexed(lake, branch, t) for t in moments] == [_reference(lake, branch, t) for t in moments]
    await asyncio.to_thread(lake.store.gc)  # forgets what it deleted; answers stay the same
    moments = _moments(lake, "spread-child")
    assert [_indexed(lake, "spread-child", t) for t in moments] == \
        [_reference(lake, "spread-child", t) for t in moments]
    await suspend_all(lake)
