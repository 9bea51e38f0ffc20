"""Lakehouse sync as a user meets it: a real ``lakelet up``, the CLI, the proxy, scale to zero.

The sync must never keep a compute awake nor wake it, must drain before the compute stops, must
survive a restart of ``lakelet up``, and must answer bad requests with one line."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from deltalake import DeltaTable

from tests.conftest import scratch_dir
from tests.shell.lakelet_process import Lakelet, cli, cli_json


@pytest.fixture(scope="module")
def data_root() -> Iterator[Path]:
    with scratch_dir("lakelet-lakehouse-up-") as path:
        yield path


def _password(data_dir: Path) -> str:
    return re.search(r"^password=(.*)$", (data_dir / "credentials").read_text(), re.M).group(1)  # type: ignore


def _history(uri: str) -> list[tuple[object, ...]]:
    if not DeltaTable.is_deltatable(uri):
        return []
    rows = sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["_sort_by"])
    return [(r["_pg_change_type"], r["id"], r["note"]) for r in rows]


def _wait(predicate, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen in {timeout:.0f}s")


def _state(data_dir: Path) -> str:
    return next(e["state"] for e in cli_json("status", data_dir=data_dir)["endpoints"] if e["branch"] == "main")


def test_sync_with_scale_to_zero_and_restart(data_root: Path) -> None:
    lake = data_root / "lake"
    server = Lakelet(data_root / "data", extra_args=["--suspend-timeout", "3", "--lakehouse", str(lake)])
    server.start()
    try:
        data_dir = server.data_dir
        dsn = server.dsn("lakelet", _password(data_dir))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY, note text);"
                         "INSERT INTO app.items VALUES (1, 'a'), (2, 'b')")
        out = cli_json("lakehouse-sync", "enable", "--branch", "main", "--schema", "app", data_dir=data_dir)
        uri = out["uri"] + "/lb_items_history"
        assert out["uri"] == f"{lake}/main/postgres/app"
        _wait(lambda: cli_json("lakehouse-sync", "status", data_dir=data_dir)["syncs"][0]["state"] == "streaming",
              "snapshot")
        expected: list[tuple[object, ...]] = [("insert", 1, "a"), ("insert", 2, "b")]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE app.items SET note = 'B' WHERE id = 2")
            conn.execute("INSERT INTO app.items VALUES (3, 'c')")
            # A table the (non-superuser) lakelet role creates later: picked up, whole old rows.
            conn.execute("CREATE TABLE app.later (id int PRIMARY KEY, note text);"
                         "INSERT INTO app.later VALUES (1, 'x'); UPDATE app.later SET id = 2")
        expected += [("update_preimage", 2, "b"), ("update_postimage", 2, "B"), ("insert", 3, "c")]
        later = out["uri"] + "/lb_later_history"
        _wait(lambda: _history(later) == [("insert", 1, "x"), ("update_preimage", 1, "x"),
                                          ("update_postimage", 2, "x")], "a table created after enabling")

        # Idle: the compute scales to zero although the sync is connected, the sync drained first,
        # and the sync does not wake it again.
        _wait(lambda: _state(data_dir) == "suspended", "scale to zero with a sync connected", 60)
        assert _history(uri) == expected, (cli_json("lakehouse-sync", "status", data_dir=data_dir), server.output())
        time.sleep(4)
        assert _state(data_dir) == "suspended"
        status = cli_json("lakehouse-sync", "status", "--branch", "main", data_dir=data_dir)["syncs"][0]
        assert status["state"] == "waiting for compute" and status["tables"]["items"]["rows"] >= 3

        text = server.http("/metrics")[1]
        assert re.search(r'lakelet_lakehouse_sync_rows_total\{branch="main",table="app.items"\} [1-9]', text), text

        # Restart of lakelet up: enabled syncs and the slot carry on.
        assert server.stop(timeout=60) == 0
        server.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM app.items WHERE id = 1")
        expected.append(("delete", 1, "a"))
        _wait(lambda: _history(uri) == expected, "changes after a restart of lakelet up")
        status = cli_json("lakehouse-sync", "status", data_dir=data_dir)["syncs"][0]
        assert status["snapshot_note"] is None

        human = cli("lakehouse-sync", "status", data_dir=data_dir, check=True).stdout
        assert "main postgres.app" in human and "items" in human

        bad = cli("lakehouse-sync", "enable", "--branch", "nope", "--schema", "app", data_dir=data_dir)
        assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
        bad = cli("lakehouse-sync", "enable", "--branch", "main", "--schema", "App; drop", "--json",
                  data_dir=data_dir)
        assert bad.returncode == 1 and "lower-case" in json.loads(bad.stderr)["error"]
        # A typo in the schema, a table or the destination is refused at once, and nothing is enabled.
        for args, says in ((["--schema", "apps"], "schema 'apps' does not exist"),
                           (["--schema", "public", "--tables", "itemz"], "no table itemz in postgres.public"),
                           (["--schema", "public", "--database", "nodb"], "database 'nodb' does not exist"),
                           (["--schema", "public", "--to", "gs://bucket/x"], "use a local path or s3://")):
            bad = cli("lakehouse-sync", "enable", "--branch", "main", *args, data_dir=data_dir)
            assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and says in bad.stderr, bad.stderr
        assert [s["schema"] for s in cli_json("lakehouse-sync", "status", data_dir=data_dir)["syncs"]] == ["app"]

        out = cli_json("lakehouse-sync", "disable", "--branch", "main", data_dir=data_dir)
        assert out["disabled"] == ["postgres.app"]
        with psycopg.connect(dsn) as conn:
            slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'lakelet_sync%'")
            assert slots.fetchone() == (0,)
        assert _history(uri) == expected  # the Delta table stays
    finally:
        server.kill()
