"""The control API: ``/healthz``, ``/metrics`` and JSON under ``/api/v1/``.

It is the single source of truth for operations: the CLI is a thin client of it. Every error is
``{"error": "<one line>"}`` with a 4xx/5xx status. ``/api/v1`` needs the bearer token that ``up``
writes to ``<data-dir>/run.json`` (mode 0600), so only users who can read the data dir may act.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import storage
from compute import Endpoints, UnknownBranch, WakeError
from lakehouse.manager import LakehouseSync
from lakelet import dataapi_wiring, project
from lakelet.config import Config
from lakelet.lakehouse_api import LakehouseRoutes
from proxy import Proxy
from storage.bucket import upload_status

log = logging.getLogger("lakelet.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class ControlAPI:
    def __init__(self, *, config: Config, store: storage.Store, endpoints: Endpoints, proxy: Proxy,
                 registry: CollectorRegistry, token: str, lakehouse: LakehouseSync | None = None) -> None:
        self.config = config
        self.store = store
        self.endpoints = endpoints
        self.proxy = proxy
        self.registry = registry
        self.token = token
        self.lakehouse = lakehouse
        self.ready = False

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/v1/endpoints", self.list_endpoints)
        r.add_post("/api/v1/endpoints/{branch}/suspend", self.suspend)
        r.add_get("/api/v1/branches", self.list_branches)
        r.add_post("/api/v1/branches", self.create_branch)
        r.add_delete("/api/v1/branches/{name}", self.delete_branch)
        r.add_post("/api/v1/branches/{name}/reset", self.reset_branch)
        r.add_post("/api/v1/branches/{name}/restore", self.restore_branch)
        r.add_get("/api/v1/roles", self.list_roles)
        r.add_post("/api/v1/roles", self.create_role)
        r.add_get("/api/v1/connstr", self.connstr)
        r.add_get("/api/v1/data-api/url", dataapi_wiring.url_route(self.config, self.endpoints))
        if self.lakehouse is not None:
            LakehouseRoutes(self.lakehouse).add(r)
        return app

    # -- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return error(401, "missing or wrong API token: use the lakelet CLI with the same --data-dir "
                                  "(it reads the token from <data-dir>/run.json)")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return error(e.status, e.reason)
            raise
        except storage.BranchNotFound as e:
            return error(404, str(e))
        except (storage.BranchExists, storage.HasChildren, storage.ProtectedBranch) as e:
            return error(409, str(e))
        except (storage.StorageError, project.RoleError, UnknownBranch) as e:
            return error(400, str(e))
        except WakeError as e:
            return error(503, str(e))
        except Exception as e:  # one line for the user, the details in our log
            log.exception("control API request failed", extra={"path": request.path})
            return error(500, f"internal error: {e}")

    # -- health and metrics -------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return _json({"status": "starting"}, 503)
        stalled = self.endpoints.stalled()
        upload = upload_status(self.store)
        if upload is not None and upload["stalled"]:
            stalled = {**stalled, "store": upload["stalled"]}  # the bucket is behind: every branch waits
        if stalled:
            # Commits on these branches wait for the store: say so instead of "ok".
            return _json({"status": "degraded", "durability_stalled": stalled}, 503)
        return _json({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- endpoints ------------------------------------------------------------------------------

    async def list_endpoints(self, request: web.Request) -> web.Response:
        # connections: the proxy's own count (the control plane hands it the branch's one signals).
        return _json({"endpoints": [asdict(st) for st in self.endpoints.status()],
                      "store_upload": upload_status(self.store)})

    async def suspend(self, request: web.Request) -> web.Response:
        branch = request.match_info["branch"]
        await self.endpoints.suspend(branch)
        return _json({"branch": branch, "state": "suspended"})

    # -- branches -------------------------------------------------------------------------------

    @staticmethod
    def _branch_json(info: storage.BranchInfo) -> dict[str, Any]:
        b = info.branch
        return {
            "name": b.name, "id": b.id, "parent": b.parent, "parent_lsn": b.parent_lsn,
            "created_at": b.created_at.isoformat() if isinstance(b.created_at, datetime) else b.created_at,
            "logical_bytes": info.logical_bytes, "wal_bytes": info.wal_bytes, "images": info.images,
        }

    async def list_branches(self, request: web.Request) -> web.Response:
        infos, physical = await self.endpoints.list_branches()
        return _json({"branches": [self._branch_json(i) for i in infos], "store_physical_bytes": physical})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(reason="request body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="request body must be a JSON object")
        return body

    async def create_branch(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        branch = await self.endpoints.create_branch(body.get("name") or "", body.get("parent") or "main",
                                                    at=body.get("at"))
        return _json({"name": branch.name, "parent": branch.parent, "parent_lsn": branch.parent_lsn}, 201)

    async def delete_branch(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        force = request.query.get("force", "") in ("1", "true", "yes")
        await self.endpoints.delete_branch(name, force=force)
        return _json({"deleted": name})

    async def reset_branch(self, request: web.Request) -> web.Response:
        branch = await self.endpoints.reset_branch(request.match_info["name"])
        return _json({"name": branch.name, "parent": branch.parent, "parent_lsn": branch.parent_lsn})

    async def restore_branch(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        branch, backup = await self.endpoints.restore_branch(name, (await self._body(request)).get("at"))
        return _json({"name": branch.name, "parent_lsn": branch.parent_lsn, "backup": backup})

    # -- roles ----------------------------------------------------------------------------------

    async def list_roles(self, request: web.Request) -> web.Response:
        branch = request.query.get("branch", "main")
        roles = self.endpoints.roles(branch)
        return _json({"branch": branch, "roles": [
            {"name": name, "login": verifier is not None} for name, verifier in sorted(roles.items())
            if name not in project.RESERVED_ROLES
        ]})

    async def create_role(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = str(body.get("name") or "")
        branch = str(body.get("branch") or "main")
        password = body.get("password")
        generated = not password
        password = str(password) if password else secrets.token_urlsafe(18)
        project.check_role_name(name)
        self.endpoints.roles(branch)  # 404 for an unknown branch, before anything wakes
        await project.create_role(self.endpoints, branch, name, password)
        log.info("role created", extra={"branch": branch, "role": name})
        return _json({"name": name, "branch": branch, "password": password if generated else None}, 201)

    # -- connection strings ---------------------------------------------------------------------

    async def connstr(self, request: web.Request) -> web.Response:
        branch = request.query.get("branch", "main")
        self.endpoints.roles(branch)  # 404 for an unknown branch
        creds = project.read_credentials(self.config.data_dir)
        host, _ = self.config.listen_addr
        host = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
        user = creds.user if creds else project.LOGIN_ROLE
        auth = f"{quote(user)}:{quote(creds.password, safe='')}" if creds else quote(user)
        params = []
        ca = self.proxy.ca_file
        if ca is not None:
            params += ["sslmode=verify-full", f"sslrootcert={quote(str(ca))}"]
        else:
            params.append("sslmode=require")
        if branch != "main":
            params.append(f"options={quote(f'endpoint={branch}')}")
        url = f"postgresql://{auth}@{host}:{self.proxy.port}/postgres?" + "&".join(params)
        return _json({"branch": branch, "url": url, "ca_file": str(ca) if ca else None})
