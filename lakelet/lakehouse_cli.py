"""``lakelet lakehouse-sync enable|status|disable``: a thin client of the control API's
``/api/v1/lakehouse-sync`` routes (see lakelet/lakehouse_api.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lakelet.client import ControlClient


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("lakehouse-sync", help="sync a branch's tables into Delta Lake as SCD type 2 history")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    enable = s.add_parser("enable", help="start syncing a schema (snapshot, then every change)")
    enable.add_argument("--branch", required=True)
    enable.add_argument("--schema", required=True)
    enable.add_argument("--database", default="postgres")
    enable.add_argument("--tables", help="comma-separated tables (default: every table in the schema, "
                                         "including ones created later)")
    enable.add_argument("--to", dest="uri", help="lakehouse URI (default: the lakehouse_uri setting)")
    common(enable)
    status = s.add_parser("status", help="per-table state, last synced LSN, lag and rows")
    status.add_argument("--branch")
    common(status)
    disable = s.add_parser("disable", help="stop syncing (drops the slot; the Delta tables stay)")
    disable.add_argument("--branch", required=True)
    disable.add_argument("--schema")
    common(disable)


def run(c: ControlClient, a: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if a.action == "enable":
        tables = [t.strip() for t in a.tables.split(",") if t.strip()] if a.tables else None
        out = c.call("POST", "/api/v1/lakehouse-sync", {"branch": a.branch, "schema": a.schema,
                                                         "database": a.database, "tables": tables, "uri": a.uri})
        return out, f"lakehouse sync of {a.database}.{a.schema} on {a.branch} enabled: {out['state']}, to {out['uri']}"
    if a.action == "disable":
        out = c.call("DELETE", c.path("api", "v1", "lakehouse-sync", a.branch),
                     query={"schema": a.schema} if a.schema else None)
        return out, f"lakehouse sync disabled on {a.branch}: {', '.join(out['disabled'])} (Delta tables kept)"
    out = c.call("GET", "/api/v1/lakehouse-sync", query={"branch": a.branch} if a.branch else None)
    lines = []
    for s in out["syncs"]:
        head = f"{s['branch']} {s['database']}.{s['schema']} → {s['uri']}: {s['state']}"
        if s.get("error"):
            head += f" ({s['error']})"
        lines.append(head)
        if s.get("snapshot_note"):
            lines.append(f"  note: {s['snapshot_note']}")
        for name, t in s["tables"].items():
            state = t["state"] if not t.get("error") else f"error: {t['error']}"
            lsn, lag, rows = t.get("last_lsn") or "-", t.get("lag_seconds") or 0, t.get("rows") or 0
            lines.append(f"  {name:<24} {state:<14} lsn {lsn:<12} lag {lag:.1f}s rows {rows}")
            if t.get("note"):
                lines.append(f"    {t['note']}")
    return out, "\n".join(lines) or "no lakehouse sync is enabled"
