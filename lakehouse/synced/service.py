"""The synced-tables service: definitions that survive restarts, runs on request, continuous
watchers, status and metrics. The CLI and the control API call it; nothing else writes a synced
table.

Where things live, and why:
- A definition (source, branch, target, key, mode) is a record in ``<data-dir>/synced_tables.json``:
  Lakelet needs the list at start, to watch continuous sources, without waking every branch.
- The truth about what a table holds is the ``lakelet_synced.applied`` row in the branch's own
  database, written in the transaction that changed the table (see ``target``). The definitions
  file keeps a copy of the last applied version only as a hint, so a watcher knows whether a
  source version is new without waking the branch; every run starts from the database's row.
- Branches follow from that: a child branch is a copy of its parent's database, so it has the
  synced table and its ``applied`` row as of the branch point, but no definition — it is not synced
  until someone creates one there, and then it continues incrementally from the inherited version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deltalake import DeltaTable
from prometheus_client import CollectorRegistry

from lakehouse.synced import source as src
from lakehouse.synced import target as tgt
from lakehouse.synced.applier import Retry, RunResult, SchemaChangeError, sync_once
from lakehouse.synced.compute import BranchComputes
from lakehouse.synced.metrics import SyncedMetrics
from lakehouse.synced.spec import Mode, SyncedTableSpec

log = logging.getLogger("lakelet.synced")

POLL_SECONDS = 0.5  # how often a continuous table looks at its source's log
LAG_POLL_SECONDS = 5.0  # how often the lag of a snapshot or triggered table is measured
MAX_BACKOFF_SECONDS = 30.0
UNREADABLE = "cannot read the source"


class NotFound(KeyError):
    """No synced table by that name on that branch and database."""

    def __str__(self) -> str:
        return str(self.args[0])


class AlreadyExists(ValueError):
    """A synced table by that name exists already."""


@dataclass
class Entry:
    """One synced table: its definition and what Lakelet last knew of it."""

    spec: SyncedTableSpec
    version: int | None = None
    commit_time: datetime | None = None
    rows: int | None = None
    null_keys: int = 0
    last_run: str | None = None
    last_run_at: datetime | None = None
    last_error: str | None = None
    fallback: str | None = None
    stopped: bool = False
    source_version: int | None = None
    lag_seconds: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None

    def hints(self) -> dict[str, Any]:
        return {"version": self.version, "commit_time": _iso(self.commit_time), "rows": self.rows,
                "null_keys": self.null_keys, "last_run": self.last_run, "last_run_at": _iso(self.last_run_at),
                "last_error": self.last_error, "fallback": self.fallback, "stopped": self.stopped}

    def status(self) -> dict[str, Any]:
        s = self.spec
        state = "stopped" if self.stopped else "error" if self.last_error else "ok"
        return {"name": s.name, "branch": s.branch, "database": s.database, "source": s.source, "mode": s.mode.value,
                "primary_key": list(s.primary_key), "timeseries_key": s.timeseries_key, "state": state,
                "version": self.version, "commit_time": _iso(self.commit_time), "source_version": self.source_version,
                "lag_seconds": self.lag_seconds, "rows": self.rows, "null_key_rows": self.null_keys,
                "last_run": self.last_run, "last_run_at": _iso(self.last_run_at), "last_error": self.last_error,
                "fallback": self.fallback}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _time(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class SyncedTables:
    def __init__(self, computes: BranchComputes, path: Path, registry: CollectorRegistry | None = None) -> None:
        self.computes = computes
        self.path = path
        self.metrics = SyncedMetrics(registry)
        self._entries: dict[tuple[str, str, str], Entry] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for entry in await asyncio.to_thread(self._load):
            self._entries[entry.spec.key] = entry
            if entry.rows is not None:
                self.metrics.rows.labels(*self._labels(entry)).set(entry.rows)
            self._watch(entry)

    async def close(self) -> None:
        self._closed = True
        tasks = [e.watcher for e in self._entries.values() if e.watcher is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _load(self) -> list[Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        out = []
        for item in data.get("tables", []):
            h = item.get("applied", {})
            out.append(Entry(spec=SyncedTableSpec.from_json(item["spec"]), version=h.get("version"),
                             commit_time=_time(h.get("commit_time")), rows=h.get("rows"),
                             null_keys=h.get("null_keys", 0), last_run=h.get("last_run"),
                             last_run_at=_time(h.get("last_run_at")), last_error=h.get("last_error"),
                             fallback=h.get("fallback"), stopped=h.get("stopped", False)))
        return out

    async def _save(self) -> None:
        data = {"tables": [{"spec": e.spec.to_json(), "applied": e.hints()} for e in self._entries.values()]}
        await asyncio.to_thread(self._write, json.dumps(data, indent=1))

    def _write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- operations -----------------------------------------------------------------------------

    def get(self, branch: str, database: str, name: str) -> Entry:
        if "." not in name:
            name = "public." + name
        entry = self._entries.get((branch, database, name))
        if entry is None:
            raise NotFound(f"no synced table {name} on branch {branch!r} (database {database}): "
                           "see `lakelet synced-table list`")
        return entry

    def list(self, branch: str | None = None) -> list[dict[str, Any]]:
        return [e.status() for e in self._entries.values() if branch is None or e.spec.branch == branch]

    async def status(self, branch: str, database: str, name: str) -> dict[str, Any]:
        """Status without waking anything: the source is read for its latest version and the lag."""
        entry = self.get(branch, database, name)
        try:
            dt = await asyncio.to_thread(src.open_table, entry.spec.source)
            await asyncio.to_thread(self._measure_lag, entry, dt)
        except src.SourceError as e:
            return dict(entry.status(), source_error=str(e))
        return entry.status()

    async def create(self, spec: SyncedTableSpec) -> dict[str, Any]:
        """Check, load once, then keep. Anything that fails before the first load has committed
        (a bad source, a missing key column, duplicate keys, a name taken) leaves nothing behind."""
        if spec.key in self._entries:
            raise AlreadyExists(f"synced table {spec.name} exists on branch {spec.branch!r}: refresh or delete it")
        if not await self.computes.has_branch(spec.branch):
            raise NotFound(f"branch {spec.branch!r} does not exist: see `lakelet branch list`")
        dt = await asyncio.to_thread(src.open_table, spec.source)
        latest = await asyncio.to_thread(src.describe, dt)
        src.check_schema(latest.schema, spec.primary_key, spec.timeseries_key)
        entry = Entry(spec=spec)
        self._entries[spec.key] = entry
        try:
            await self._run(entry)
        except BaseException:
            del self._entries[spec.key]
            self.metrics.forget(*self._labels(entry))
            raise
        await self._save()
        self._watch(entry)
        log.info("synced table created", extra={"table": spec.name, "branch": spec.branch, "mode": spec.mode.value})
        return entry.status()

    async def refresh(self, branch: str, database: str, name: str, *, full: bool = False) -> dict[str, Any]:
        entry = self.get(branch, database, name)
        entry.stopped = False  # an explicit refresh tries again; a schema change stops it again
        await self._run(entry, full=full)
        return entry.status()

    async def delete(self, branch: str, database: str, name: str, *, drop_table: bool) -> dict[str, Any]:
        entry = self.get(branch, database, name)
        if entry.watcher is not None:
            entry.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.watcher
        async with entry.lock:
            if await self.computes.has_branch(branch):
                async with self.computes.connect(branch, entry.spec.database) as conn:
                    await tgt.ensure_setup(conn)
                    await tgt.release(conn, entry.spec.schema, entry.spec.table, drop=drop_table)
            self._entries.pop(entry.spec.key, None)
            self.metrics.forget(*self._labels(entry))
            await self._save()
        log.info("synced table deleted", extra={"table": entry.spec.name, "branch": branch, "dropped": drop_table})
        return {"deleted": entry.spec.name, "branch": branch, "table_dropped": drop_table}

    # -- runs -----------------------------------------------------------------------------------

    @staticmethod
    def _labels(entry: Entry) -> tuple[str, str]:
        s = entry.spec
        return s.branch, s.name if s.database == "postgres" else f"{s.database}/{s.name}"

    async def _run(self, entry: Entry, *, full: bool = False) -> RunResult:
        labels = self._labels(entry)
        async with entry.lock:
            entry.last_run_at = datetime.now(UTC)
            try:
                async with self.computes.connect(entry.spec.branch, entry.spec.database) as conn:
                    try:
                        result = await sync_once(conn, entry.spec, full=full)
                    except Retry:
                        result = await sync_once(conn, entry.spec, full=full)
            except Exception as e:
                entry.last_error = _one_line(e)
                entry.stopped = isinstance(e, SchemaChangeError)
                self.metrics.runs.labels(*labels, "none", "error").inc()
                log.warning("synced table run failed", extra={"table": entry.spec.name, "branch": entry.spec.branch,
                                                              "error": entry.last_error})
                if entry.spec.key in self._entries and entry.version is not None:
                    await self._save()
                raise
        entry.version, entry.commit_time, entry.rows = result.version, result.commit_time, result.rows
        entry.null_keys, entry.last_error, entry.last_run = result.null_keys, None, result.kind
        if result.kind != "none":
            entry.fallback = result.fallback
        entry.source_version = max(entry.source_version or 0, result.version)
        if entry.source_version == result.version:
            entry.lag_seconds = 0.0
            self.metrics.lag.labels(*labels).set(0)
        self.metrics.rows.labels(*labels).set(result.rows)
        self.metrics.runs.labels(*labels, result.kind, "ok").inc()
        for op, n in (("loaded", result.loaded), ("upserted", result.upserted), ("deleted", result.deleted)):
            if n:
                self.metrics.applied.labels(*labels, op).inc(n)
        if result.kind != "none" or entry.spec.key not in self._entries:
            await self._save()
        return result

    def _measure_lag(self, entry: Entry, dt: DeltaTable) -> None:
        """Blocking: the source's latest version, and how long the table has been behind it."""
        latest = dt.version()
        entry.source_version = latest
        if entry.version is None:
            lag = None
        elif latest <= entry.version:
            lag = 0.0
        else:
            first = src.commit_time(dt, entry.version + 1)
            lag = (datetime.now(UTC) - first).total_seconds() if first else None
        entry.lag_seconds = lag
        if lag is not None:
            self.metrics.lag.labels(*self._labels(entry)).set(max(lag, 0.0))

    # -- continuous -----------------------------------------------------------------------------

    def _watch(self, entry: Entry) -> None:
        if not self._closed:
            entry.watcher = asyncio.create_task(self._watch_loop(entry), name=f"synced-{entry.spec.name}")

    async def _watch_loop(self, entry: Entry) -> None:
        """Read the source's log (no compute involved) and keep the lag current. A continuous
        table is watched every ``POLL_SECONDS`` and run — waking the branch — only when there is a
        version it does not hold (failures back off); the others only every ``LAG_POLL_SECONDS``,
        for the lag, since they run on request."""
        auto = entry.spec.mode is Mode.CONTINUOUS
        every = POLL_SECONDS if auto else LAG_POLL_SECONDS
        dt: DeltaTable | None = None
        backoff = 0.0
        retry_at = 0.0
        while True:
            try:
                if dt is None:
                    dt = await asyncio.to_thread(src.open_table, entry.spec.source)
                else:
                    await asyncio.to_thread(dt.update_incremental)
                await asyncio.to_thread(self._measure_lag, entry, dt)
                if entry.last_error and entry.last_error.startswith(UNREADABLE):
                    entry.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # unreadable source: say so, open it afresh next time
                entry.last_error = f"{UNREADABLE}: {_one_line(e)}"
                dt = None
                await asyncio.sleep(max(every, backoff))
                backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF_SECONDS)
                continue
            behind = entry.version is None or dt.version() != entry.version
            if auto and behind and not entry.stopped and time.monotonic() >= retry_at:
                try:
                    await self._run(entry)
                    backoff = 0.0
                except asyncio.CancelledError:
                    raise
                except Exception:  # recorded by _run; try again later, waiting longer each time
                    backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF_SECONDS)
                    retry_at = time.monotonic() + backoff
            await asyncio.sleep(every)
