"""Lakehouse sync inside ``lakelet up``: which syncs are enabled, a worker process per sync while
its branch's compute is active, the drain before a compute stops, status and metrics.

- **Never wakes a compute on its own.** A suspended compute writes nothing, so there is nothing to
  sync; the supervisor starts a worker only while ``Endpoints.active_node`` has one, and the
  worker's replication connection is a ``walsender``, which the idle timer does not count. Only
  ``enable`` and ``disable`` (a user's request) wake the branch.
- **Drain before stop.** ``Endpoints.on_before_stop`` calls ``_drain``: it reads the end of WAL
  and waits until the worker has committed and confirmed everything through it, so the slot that
  is kept with the stopped compute starts exactly where Delta ends.
- **State survives restarts.** The enabled syncs are ``<state_root>/syncs.json``; each sync's
  worker keeps its own ``progress.json``/``status.json`` beside it; the Delta log holds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from compute import Endpoints
from compute.node import ComputeNode
from lakehouse import location
from lakehouse.syncer import SyncSpec, parse_lsn, slot_name
from storage import ADMIN_ROLE, BranchNotFound, Store

log = logging.getLogger("lakelet.lakehouse")

SUPERVISE_EVERY = 0.5
DRAIN_TIMEOUT = 25.0
BRANCH_CHECK_EVERY = 5.0
REPO = Path(__file__).resolve().parent.parent
NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_")


class SyncError(ValueError):
    """A sync request Lakelet cannot carry out; the message says why and what to do."""


@dataclass
class SyncConfig:
    branch: str
    schema: str
    database: str = "postgres"
    tables: list[str] | None = None
    uri: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.branch, self.database, self.schema)


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.lag = Gauge("lakelet_lakehouse_sync_lag_seconds",
                         "Seconds the oldest change not yet in Delta has waited (0 when caught up)",
                         ["branch", "table"], **kw)
        self.rows = Counter("lakelet_lakehouse_sync_rows", "History rows written to Delta",
                            ["branch", "table"], **kw)
        self.bytes = Counter("lakelet_lakehouse_sync_bytes", "Bytes of Arrow data written to Delta",
                             ["branch", "table"], **kw)


class _Run:
    """One worker process and what the metrics have already counted of it. Until the worker
    streams (its start, a snapshot), it holds the compute awake like a session (``hold``)."""

    def __init__(self, proc: asyncio.subprocess.Process, spec: SyncSpec, hold: contextlib.ExitStack) -> None:
        self.proc = proc
        self.spec = spec
        self.counted: dict[str, tuple[int, int]] = {}
        self.hold = hold


class LakehouseSync:
    def __init__(self, endpoints: Endpoints, store: Store, *, state_root: Path, default_uri: str,
                 registry: CollectorRegistry | None = None,
                 flush_interval: float = 0.25) -> None:
        self.endpoints = endpoints
        self.store = store
        self.state_root = state_root
        self.default_uri = default_uri
        self.flush_interval = flush_interval
        self.metrics = SyncMetrics(registry)
        self.syncs: dict[tuple[str, str, str], SyncConfig] = {}
        self.runs: dict[tuple[str, str, str], _Run] = {}
        self.failures: dict[tuple[str, str, str], str] = {}
        # A worker that crashed is restarted after a growing pause (not in a hot loop).
        self.backoff: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._checked: dict[tuple[str, str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._tick_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.state_root.mkdir(parents=True, exist_ok=True)
        for item in await asyncio.to_thread(self._load):
            cfg = SyncConfig(**item)
            self.syncs[cfg.key] = cfg
            self.endpoints.require_logical(cfg.branch)
        self.endpoints.on_before_stop(self._drain)
        self._task = asyncio.create_task(self._supervise(), name="lakehouse-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self._stop_run(k) for k in list(self.runs)), return_exceptions=True)

    def _load(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads((self.state_root / "syncs.json").read_text()))
        except FileNotFoundError:
            return []

    def _save(self) -> None:
        path = self.state_root / "syncs.json"
        tmp = path.with_name(".syncs.json.tmp")
        with open(tmp, "w") as f:
            json.dump([asdict(c) for c in self.syncs.values()], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def state_dir(self, cfg: SyncConfig) -> Path:
        return self.state_root / cfg.branch / cfg.database / cfg.schema

    # -- user actions -----------------------------------------------------------------------------

    async def enable(self, branch: str, schema: str, *, database: str = "postgres", tables: list[str] | None = None,
                     uri: str | None = None) -> dict[str, Any]:
        for what, name in [("schema", schema), ("database", database), *(("table", t) for t in tables or [])]:
            if not name or not set(name) <= NAME_OK:
                raise SyncError(f"{what} {name!r}: use lower-case letters, digits and underscores "
                                "(the Delta table path is built from it)")
        if not self.endpoints.has_branch(branch):
            raise SyncError(f"branch {branch!r} does not exist: create it first (lakelet branch create)")
        cfg = SyncConfig(branch, schema, database, sorted(set(tables)) if tables else None, uri or self.default_uri)
        try:  # a bucket that is not there or refuses the credentials: say so now, not in a worker log
            await asyncio.to_thread(location.check, cfg.uri)
        except location.LocationError as e:
            raise SyncError(str(e)) from None
        async with self._lock:
            old = self.syncs.get(cfg.key)
            if old is not None and old != cfg:
                raise SyncError(f"a sync of {database}.{schema} on branch {branch!r} is enabled with other settings: "
                                "disable it first")
        # The user asked: take the snapshot now (the compute is held awake until the worker runs,
        # which then holds it until it streams).
        with self.endpoints.signals(branch).held():
            node = await self.endpoints.node(branch)
            await self._check_source(node, cfg)
            async with self._lock:
                self.syncs[cfg.key] = cfg
                self.failures.pop(cfg.key, None)
                await asyncio.to_thread(self._save)
            self.endpoints.require_logical(branch)
            if node.settings.get("wal_level") != "logical":
                # wal_level is restart-only: a compute that was running without it restarts once now.
                log.info("restarting the compute with wal_level = logical for lakehouse sync",
                         extra={"branch": branch})
                await self.endpoints.suspend(branch)
                await self.endpoints.node(branch)
            await self._tick()
        return self.status_of(cfg)

    async def _check_source(self, node: ComputeNode, cfg: SyncConfig) -> None:
        """The database, schema and listed tables exist: a typo is refused at ``enable`` in one line."""
        import asyncpg

        try:
            conn = await asyncpg.connect(host=str(node.socket_dir), port=node.port, user=ADMIN_ROLE,
                                         database=cfg.database, timeout=30)
        except asyncpg.InvalidCatalogNameError:
            raise SyncError(f"database {cfg.database!r} does not exist on branch {cfg.branch!r}: "
                            "create it or pass another --database") from None
        try:
            if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", cfg.schema):
                raise SyncError(f"schema {cfg.schema!r} does not exist in database {cfg.database!r} on branch "
                                f"{cfg.branch!r}: create it first or pass another --schema")
            missing = await conn.fetchval(
                "SELECT string_agg(t, ', ') FROM unnest($1::text[]) t WHERE NOT EXISTS ("
                "  SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "  WHERE n.nspname = $2 AND c.relname = t AND c.relkind IN ('r', 'p'))", cfg.tables or [], cfg.schema)
            if missing:
                raise SyncError(f"no table {missing} in {cfg.database}.{cfg.schema} on branch {cfg.branch!r}: "
                                "create it first or leave it out of --tables")
        finally:
            await conn.close()

    async def disable(self, branch: str, schema: str | None = None, *, database: str | None = None) -> list[str]:
        """Stop the branch's syncs (of ``schema`` only, if given), drop their slots and publications.
        The Delta tables stay."""
        async with self._lock:
            keys = [k for k in self.syncs if k[0] == branch and schema in (None, k[2])
                    and database in (None, k[1])]
            if not keys:
                raise SyncError(f"no lakehouse sync is enabled on branch {branch!r}"
                                + (f" for schema {schema!r}" if schema else ""))
            for key in keys:
                await self._stop_run(key)
                cfg = self.syncs.pop(key)
                self.failures.pop(key, None)
                await self._drop_slot(cfg)
                await asyncio.to_thread(shutil.rmtree, self.state_dir(cfg), True)
            if not any(k[0] == branch for k in self.syncs):
                self.endpoints.require_logical(branch, False)  # from the compute's next start
            await asyncio.to_thread(self._save)
        return [f"{k[1]}.{k[2]}" for k in keys]

    async def _drop_slot(self, cfg: SyncConfig) -> None:
        import asyncpg

        try:
            node = await self.endpoints.node(cfg.branch)
            slot = slot_name(self.store.get_branch(cfg.branch).id, cfg.database, cfg.schema)
            conn = await asyncpg.connect(host=str(node.socket_dir), port=node.port, user=ADMIN_ROLE,
                                         database=cfg.database, timeout=10)
        except Exception as e:
            log.warning(f"lakehouse sync disabled, but its slot could not be dropped: {e}")
            return
        try:
            await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                               "WHERE slot_name = $1", slot)
            await conn.execute(f'DROP PUBLICATION IF EXISTS "{slot}"')
        finally:
            await conn.close()

    # -- status -----------------------------------------------------------------------------------

    def _read_status(self, cfg: SyncConfig) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir(cfg) / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def status_of(self, cfg: SyncConfig) -> dict[str, Any]:
        st = self._read_status(cfg)
        run = self.runs.get(cfg.key)
        running = run is not None and run.proc.returncode is None
        state = st.get("state", "starting")
        if cfg.key in self.failures:
            state = "error"
        elif not running and state not in ("error",):
            state = "waiting for compute" if self.endpoints.active_node(cfg.branch) is None else "starting"
        tables = {name: {k: t.get(k) for k in ("state", "error", "last_lsn", "rows", "lag_seconds", "note")}
                  for name, t in sorted(st.get("tables", {}).items())}
        return {"branch": cfg.branch, "database": cfg.database, "schema": cfg.schema, "tables_filter": cfg.tables,
                "uri": f"{cfg.uri.rstrip('/')}/{cfg.branch}/{cfg.database}/{cfg.schema}", "state": state,
                "error": self.failures.get(cfg.key) or st.get("error"), "slot": st.get("slot"),
                "confirmed_lsn": st.get("confirmed_lsn"), "snapshot_note": st.get("snapshot_note"), "tables": tables}

    def status(self, branch: str | None = None) -> list[dict[str, Any]]:
        return [self.status_of(c) for k, c in sorted(self.syncs.items()) if branch in (None, k[0])]

    # -- supervision ------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("lakehouse sync supervision failed; retrying")
            await asyncio.sleep(SUPERVISE_EVERY)

    async def _tick(self) -> None:
        """One supervision round; rounds never overlap (``enable`` runs one at once besides the loop's),
        so a sync never gets two workers racing for its slot and its Delta tables."""
        async with self._tick_lock:
            await self._tick_once()

    async def _tick_once(self) -> None:
        for key, cfg in list(self.syncs.items()):
            run = self.runs.get(key)
            if run is not None:
                state = await asyncio.to_thread(self._count, cfg, run)
                if run.proc.returncode is None:
                    if state == "streaming":
                        run.hold.close()  # from here on its connection is no client activity
                    continue
                run.hold.close()
                self.runs.pop(key, None)
                rc = run.proc.returncode
                if rc == 2:
                    self.failures[key] = self._read_status(cfg).get("error") or "the sync worker failed"
                elif rc not in (0, 3, -15):
                    n = self.backoff.get(key, (0, 0.0))[0] + 1
                    self.backoff[key] = (n, time.monotonic() + min(30.0, 0.5 * 2 ** n))
                    log.warning(f"lakehouse sync worker exited with code {rc}; restarting "
                                f"(see {self.state_dir(cfg) / 'worker.log'})", extra={"branch": cfg.branch})
                else:
                    self.backoff.pop(key, None)
            if key in self.failures or time.monotonic() < self.backoff.get(key, (0, 0.0))[1]:
                continue
            node = self.endpoints.active_node(cfg.branch)
            if node is None or node.stopping:
                await self._check_branch(key, cfg)
                continue
            try:
                self.runs[key] = await self._spawn(cfg, node)
            except BranchNotFound:
                self.failures[key] = f"branch {cfg.branch!r} no longer exists: disable this sync"

    async def _check_branch(self, key: tuple[str, str, str], cfg: SyncConfig) -> None:
        """A deleted branch's sync says so in status (checked every few seconds while inactive)."""
        now = time.monotonic()
        if now - self._checked.get(key, 0.0) < BRANCH_CHECK_EVERY:
            return
        self._checked[key] = now
        if not await asyncio.to_thread(self.endpoints.has_branch, cfg.branch):
            self.failures[key] = f"branch {cfg.branch!r} no longer exists: disable this sync"

    async def _spawn(self, cfg: SyncConfig, node: ComputeNode) -> _Run:
        branch_id = (await asyncio.to_thread(self.store.get_branch, cfg.branch)).id
        state = self.state_dir(cfg)
        spec = SyncSpec(branch=cfg.branch, database=cfg.database, schema=cfg.schema, tables=cfg.tables,
                        lakehouse_uri=cfg.uri, slot=slot_name(branch_id, cfg.database, cfg.schema),
                        host=str(node.socket_dir), port=node.port, user=ADMIN_ROLE, state_dir=str(state),
                        flush_interval=self.flush_interval)
        await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(spec.save, state / "spec.json")
        log_fd = os.open(state / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lakehouse.worker", str(state / "spec.json"),
                stdin=asyncio.subprocess.PIPE, stdout=log_fd, stderr=log_fd, cwd=str(REPO))
        finally:
            os.close(log_fd)
        log.info("lakehouse sync worker started", extra={"branch": cfg.branch, "schema": cfg.schema,
                                                         "pid": proc.pid})
        hold = contextlib.ExitStack()
        hold.enter_context(self.endpoints.signals(cfg.branch).held())
        return _Run(proc, spec, hold)

    def _count(self, cfg: SyncConfig, run: _Run) -> str | None:
        """Count the worker's progress into the metrics; returns its state."""
        st = self._read_status(cfg)
        if st.get("pid") != run.proc.pid:
            return None
        for name, t in st.get("tables", {}).items():
            label = (cfg.branch, f"{cfg.schema}.{name}")
            rows, nbytes = int(t.get("rows", 0)), int(t.get("bytes", 0))
            seen_rows, seen_bytes = run.counted.get(name, (0, 0))
            if rows > seen_rows:
                self.metrics.rows.labels(*label).inc(rows - seen_rows)
            if nbytes > seen_bytes:
                self.metrics.bytes.labels(*label).inc(nbytes - seen_bytes)
            run.counted[name] = (max(rows, seen_rows), max(nbytes, seen_bytes))
            self.metrics.lag.labels(*label).set(float(t.get("lag_seconds") or 0.0))
        return st.get("state")

    async def _stop_run(self, key: tuple[str, str, str]) -> None:
        run = self.runs.pop(key, None)
        if run is not None:
            run.hold.close()
        if run is None or run.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            run.proc.terminate()
        try:
            await asyncio.wait_for(run.proc.wait(), 20)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                run.proc.kill()
            await run.proc.wait()

    async def _drain(self, branch: str, node: ComputeNode) -> None:
        """Before ``node`` stops: every sync of the branch commits and confirms through the end of WAL."""
        runs = [(k, r) for k, r in self.runs.items() if k[0] == branch and r.proc.returncode is None]
        if not runs:
            return
        conn = await node.connect()
        try:
            target = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        finally:
            await conn.close()
        for _, run in runs:
            assert run.proc.stdin is not None
            run.proc.stdin.write(f"drain {target}\n".encode())
            with contextlib.suppress(ConnectionError):
                await run.proc.stdin.drain()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        pending = dict(runs)
        while pending and time.monotonic() < deadline:
            for key, run in list(pending.items()):
                st = await asyncio.to_thread(self._read_status, self.syncs[key]) if key in self.syncs else {}
                drained = st.get("drained_lsn")
                if run.proc.returncode is not None or (drained and parse_lsn(drained) >= parse_lsn(target)):
                    pending.pop(key)
            await asyncio.sleep(0.02)
        if pending:
            log.warning("lakehouse sync did not drain before the compute stopped; it resumes from the slot",
                        extra={"branch": branch, "target": target})
