"""The supervisor behind ``lakelet up``: wires store → computes → proxy → control API, and
takes them down in the reverse order on SIGTERM/SIGINT.

Start order matters: the store and the project exist before the proxy accepts anyone, and
``/healthz`` turns 200 only once the proxy does. Stop order matters too: the proxy stops accepting
first, then every compute shuts down cleanly (its image is taken), then the HTTP server goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

import storage
from compute import EndpointConfig, Endpoints
from lakehouse.manager import LakehouseSync
from lakehouse.synced.compute import BranchComputes
from lakehouse.synced.service import SyncedTables
from lakelet import dataapi_wiring, ports, project
from lakelet.api import ControlAPI
from lakelet.config import Config
from lakelet.rundir import DataDirLock, remove_run_info, write_run_info
from lakelet.synced_api import SyncedTablesAPI
from proxy import Proxy, ProxyConfig
from proxy.pooler import PoolConfig
from storage.bucket import open_store, parse_size
from storage.postgres import find_binaries, make_reachable, repair_tree, resolve_service_user

log = logging.getLogger("lakelet")

STOP_GRACE_SECONDS = 12.0


def prepare_data_dir(config: Config) -> Path:
    """Everything under the data dir is the service's alone: files we create are 0600 (umask
    077 for the whole process), and the data dir lets only the compute user pass through."""
    os.umask(0o077)
    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    config.data_dir = data_dir
    return data_dir


async def serve(config: Config) -> int:
    data_dir = prepare_data_dir(config)
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        return await _serve_locked(config, data_dir)
    finally:
        remove_run_info(data_dir)
        lock.release()


async def _serve_locked(config: Config, data_dir: Path) -> int:
    pg = find_binaries()
    user = resolve_service_user(config.user or None)
    make_reachable(data_dir, user)
    user.share_dir(data_dir)
    for entry in os.scandir(data_dir):
        if entry.name not in ("store", "computes"):  # (those two repair themselves at open)
            repair_tree(Path(entry.path))
    registry = CollectorRegistry()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lease_lost: list[str] = []  # with an s3:// store: another lakelet up took the bucket over

    def on_lease_lost(why: str) -> None:
        lease_lost.append(why)
        loop.call_soon_threadsafe(stop.set)

    store = await asyncio.to_thread(
        open_store, config.store_uri or None, config.store_dir, user=user, pg=pg,
        retention_days=config.retention_days, upload_interval=config.wal_upload_interval,
        cache_size=parse_size(config.cache_size), carry={
            "credentials": project.credentials_file(data_dir),
            **{f"tls/{name}": data_dir / "tls" / name for name in ("ca.crt", "server.crt", "server.key")}},
        on_lease_lost=on_lease_lost, registry=registry,
    )
    await asyncio.to_thread(store.bootstrap)
    endpoints = Endpoints(
        store, computes_dir=config.computes_dir, user=user, pg=pg, registry=registry,
        config=EndpointConfig(suspend_timeout=config.suspend_timeout, min_cu=config.min_cu,
                              max_cu=config.max_cu, durability=config.durability),
    )
    await endpoints.start()
    lakehouse = LakehouseSync(endpoints, store, state_root=data_dir / "lakehouse-sync",
                              default_uri=config.lakehouse, registry=registry)
    await lakehouse.start()
    host, port = config.listen_addr
    proxy = Proxy(endpoints, ProxyConfig(
        listen_host=host, listen_port=port, tls_dir=data_dir / "tls",
        tls_cert=Path(config.tls_cert) if config.tls_cert else None,
        tls_key=Path(config.tls_key) if config.tls_key else None,
        require_tls=config.require_tls, auth_timeout=config.auth_timeout,
        wake_timeout=config.wake_timeout, max_client_connections=config.max_client_connections,
        max_unauthenticated_per_address=config.max_unauthenticated_per_address,
        warm_backends=config.warm_backends,
        pool=PoolConfig(mode=config.pool_mode, size=config.pool_size, timeout=config.pool_timeout,
                        branch_size=config.pool_branch_size,
                        idle_transaction_timeout=config.pool_idle_transaction_timeout),
    ), registry=registry)

    synced = SyncedTables(BranchComputes(endpoints), data_dir / "synced_tables.json", registry)
    runner: web.AppRunner | None = None
    data_api = None
    collector: asyncio.Task[None] | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        created = await project.ensure_project(endpoints, data_dir, superuser=config.superuser)
        if created is not None:
            # Printed once, on first start; afterwards it is only in <data-dir>/credentials.
            print(f"lakelet: created project; login role {created.user!r} with password "
                  f"{created.password!r} (kept in {project.credentials_file(data_dir)})", flush=True)
        run = write_run_info(data_dir, config.http)
        api = ControlAPI(config=config, store=store, endpoints=endpoints, proxy=proxy,
                         registry=registry, token=run.token, lakehouse=lakehouse)
        web_app = api.app()
        SyncedTablesAPI(synced).install(web_app)
        runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await runner.setup()
        http_host, http_port = config.http_addr
        await ports.listen("the control API", http_host, http_port, "--http",
                           web.TCPSite(runner, http_host, http_port).start)
        await ports.listen("Postgres clients", host, port, "--listen", proxy.start)
        data_api = await dataapi_wiring.start(config, endpoints, registry)
        await synced.start()
        collector = asyncio.create_task(_collect_garbage(store, config.gc_interval), name="store-gc")
        api.ready = True
        log.info("lakelet is up", extra={"postgres": f"{host}:{proxy.port}", "http": config.http,
                                          "data_dir": str(data_dir)})
        await stop.wait()
        log.info("stopping")
    finally:
        if collector is not None:
            collector.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if data_api is not None:
            await data_api.close()
        await synced.close()
        await _shutdown(proxy, endpoints, runner, store, lakehouse)
    return 1 if lease_lost else 0


async def _collect_garbage(store: storage.Store, interval: float) -> None:
    """Retention: every ``interval`` seconds drop what no branch and no instant inside the window
    can need. A failed round is logged and retried next time; it never stops the server."""
    while True:
        await asyncio.sleep(interval)
        try:
            report = await asyncio.to_thread(store.gc)
        except Exception as e:
            log.warning("garbage collection failed; retrying next round", extra={"error": str(e)})
            continue
        if report.images_deleted or report.wal_files_deleted:
            log.info("garbage collected", extra={"images": report.images_deleted,
                                                 "wal_files": report.wal_files_deleted,
                                                 "bytes_freed": report.bytes_freed})


async def _shutdown(proxy: Proxy, endpoints: Endpoints, runner: web.AppRunner | None,
                    store: storage.Store, lakehouse: LakehouseSync) -> None:
    try:
        await asyncio.wait_for(proxy.close(), 2)
    except Exception:
        log.exception("proxy did not close cleanly")
    try:
        await asyncio.wait_for(endpoints.close(), STOP_GRACE_SECONDS)
    except Exception:
        log.exception("computes did not all stop cleanly; the store recovers them from WAL next start")
    await lakehouse.close()  # after the computes: each drained its sync before stopping
    if runner is not None:
        await runner.cleanup()
    store.close()


def run(config: Config) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(serve(config))
    if sys.version_info >= (3, 12):
        return uvloop.run(serve(config))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(config))
