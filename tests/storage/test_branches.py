"""Branches against real computes: a branch of a suspended parent, isolation both ways, branches
of branches, points in time, and bad input."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from storage import (
    BranchExists,
    BranchNotFound,
    HasChildren,
    InvalidName,
    InvalidTarget,
    ProtectedBranch,
    StorageError,
)
from tests.storage.conftest import Lake, branch_at_head, from_store_only, rows, sql, suspend_all


async def test_branch_of_a_suspended_parent_sees_its_rows(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE t (n int)")
    await sql(lake, "main", "INSERT INTO t SELECT generate_series(1, 5)")
    await lake.endpoints.suspend("main")
    # The parent is suspended: its head is its newest image, made on the clean shutdown.
    await asyncio.to_thread(lake.store.create_branch, "from-suspended", "main")
    assert await rows(lake, "from-suspended", "t") == [1, 2, 3, 4, 5]
    await lake.endpoints.suspend("from-suspended")
    # A child of that child, at its (suspended) head, after the grandparent moved on.
    await sql(lake, "main", "INSERT INTO t VALUES (6)")
    await asyncio.to_thread(lake.store.create_branch, "from-suspended-2", "from-suspended")
    assert await rows(lake, "from-suspended-2", "t") == [1, 2, 3, 4, 5]
    # And once more from the store alone, now that the parent's WAL runs past the image.
    await from_store_only(lake, "from-suspended-2")
    await asyncio.to_thread(lake.store.create_branch, "from-suspended-3", "from-suspended")
    assert await rows(lake, "from-suspended-3", "t") == [1, 2, 3, 4, 5]
    assert await rows(lake, "main", "t") == [1, 2, 3, 4, 5, 6]
    await suspend_all(lake)


async def test_branches_are_isolated_both_ways(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE iso (n int)")
    await sql(lake, "main", "INSERT INTO iso VALUES (1)")
    await branch_at_head(lake, "iso", "main")
    await sql(lake, "main", "INSERT INTO iso VALUES (2)")
    await sql(lake, "iso", "INSERT INTO iso VALUES (3)")
    await sql(lake, "iso", "CREATE TABLE iso_only (n int)")
    assert await rows(lake, "main", "iso") == [1, 2]
    assert await rows(lake, "iso", "iso") == [1, 3]
    assert await sql(lake, "main", "SELECT to_regclass('iso_only') IS NULL")
    # The same once both are rebuilt from the store.
    await from_store_only(lake, "main", "iso")
    assert await rows(lake, "iso", "iso") == [1, 3]
    assert await rows(lake, "main", "iso") == [1, 2]
    await suspend_all(lake)


async def test_branch_of_a_branch_to_depth_three(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE deep (n int)")
    await sql(lake, "main", "INSERT INTO deep VALUES (0)")
    parent = "main"
    for depth in (1, 2, 3):
        name = f"deep-{depth}"
        if depth == 2:
            await lake.endpoints.suspend(parent)  # one level from a suspended parent's image
        await branch_at_head(lake, name, parent)
        await sql(lake, name, f"INSERT INTO deep VALUES ({depth})")
        # After the branch point: the parent has it, the child does not.
        await sql(lake, parent, f"INSERT INTO deep VALUES ({depth * 10})")
        parent = name
    await from_store_only(lake, "main", "deep-1", "deep-2", "deep-3")
    assert await rows(lake, "deep-3", "deep") == [0, 1, 2, 3]
    assert await rows(lake, "deep-2", "deep") == [0, 1, 2, 30]
    assert await rows(lake, "deep-1", "deep") == [0, 1, 20]
    assert await rows(lake, "main", "deep") == [0, 10]
    await suspend_all(lake)


async def test_branch_of_a_branch_that_never_ran(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE lazy (n int)")
    await sql(lake, "main", "INSERT INTO lazy VALUES (1)")
    await branch_at_head(lake, "lazy", "main")
    await asyncio.to_thread(lake.store.create_branch, "lazy-child", "lazy")
    await sql(lake, "main", "INSERT INTO lazy VALUES (2)")
    assert await rows(lake, "lazy-child", "lazy") == [1]
    assert await rows(lake, "lazy", "lazy") == [1]
    await suspend_all(lake)


async def test_branch_at_a_timestamp_or_an_lsn_between_insert_and_delete(lake: Lake) -> None:
    await sql(lake, "main", "CREATE TABLE pitr (n int)")
    await sql(lake, "main", "INSERT INTO pitr VALUES (1)")
    # Read after the insert's commit, so strictly between its commit record and the delete's.
    moment = await sql(lake, "main", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                     "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    lsn = await sql(lake, "main", "SELECT pg_current_wal_lsn()::text")
    await sql(lake, "main", "DELETE FROM pitr")
    await sql(lake, "main", "INSERT INTO pitr VALUES (2)")
    await asyncio.to_thread(lake.store.create_branch, "pitr-time", "main", at=str(moment))
    await asyncio.to_thread(lake.store.create_branch, "pitr-lsn", "main", at=str(lsn))
    assert await rows(lake, "pitr-time", "pitr") == [1]
    assert await rows(lake, "pitr-lsn", "pitr") == [1]
    assert await rows(lake, "main", "pitr") == [2]
    # A point in time of a suspended parent resolves from the archive just the same.
    await suspend_all(lake)
    await asyncio.to_thread(lake.store.create_branch, "pitr-time-2", "main", at=str(moment))
    assert await rows(lake, "pitr-time-2", "pitr") == [1]
    await suspend_all(lake)


def _snapshot(lake: Lake) -> tuple[list[str], list[tuple[str, int]]]:
    """The catalog's content and every file of the store (SQLite's shared-memory index aside)."""
    dump = list(lake.store.catalog.db.iterdump())
    files = []
    for dirpath, _, names in os.walk(lake.store.root):
        for name in names:
            if not name.endswith("-shm"):
                path = os.path.join(dirpath, name)
                files.append((os.path.relpath(path, lake.store.root), os.path.getsize(path)))
    return dump, sorted(files)


async def test_bad_input_is_one_clear_line_and_writes_nothing(lake: Lake) -> None:
    await branch_at_head(lake, "has-kids", "main")
    await asyncio.to_thread(lake.store.create_branch, "kid", "has-kids")
    await suspend_all(lake)
    store = lake.store
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    too_old = (datetime.now(UTC) - timedelta(days=8)).isoformat()
    cases: list[tuple[type[StorageError], str, Callable[[], object]]] = [
        *[(InvalidName, repr(bad), lambda bad=bad: store.create_branch(bad, "main"))  # type: ignore[misc]
          for bad in ("", "Upper", "-lead", "_lead", "a" * 64, "has space", "dot.name", "ünï", "x/y")],
        (BranchExists, "'main'", lambda: store.create_branch("main", "main")),
        (BranchExists, "'kid'", lambda: store.create_branch("kid", "main")),
        (BranchNotFound, "'nope'", lambda: store.create_branch("fine", "nope")),
        (InvalidTarget, "future", lambda: store.create_branch("fine", "main", at=future)),
        (InvalidTarget, "retention window", lambda: store.create_branch("fine", "main", at=too_old)),
        (InvalidTarget, "ISO-8601", lambda: store.create_branch("fine", "main", at="yesterday-ish")),
        (InvalidTarget, "beyond the end", lambda: store.create_branch("fine", "main", at="FF/0")),
        (ProtectedBranch, "'main'", lambda: store.delete_branch("main")),
        (ProtectedBranch, "'main'", lambda: store.delete_branch("main", force=True)),
        (HasChildren, "--force", lambda: store.delete_branch("has-kids")),
        (BranchNotFound, "'nope'", lambda: store.delete_branch("nope")),
    ]
    before = _snapshot(lake)
    for error, mentions, call in cases:
        with pytest.raises(error) as caught:
            await asyncio.to_thread(call)
        message = str(caught.value)
        assert mentions in message and "\n" not in message, message
    assert _snapshot(lake) == before
    # With --force the whole subtree goes; main is untouched.
    await asyncio.to_thread(store.delete_branch, "has-kids", force=True)
    assert not {"has-kids", "kid"} & set(store.branch_names())
