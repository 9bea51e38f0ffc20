"""The ``lakelet`` command.

``up`` runs Lakelet; every other subcommand is a thin client of the running ``up``'s control API,
found through ``--data-dir``. Errors are one line on stderr (``{"error": ...}`` with ``--json``)
and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lakelet import config as configuration
from lakelet import lakehouse_cli, synced_cli
from lakelet.client import ClientError, ControlClient

Output = dict[str, Any]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="data dir of the running lakelet (default: from config)")
    p.add_argument("--config", type=Path, help="config file (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lakelet", description="Serverless Postgres you run yourself.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run Lakelet (proxy, computes, store, control API)")
    _common(up)
    up.add_argument("--listen", help="HOST:PORT of the Postgres endpoint")
    up.add_argument("--http", help="HOST:PORT of /healthz, /metrics and the control API")
    up.add_argument("--suspend-timeout", type=float, help="seconds idle before a compute stops (>= 1)")
    up.add_argument("--min-cu", type=float, help="smallest compute size")
    up.add_argument("--max-cu", type=float, help="largest compute size")
    up.add_argument("--log-format", choices=["text", "json"], help="log line format")
    up.add_argument("--store", dest="store_uri", help="file:///PATH or s3://BUCKET/PREFIX (default: <data-dir>/store)")
    up.add_argument("--data-api", help="HOST:PORT of the PostgREST-compatible Data API (empty = off)")
    up.add_argument("--data-api-workers", type=int, help="Data API worker processes (0 = one per CPU)")
    up.add_argument("--lakehouse", help="lakehouse URI for lakehouse sync (path or s3://bucket/prefix)")

    _common(sub.add_parser("status", help="state of every endpoint"))

    branch = sub.add_parser("branch", help="create, list, delete, reset or restore branches")
    bsub = branch.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = bsub.add_parser("create", help="create a branch (instant, copy-on-write)")
    create.add_argument("name")
    create.add_argument("--parent", default="main")
    create.add_argument("--at", help="ISO-8601 timestamp or LSN inside the retention window")
    _common(create)
    _common(bsub.add_parser("list", help="list branches with their sizes"))
    delete = bsub.add_parser("delete", help="delete a branch")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="also when it has child branches")
    _common(delete)
    reset = bsub.add_parser("reset", help="re-point a branch to its parent's current head")
    reset.add_argument("name")
    _common(reset)
    restore = bsub.add_parser("restore", help="restore a branch in place to a point in time")
    restore.add_argument("name")
    restore.add_argument("--at", required=True, help="ISO-8601 timestamp or LSN")
    _common(restore)

    suspend = sub.add_parser("suspend", help="stop a branch's compute now (scale to zero)")
    suspend.add_argument("branch")
    _common(suspend)

    connstr = sub.add_parser("connstr", help="print a ready-to-paste connection URL")
    connstr.add_argument("branch", nargs="?", default="main")
    connstr.add_argument("--pooled", action="store_true", help="the transaction-pooled string (pool=transaction)")
    _common(connstr)

    role = sub.add_parser("role", help="create or list login roles")
    rsub = role.add_subparsers(dest="action", required=True, metavar="ACTION")
    rcreate = rsub.add_parser("create", help="create a login role (password generated if omitted)")
    rcreate.add_argument("name")
    rcreate.add_argument("--password")
    rcreate.add_argument("--branch", default="main")
    _common(rcreate)
    lakehouse_cli.add_parser(sub, _common)

    rlist = rsub.add_parser("list", help="list roles")
    rlist.add_argument("--branch", default="main")
    _common(rlist)
    data_api = sub.add_parser("data-api", help="the PostgREST-compatible Data API")
    dsub = data_api.add_subparsers(dest="action", required=True, metavar="ACTION")
    durl = dsub.add_parser("url", help="print a branch's Data API base URL")
    durl.add_argument("branch", nargs="?", default="main")
    durl.add_argument("--database", default="postgres")
    _common(durl)
    synced_cli.add_parser(sub, _common)
    return parser


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _upload_notes(upload: dict[str, Any] | None) -> list[str]:
    """A bucket store's upload state under ``lakelet status``."""
    if not upload:
        return []
    last = upload.get("last_upload")
    ago = f"{max(time.time() - last, 0):.1f}s ago" if last else "not yet"
    line = f"store {upload['store']}: {_size(upload['bytes_behind'])} of WAL not yet uploaded, last upload {ago}"
    return [line, *([f"store: durability stalled: {upload['stalled']}"] if upload.get("stalled") else [])]


def _status(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    out = c.call("GET", "/api/v1/endpoints")
    text = _table(out["endpoints"], ["branch", "state", "cu", "pid", "host", "port", "connections"])
    # Why a branch failed to start, or why its commits wait: one line each under the table.
    notes = [f"{e['branch']}: {e['state']}: {e['reason']}" for e in out["endpoints"]
             if e.get("state") == "failed" and e.get("reason")]
    notes += [f"{e['branch']}: durability stalled: {e['durability_stalled']}" for e in out["endpoints"]
              if e.get("durability_stalled")]
    notes += _upload_notes(out.get("store_upload"))
    return out, "\n".join([text, *notes])


def _branch(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    if a.action == "create":
        out = c.call("POST", "/api/v1/branches", {"name": a.name, "parent": a.parent, "at": a.at})
        return out, f"created branch {out['name']} from {out['parent']} at {out['parent_lsn']}"
    if a.action == "list":
        out = c.call("GET", "/api/v1/branches")
        rows = [dict(b, size=_size(b["logical_bytes"]), wal=_size(b["wal_bytes"])) for b in out["branches"]]
        text = _table(rows, ["name", "parent", "parent_lsn", "created_at", "size", "wal"])
        return out, text + f"\nstore: {_size(out['store_physical_bytes'])} on disk for all branches"
    if a.action == "delete":
        out = c.call("DELETE", c.path("api", "v1", "branches", a.name), query={"force": "1"} if a.force else None)
        return out, f"deleted branch {a.name}"
    if a.action == "reset":
        out = c.call("POST", c.path("api", "v1", "branches", a.name, "reset"))
        return out, f"reset branch {a.name} to {out['parent']} at {out['parent_lsn']}"
    out = c.call("POST", c.path("api", "v1", "branches", a.name, "restore"), {"at": a.at})
    return out, f"restored branch {a.name} to {a.at}; previous state kept as branch {out['backup']}"


def _suspend(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    out = c.call("POST", c.path("api", "v1", "endpoints", a.branch, "suspend"))
    return out, f"suspended {a.branch}"


def _connstr(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    out = c.call("GET", "/api/v1/connstr", query={"branch": a.branch})
    if a.pooled:
        from proxy.connstr import pooled_url

        out = {**out, "url": pooled_url(out["url"], out["branch"]), "pooled": True}
    return out, out["url"]


def _role(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    if a.action == "create":
        out = c.call("POST", "/api/v1/roles", {"name": a.name, "password": a.password, "branch": a.branch})
        text = f"created role {a.name} on {a.branch}"
        if out.get("password"):
            text += f" with password {out['password']}"
        return out, text
    out = c.call("GET", "/api/v1/roles", query={"branch": a.branch})
    return out, _table(out["roles"], ["name", "login"])


def _data_api(c: ControlClient, a: argparse.Namespace) -> tuple[Output, str]:
    out = c.call("GET", "/api/v1/data-api/url", query={"branch": a.branch, "database": a.database})
    return out, out["url"]


COMMANDS: dict[str, Callable[[ControlClient, argparse.Namespace], tuple[Output, str]]] = {
    "status": _status, "branch": _branch, "suspend": _suspend, "connstr": _connstr, "role": _role,
    "data-api": _data_api,
    "synced-table": synced_cli.run,
    "lakehouse-sync": lakehouse_cli.run,
}


def _fail(message: str, as_json: bool) -> int:
    print(json.dumps({"error": message}) if as_json else f"lakelet: error: {message}", file=sys.stderr)
    return 1


def _up(a: argparse.Namespace) -> int:
    from lakelet import app, logs, ports
    from lakelet.rundir import DataDirBusy
    from storage.errors import StorageError
    from storage.postgres import PostgresNotFound, find_binaries

    overrides = {"data_dir": a.data_dir, "listen": a.listen, "http": a.http, "suspend_timeout": a.suspend_timeout,
                 "min_cu": a.min_cu, "max_cu": a.max_cu, "log_format": a.log_format,
                 "data_api": a.data_api, "lakehouse_uri": a.lakehouse, "store_uri": a.store_uri,
                 "data_api_workers": a.data_api_workers}
    conf = configuration.load(a.config, overrides)
    logs.setup(conf.log_format, conf.log_level)
    try:
        find_binaries()
        return app.run(conf)
    except (PostgresNotFound, DataDirBusy, PermissionError, StorageError, ports.BindError) as e:
        return _fail(str(e), a.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return _up(args)
        conf = configuration.load(args.config, {"data_dir": args.data_dir})
        client = ControlClient(conf.data_dir.resolve())
        out, text = COMMANDS[args.command](client, args)
    except (configuration.ConfigError, ClientError) as e:
        return _fail(str(e), args.json)
    except Exception as e:  # any other failure is still one line, never a traceback
        if os.environ.get("LAKELET_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e}", args.json)
    try:
        print(json.dumps(out, indent=2) if args.json else text, flush=True)
    except BrokenPipeError:  # `lakelet status | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
