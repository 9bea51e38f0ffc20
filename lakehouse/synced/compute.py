"""The one door synced tables use to reach a branch's compute: the control plane
(``compute.Endpoints``), for its branch set, its single-flight wake and its load signals.

A run holds the branch the way a client session does: counted as a session while it runs, so the
branch is not scaled to zero under it, and as activity when it ends. Between runs nothing is held:
a continuous sync whose source is idle lets the branch suspend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from compute import Endpoints, UnknownBranch
from storage import ADMIN_ROLE


class DatabaseMissing(RuntimeError):
    """The synced table's database does not exist on its branch."""


class BranchComputes:
    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    async def has_branch(self, branch: str) -> bool:
        """The control plane answers from memory (async here so a remote one can slot in)."""
        return self.endpoints.has_branch(branch)

    @asynccontextmanager
    async def connect(self, branch: str, database: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection as Lakelet's own role to ``database`` on ``branch``, waking it if needed."""
        if not await self.has_branch(branch):
            raise UnknownBranch(f"branch {branch!r} does not exist")
        with self.endpoints.signals(branch).held():
            addr = await self.endpoints.ensure_ready(branch)
            try:
                conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user=ADMIN_ROLE,
                                             database=database, timeout=30)
            except asyncpg.InvalidCatalogNameError:
                raise DatabaseMissing(f"database {database!r} does not exist on branch {branch!r}: create it "
                                      "first, or pass another --database") from None
            try:
                yield conn
            finally:
                await conn.close()
