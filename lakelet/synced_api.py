"""Control API routes for synced tables: parse → call ``SyncedTables`` → JSON.

    GET    /api/v1/synced-tables[?branch=B]                  list
    POST   /api/v1/synced-tables                             create {source, branch, target, primary_key,
                                                                     mode, timeseries_key?, database?}
    GET    /api/v1/synced-tables/{name}?branch=B&database=D  status
    POST   /api/v1/synced-tables/{name}/refresh?…[&full=1]   run now
    DELETE /api/v1/synced-tables/{name}?…[&drop_table=1]     stop syncing (and drop the table)
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from lakehouse.synced.applier import SchemaChangeError
from lakehouse.synced.changes import DuplicateKey
from lakehouse.synced.compute import DatabaseMissing
from lakehouse.synced.service import AlreadyExists, NotFound, SyncedTables
from lakehouse.synced.source import SourceError
from lakehouse.synced.spec import DEFAULT_DATABASE, SpecError, SyncedTableSpec
from lakehouse.synced.target import TargetError

Handler = Callable[[web.Request], Awaitable[web.Response]]

# The user's mistakes (400), a missing thing (404) or a name taken (409); the rest is the control
# API's usual mapping (a compute that cannot wake is 503, anything else 500).
_STATUS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = [
    (NotFound, 404), (AlreadyExists, 409),
    ((SpecError, SourceError, TargetError, DuplicateKey, SchemaChangeError, DatabaseMissing), 400),
    (asyncpg.PostgresError, 400),
]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


def _errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except Exception as e:
            for kinds, status in _STATUS:
                if isinstance(e, kinds):
                    return _json({"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__},
                                 status)
            raise
    return wrapped


def _where(request: web.Request) -> tuple[str, str, str]:
    q = request.query
    return q.get("branch", "main"), q.get("database", DEFAULT_DATABASE), request.match_info["name"]


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "") in ("1", "true", "yes")


class SyncedTablesAPI:
    def __init__(self, service: SyncedTables) -> None:
        self.service = service

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/v1/synced-tables", _errors(self.list))
        r.add_post("/api/v1/synced-tables", _errors(self.create))
        r.add_get("/api/v1/synced-tables/{name}", _errors(self.status))
        r.add_post("/api/v1/synced-tables/{name}/refresh", _errors(self.refresh))
        r.add_delete("/api/v1/synced-tables/{name}", _errors(self.delete))

    async def list(self, request: web.Request) -> web.Response:
        return _json({"synced_tables": self.service.list(request.query.get("branch"))})

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise SpecError("request body is not JSON") from None
        if not isinstance(body, dict):
            raise SpecError("request body must be a JSON object")
        spec = SyncedTableSpec.make(
            source=str(body.get("source") or ""), branch=str(body.get("branch") or "main"),
            target=str(body.get("target") or ""), primary_key=body.get("primary_key") or "",
            mode=str(body.get("mode") or ""), timeseries_key=body.get("timeseries_key") or None,
            database=body.get("database") or None)
        return _json(await self.service.create(spec), 201)

    async def status(self, request: web.Request) -> web.Response:
        return _json(await self.service.status(*_where(request)))

    async def refresh(self, request: web.Request) -> web.Response:
        return _json(await self.service.refresh(*_where(request), full=_flag(request, "full")))

    async def delete(self, request: web.Request) -> web.Response:
        return _json(await self.service.delete(*_where(request), drop_table=_flag(request, "drop_table")))
