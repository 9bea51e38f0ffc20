"""``lakelet synced-table …``: a thin client of the control API's synced-table routes (stdlib only,
like the rest of the CLI, so it starts fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lakelet.client import ControlClient

Output = dict[str, Any]
COLUMNS = ["name", "branch", "mode", "state", "version", "commit_time", "lag_seconds", "rows", "last_error"]


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("synced-table", help="Delta tables served from Postgres (snapshot, triggered, continuous)")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = s.add_parser("create", help="create a read-only Postgres table kept equal to a Delta table")
    create.add_argument("source", metavar="SOURCE_URI", help="Delta table path or s3:// URI")
    create.add_argument("--target", required=True, help="schema.table to create")
    create.add_argument("--primary-key", required=True, help="key column(s): col[,col]")
    create.add_argument("--mode", required=True, choices=["snapshot", "triggered", "continuous"])
    create.add_argument("--timeseries-key", help="with duplicate keys, keep the row with the greatest value")
    _where(create)
    common(create)
    refresh = s.add_parser("refresh", help="sync now (snapshot: a full copy; else the changes since last time)")
    refresh.add_argument("name", help="schema.table")
    refresh.add_argument("--full", action="store_true", help="a full copy even for triggered/continuous")
    _where(refresh)
    common(refresh)
    ls = s.add_parser("list", help="list synced tables")
    ls.add_argument("--branch", help="only this branch")
    common(ls)
    status = s.add_parser("status", help="version, lag, rows and last error of one synced table")
    status.add_argument("name", help="schema.table")
    _where(status)
    common(status)
    delete = s.add_parser("delete", help="stop syncing (the table stays, writable, unless --drop-table)")
    delete.add_argument("name", help="schema.table")
    delete.add_argument("--drop-table", action="store_true", help="also drop the Postgres table")
    _where(delete)
    common(delete)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--branch", default="main")
    p.add_argument("--database", default="postgres")


def _row(t: Output) -> Output:
    lag = t.get("lag_seconds")
    return dict(t, lag_seconds=None if lag is None else f"{lag:.1f}s")


def _table(rows: list[Output]) -> str:
    from lakelet.cli import _table as table

    return table([_row(r) for r in rows], COLUMNS)


def _describe(t: Output) -> str:
    lines = [f"{t['name']} on branch {t['branch']} ({t['mode']}, from {t['source']})",
             f"  state:    {t['state']}",
             f"  version:  {t['version']} (committed {t['commit_time']}); source at {t['source_version']}",
             f"  lag:      {_row(t)['lag_seconds'] or '-'}",
             f"  rows:     {t['rows']} ({t['null_key_rows']} source rows skipped for a NULL key)"]
    if t.get("fallback"):
        lines.append(f"  last run: full copy because {t['fallback']}")
    if t.get("last_error"):
        lines.append(f"  error:    {t['last_error']}")
    if t.get("source_error"):
        lines.append(f"  source:   {t['source_error']}")
    return "\n".join(lines)


def run(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    base = "/api/v1/synced-tables"
    if a.action == "create":
        out = c.call("POST", base, {"source": a.source, "branch": a.branch, "database": a.database,
                                    "target": a.target, "primary_key": a.primary_key, "mode": a.mode,
                                    "timeseries_key": a.timeseries_key})
        return out, f"created synced table {out['name']} on {out['branch']}: {out['rows']} rows at version " \
                    f"{out['version']}"
    if a.action == "list":
        out = c.call("GET", base, query={"branch": a.branch} if a.branch else None)
        return out, _table(out["synced_tables"])
    where = {"branch": a.branch, "database": a.database}
    if a.action == "status":
        out = c.call("GET", c.path("api", "v1", "synced-tables", a.name), query=where)
        return out, _describe(out)
    if a.action == "refresh":
        out = c.call("POST", c.path("api", "v1", "synced-tables", a.name, "refresh"),
                     query=dict(where, full="1") if a.full else where)
        return out, f"{out['name']}: {out['last_run']} run, now at version {out['version']} ({out['rows']} rows)"
    out = c.call("DELETE", c.path("api", "v1", "synced-tables", a.name),
                 query=dict(where, drop_table="1") if a.drop_table else where)
    kept = "dropped" if a.drop_table else "kept (now a plain table, owned by the database owner)"
    return out, f"stopped syncing {out['deleted']} on {out['branch']}; table {kept}"
