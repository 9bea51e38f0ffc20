"""Per (branch, database): a pool of connections to the branch's compute, its schema cache, and the
listener that reloads it. The only module that talks to the compute room, through ``Computes`` —
the two calls the proxy uses too (``ensure_ready`` wakes a suspended branch, single flight;
``signals`` is where load is counted) — so the Data API can be re-pointed at another control plane
by changing this file alone.

Connections close when idle (the pool keeps none, and a database unused for ``idle_timeout``
seconds drops its listener and cache too), so a branch nobody queries still scales to zero. A
request in flight counts as a session in the branch's ``LoadSignals``, so the autoscaler sees HTTP
load and scale-to-zero waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from dataapi import pgwire, schema
from dataapi.errors import ApiError
from dataapi.schema import SchemaCache

log = logging.getLogger("lakelet.dataapi")
_Held = AbstractContextManager[None]   # a branch's LoadSignals session

ADMIN_ROLE = "lakelet_admin"  # the store's superuser role (storage.ADMIN_ROLE); requests SET ROLE away from it


class Address(Protocol):
    socket_dir: str
    port: int
    pid: int


class Signals(Protocol):
    bytes_in: int
    bytes_out: int

    def held(self) -> contextlib.AbstractContextManager[None]: ...


class NoSuchBranch(LookupError):
    """``Computes.ensure_ready``: the branch does not exist."""


class WakeFailed(Exception):
    """``Computes.ensure_ready``: the branch's compute could not be started."""


class Computes(Protocol):
    """What the Data API needs from the control plane: ``local.LocalComputes`` (the control plane
    in this process) and ``worker.RemoteComputes`` (over the link to ``lakelet up``) provide it.
    ``ensure_ready`` raises ``NoSuchBranch`` or ``WakeFailed``; ``known`` is the address already
    held, without asking (None: ask); ``forget`` says the address it gave for a branch did not
    answer (a cached one is dropped, so the next call asks again)."""

    async def ensure_ready(self, branch: str) -> Address: ...

    def signals(self, branch: str) -> Signals: ...

    def forget(self, branch: str) -> None: ...

    def known(self, branch: str) -> Address | None: ...


class Unreachable(ApiError):
    """No connection to the branch's compute could be opened, so no statement was sent: the
    request may be retried once against a fresh address (``DataAPI.handle`` does)."""


@dataclass(frozen=True)
class PoolSettings:
    size: int = 10
    idle_timeout: float = 60.0
    connect_timeout: float = 10.0


class Database:
    def __init__(self, branch: str, name: str, schemas: tuple[str, ...], settings: PoolSettings) -> None:
        self.branch = branch
        self.name = name
        self.schemas = schemas
        self.settings = settings
        self.pid: int | None = None
        self.pool: pgwire.Pool | None = None   # requests' connections (pipelined, dataapi/pgwire.py)
        self.cache: SchemaCache | None = None
        self.last_used = time.monotonic()
        self.in_flight = 0
        self._listener: asyncpg.Connection | None = None   # LISTEN pgrst, and the schema cache's queries
        self._lock = asyncio.Lock()
        self._loading = asyncio.Lock()   # the listener runs one query at a time
        self._reload: asyncio.Task[None] | None = None

    async def ready(self, address: Address) -> None:
        """Make sure the pool points at the compute now running (a restarted compute has a new pid)
        and the schema cache is loaded."""
        if self.pool is not None and self.pid == address.pid and self.cache is not None:
            return
        async with self._lock:
            if self.pool is not None and self.pid == address.pid:
                if self.cache is None:  # a failed reload: load again, keep the pool others are using
                    await self.reload()
                    if self.cache is None:
                        raise ApiError(503, "PGRST002", "Could not query the database for the schema cache",
                                       None, "Retry the request")
                return
            await self.close()
            try:
                self._listener = await asyncpg.connect(
                    host=address.socket_dir, port=address.port, user=ADMIN_ROLE, database=self.name,
                    timeout=self.settings.connect_timeout,
                    server_settings={"application_name": "lakelet-data-api-listener"})
                await _install_trigger(self._listener, self.branch, self.name)
                self.cache = await schema.load(self._listener, self.schemas)
                await self._listener.add_listener(schema.NOTIFY_CHANNEL, self._notified)
            except asyncpg.InvalidCatalogNameError:
                await self.close()
                raise ApiError(404, "3D000", f'database "{self.name}" does not exist', None,
                               f"Create it on branch {self.branch!r} first (CREATE DATABASE), or use an existing "
                               "database name in the URL") from None
            except (TimeoutError, OSError) as e:
                await self.close()
                raise Unreachable(503, "PGRST002", "Could not query the database for the schema cache", str(e),
                                  "The branch's compute may be restarting; retry the request") from None
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                await self.close()
                raise ApiError(503, "PGRST002", "Could not query the database for the schema cache", str(e),
                               "The branch's compute may be restarting; retry the request") from None
            self.pool = pgwire.Pool(
                f"{address.socket_dir}/.s.PGSQL.{address.port}", ADMIN_ROLE, self.name,
                size=self.settings.size, idle_timeout=self.settings.idle_timeout,
                connect_timeout=self.settings.connect_timeout, application_name="lakelet-data-api")
            self.pid = address.pid

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload.strip() in ("", "reload schema") and (self._reload is None or self._reload.done()):
            self._reload = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        """Load a fresh cache and swap it in whole; expire pooled connections so no prepared
        statement planned against the old shape of a table is reused."""
        listener = self._listener
        if listener is None or self.pool is None:
            return
        try:
            async with self._loading:
                await _install_trigger(listener, self.branch, self.name)
                fresh = await schema.load(listener, self.schemas)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("schema cache reload failed; it loads again on the next request",
                        extra={"branch": self.branch, "database": self.name, "error": str(e)})
            self.cache = None
            return
        self.cache = fresh
        self.pool.expire()
        log.info("schema cache reloaded", extra={"branch": self.branch, "database": self.name,
                                                 "tables": len(fresh.tables)})

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        pool, self.pool = self.pool, None
        self.cache = None
        self.pid = None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2)
            if not listener.is_closed():
                listener.terminate()
        if pool is not None:
            pool.close()

    @property
    def idle_since(self) -> float | None:
        return None if self.in_flight else self.last_used


async def _install_trigger(conn: asyncpg.Connection, branch: str, database: str) -> None:
    try:
        if await conn.fetchval(schema.INSTALLED_SQL):
            return  # installing is DDL, which would notify, which would reload: only when missing
        await conn.execute(schema.INSTALL_SQL)
    except asyncpg.PostgresError as e:
        log.warning("could not install the schema reload trigger; send NOTIFY pgrst, 'reload schema' after DDL",
                    extra={"branch": branch, "database": database, "error": str(e)})


class Databases:
    """Every (branch, database) the Data API has served, and the janitor that closes idle ones."""

    def __init__(self, computes: Computes, schemas: tuple[str, ...], settings: PoolSettings) -> None:
        self.computes = computes
        self.schemas = schemas
        self.settings = settings
        self._dbs: dict[tuple[str, str], Database] = {}
        self._janitor: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._close_idle(), name="data-api-janitor")

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await asyncio.gather(*(db.close() for db in self._dbs.values()), return_exceptions=True)
        self._dbs.clear()

    def use(self, branch: str, database: str, body_bytes: int = 0) -> _Use:
        """``async with databases.use(branch, database) as db``: wake the branch if needed and hold
        one unit of load on it for the request's duration (a session in its ``LoadSignals``: the
        autoscaler counts it, scale-to-zero waits for it)."""
        return _Use(self, branch, database, body_bytes)

    async def _enter(self, branch: str, database: str, body_bytes: int) -> tuple[Database, _Held]:
        try:
            address = self.computes.known(branch) or await self.computes.ensure_ready(branch)
        except NoSuchBranch:
            raise ApiError(404, "PGRST125", f"Invalid path specified in request URL: branch {branch!r} "
                           "does not exist", None, "lakelet branch list shows the branches") from None
        except WakeFailed as e:
            raise ApiError(503, "PGRST000", "Could not connect with the database", str(e),
                           "The branch's compute failed to start; retry, or see lakelet status") from None
        signals = self.computes.signals(branch)
        signals.bytes_in += body_bytes
        db = self._dbs.get((branch, database))
        if db is None:
            db = self._dbs[(branch, database)] = Database(branch, database, self.schemas, self.settings)
        db.in_flight += 1
        held = signals.held()
        held.__enter__()
        try:
            if db.pool is None or db.pid != address.pid or db.cache is None:  # else ready already
                await db.ready(address)
        except BaseException:
            self._leave(db, held)
            if db.pool is None and db.in_flight == 0:
                self._dbs.pop((branch, database), None)  # a wrong database name leaves nothing behind
            raise
        return db, held

    @staticmethod
    def _leave(db: Database, held: _Held) -> None:
        db.in_flight -= 1
        db.last_used = time.monotonic()
        held.__exit__(None, None, None)

    def forget(self, branch: str) -> None:
        """The branch's compute did not answer at the address it was given: ask again next time."""
        self.computes.forget(branch)

    def note_response(self, branch: str, nbytes: int) -> None:
        with contextlib.suppress(Exception):
            self.computes.signals(branch).bytes_out += nbytes

    async def _close_idle(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(10.0, self.settings.idle_timeout / 4)))
            now = time.monotonic()
            for key, db in list(self._dbs.items()):
                if db.pool is not None:
                    db.pool.prune()
                since = db.idle_since
                if since is not None and db.pool is not None and now - since >= self.settings.idle_timeout:
                    log.info("closing idle data API connections", extra={"branch": key[0], "database": key[1]})
                    await db.close()

    def get(self, branch: str, database: str) -> Database | None:
        return self._dbs.get((branch, database))


class _Use:
    """The context manager ``Databases.use`` returns (a class, not a generator: it is on every
    request)."""

    __slots__ = ("_dbs", "_args", "_entered")

    def __init__(self, dbs: Databases, branch: str, database: str, body_bytes: int) -> None:
        self._dbs = dbs
        self._args = (branch, database, body_bytes)
        self._entered: tuple[Database, _Held] | None = None

    async def __aenter__(self) -> Database:
        self._entered = await self._dbs._enter(*self._args)
        return self._entered[0]

    async def __aexit__(self, *exc: object) -> None:
        if self._entered is not None:
            Databases._leave(*self._entered)
            self._entered = None


__all__ = ["Computes", "Database", "Databases", "NoSuchBranch", "PoolSettings", "Unreachable", "WakeFailed"]
