"""Control API routes for lakehouse sync: parse → call ``lakehouse.manager.LakehouseSync`` → JSON.

    GET    /api/v1/lakehouse-sync[?branch=B]           status of every sync (of one branch)
    POST   /api/v1/lakehouse-sync                      {"branch", "schema", "database"?, "tables"?, "uri"?}
    DELETE /api/v1/lakehouse-sync/{branch}[?schema=S]  disable (drops the slot; Delta tables stay)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from lakehouse.manager import LakehouseSync, SyncError


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class LakehouseRoutes:
    def __init__(self, sync: LakehouseSync) -> None:
        self.sync = sync

    def add(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/lakehouse-sync", self.status)
        router.add_post("/api/v1/lakehouse-sync", self.enable)
        router.add_delete("/api/v1/lakehouse-sync/{branch}", self.disable)

    async def status(self, request: web.Request) -> web.Response:
        branch = request.query.get("branch")
        if branch is not None and not self.sync.endpoints.has_branch(branch):
            return _error(404, f"branch {branch!r} does not exist")
        return _json({"syncs": self.sync.status(branch)})

    async def enable(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body must be a JSON object")
        if not isinstance(body, dict) or not body.get("branch") or not body.get("schema"):
            return _error(400, 'give "branch" and "schema" (and optionally "database", "tables", "uri")')
        unknown = sorted(set(body) - {"branch", "schema", "database", "tables", "uri"})
        if unknown:
            return _error(400, f"unknown field {unknown[0]!r}: give \"branch\", \"schema\" and optionally "
                               '"database", "tables", "uri"')
        tables = body.get("tables")
        if tables is not None and not (isinstance(tables, list) and all(isinstance(t, str) for t in tables)):
            return _error(400, '"tables" must be a list of table names')
        try:
            out = await self.sync.enable(str(body["branch"]), str(body["schema"]),
                                         database=str(body.get("database") or "postgres"), tables=tables or None,
                                         uri=body.get("uri") or None)
        except SyncError as e:
            return _error(409 if "disable it first" in str(e) else 400, str(e))
        return _json(out, 201)

    async def disable(self, request: web.Request) -> web.Response:
        try:
            done = await self.sync.disable(request.match_info["branch"], request.query.get("schema"))
        except SyncError as e:
            return _error(404, str(e))
        return _json({"branch": request.match_info["branch"], "disabled": done})
