"""The shell's side of the Data API: its configuration from Lakelet's, its listener in ``lakelet up``,
and the control-API route behind ``lakelet data-api url``. Kept here so the shared shell files only
carry a hook each."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web

from lakelet.config import Config, ConfigError, parse_hostport

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from compute import Endpoints
    from dataapi.workers import Workers

log = logging.getLogger("lakelet")


def data_api_config(config: Config):  # noqa: ANN201 - dataapi is imported lazily (the CLI stays fast)
    from dataapi import DataAPIConfig

    return DataAPIConfig(
        schemas=tuple(s.strip() for s in config.data_api_schemas.split(",") if s.strip()),
        anon_role=config.data_api_anon_role, jwt_secret=config.data_api_jwt_secret,
        jwt_role_claim=config.data_api_jwt_role_claim, max_rows=config.data_api_max_rows or None,
        pre_request=config.data_api_pre_request, pool_size=config.data_api_pool_size,
        idle_timeout=config.data_api_idle_timeout, jwt_aud=config.data_api_jwt_aud,
        plan_enabled=config.data_api_plan_enabled, tx_end=config.data_api_tx_end,
        cors_origins=config.data_api_cors_origins)


def worker_count(config: Config) -> int:
    """``data_api_workers``; 0 means one per CPU this process may run on."""
    return config.data_api_workers or len(os.sched_getaffinity(0))


async def start(config: Config, endpoints: Endpoints, registry: CollectorRegistry | None = None) -> Workers | None:
    """Start the Data API's worker processes on ``data_api`` when it is set; None when it is off."""
    if not config.data_api:
        return None
    from dataapi import ConfigError as AuthConfigError
    from dataapi.auth import Authenticator
    from dataapi.workers import Workers, WorkerStartError

    api_config = data_api_config(config)
    try:  # a bad secret is the user's to fix: one line here, not one per worker
        Authenticator(api_config.jwt_secret, api_config.anon_role or None, api_config.jwt_role_claim,
                      api_config.jwt_aud)
    except AuthConfigError as e:
        raise ConfigError(str(e)) from None
    host, port = parse_hostport(config.data_api, "data_api")
    workers = Workers(endpoints, api_config, worker_count(config), registry, log_format=config.log_format,
                      log_level=config.log_level)
    try:
        await workers.start(host, port)
    except WorkerStartError as e:
        log.error("the data API workers did not start; running without the data API: see the lines above "
                  "for the cause", extra={"data_api": config.data_api, "error": str(e)})
        return None
    except OSError as e:
        # The Postgres endpoint is the product; a busy HTTP port must not take it down with it.
        log.error("the data API could not listen; running without it: set data_api (--data-api) to a free "
                  "HOST:PORT, or empty to turn it off", extra={"data_api": config.data_api, "error": str(e)})
        await workers.close()
        return None
    log.info("data API is up", extra={"data_api": f"{host}:{workers.port}", "workers": workers.count})
    return workers


def base_url(config: Config, branch: str, database: str) -> str:
    host, port = parse_hostport(config.data_api, "data_api")
    host = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
    return f"http://{host}:{port}/{branch}/{database}/rest/v1/"


def url_route(config: Config, endpoints: Endpoints):  # noqa: ANN201
    async def handler(request: web.Request) -> web.Response:
        if not config.data_api:
            return web.json_response({"error": "the Data API is off: set data_api (or --data-api HOST:PORT) "
                                               "and restart lakelet up"}, status=409)
        branch = request.query.get("branch", "main")
        database = request.query.get("database", "postgres")
        if not endpoints.has_branch(branch):
            return web.json_response({"error": f"branch {branch!r} does not exist: lakelet branch list shows "
                                               "the branches"}, status=404)
        return web.json_response({"url": base_url(config, branch, database), "branch": branch,
                                  "database": database})
    return handler
