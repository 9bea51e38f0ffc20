"""``lakelet synced-table`` as a user meets it: a real ``lakelet up``, the CLI, psycopg through the
proxy, the control API's errors, metrics, a branch, and a restart that keeps the definitions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from lakelet.rundir import read_run_info
from tests.lakehouse.synced_support import write
from tests.shell.lakelet_process import Lakelet, cli, cli_json, password_of, running


@pytest.fixture(scope="module")
def lakelet() -> Iterator[Lakelet]:
    with running("lakelet-synced-", "--suspend-timeout", "600") as server:
        yield server


@pytest.fixture(scope="module")
def data_root(lakelet: Lakelet) -> Path:
    """The module's scratch dir (the running server's data dir is ``data`` in it)."""
    return lakelet.data_dir.parent


def products(ids: list[int], tag: str) -> pa.Table:
    return pa.table({"sku": pa.array(ids, pa.int64()), "name": [f"{tag}{i}" for i in ids],
                     "price": pa.array([i * 1.5 for i in ids])})


def test_create_list_status_refresh_delete(lakelet: Lakelet, data_root: Path) -> None:
    uri = data_root / "catalog"
    write(uri, products([1, 2, 3], "p"))
    d = lakelet.data_dir
    out = cli_json("synced-table", "create", str(uri), "--target", "shop.products", "--primary-key", "sku",
                   "--mode", "triggered", data_dir=d)
    assert (out["name"], out["version"], out["rows"], out["state"]) == ("shop.products", 0, 3, "ok")

    dsn = lakelet.dsn("lakelet", password_of(d))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT name FROM shop.products WHERE sku = 2").fetchone() == ("p2",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table products"):
            conn.execute("INSERT INTO shop.products VALUES (9, 'x', 1)")

    DeltaTable(str(uri)).delete("sku = 1")
    write(uri, products([4], "q"))
    out = cli_json("synced-table", "refresh", "shop.products", data_dir=d)
    assert (out["last_run"], out["version"], out["rows"]) == ("incremental", 2, 3)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT array_agg(sku ORDER BY sku)::text FROM shop.products").fetchone() == ("{2,3,4}",)

    listed = cli_json("synced-table", "list", data_dir=d)["synced_tables"]
    assert [t["name"] for t in listed] == ["shop.products"]
    text = cli("synced-table", "status", "shop.products", data_dir=d, check=True).stdout
    assert "version:  2" in text and "lag:      0.0s" in text and "rows:     3" in text
    status, body = lakelet.http("/metrics")
    assert 'lakelet_synced_table_rows{branch="main",table="shop.products"} 3.0' in body
    assert 'lakelet_synced_table_lag_seconds{branch="main",table="shop.products"} 0.0' in body

    # Restart: the definition is still there, and refresh carries on incrementally.
    assert lakelet.stop() == 0
    lakelet.start()
    write(uri, products([5], "r"))
    out = cli_json("synced-table", "refresh", "shop.products", data_dir=d)
    assert (out["last_run"], out["version"], out["rows"]) == ("incremental", 3, 4)

    out = cli_json("synced-table", "delete", "shop.products", data_dir=d)
    assert out["table_dropped"] is False
    with psycopg.connect(dsn, autocommit=True) as conn:  # kept, and now the owner's to write
        conn.execute("INSERT INTO shop.products VALUES (9, 'mine', 1)")
    assert cli_json("synced-table", "list", data_dir=d)["synced_tables"] == []


def test_bad_input_is_one_line_and_registers_nothing(lakelet: Lakelet, data_root: Path) -> None:
    uri = data_root / "dups"
    write(uri, pa.table({"id": pa.array([1, 1], pa.int64()), "v": ["a", "b"]}))
    d = lakelet.data_dir
    cases = [
        (["synced-table", "create", str(data_root / "nowhere"), "--target", "t1", "--primary-key", "id", "--mode",
          "snapshot"], "no Delta table at"),
        (["synced-table", "create", str(uri), "--target", "t1", "--primary-key", "nope", "--mode", "snapshot"],
         "primary key column 'nope' is not in the source"),
        (["synced-table", "create", str(uri), "--target", "t1", "--primary-key", "id", "--mode", "snapshot"],
         "has two rows with key (id)=(1)"),
        (["synced-table", "create", str(uri), "--target", "Bad.Name", "--primary-key", "id", "--mode", "snapshot"],
         "schema 'Bad' is not allowed"),
        (["synced-table", "create", str(uri), "--target", "t1", "--primary-key", "id", "--mode", "snapshot",
          "--branch", "nope"], "branch 'nope' does not exist"),
        (["synced-table", "status", "public.t1"], "no synced table public.t1"),
    ]
    for args, message in cases:
        proc = cli(*args, "--json", data_dir=d)
        assert proc.returncode == 1 and message in json.loads(proc.stderr)["error"], (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert cli_json("synced-table", "list", data_dir=d)["synced_tables"] == []
    # With a timeseries key the same source is fine: the newest row per key wins.
    out = cli_json("synced-table", "create", str(uri), "--target", "t1", "--primary-key", "id", "--mode", "snapshot",
                   "--timeseries-key", "v", data_dir=d)
    assert out["rows"] == 1


def test_a_child_branch_has_the_data_but_is_not_synced(lakelet: Lakelet, data_root: Path) -> None:
    uri = data_root / "feed"
    write(uri, products([1, 2], "a"))
    d = lakelet.data_dir
    cli_json("synced-table", "create", str(uri), "--target", "feed", "--primary-key", "sku", "--mode", "triggered",
             data_dir=d)
    cli("branch", "create", "dev", data_dir=d, check=True)
    write(uri, products([3], "b"))
    cli_json("synced-table", "refresh", "feed", data_dir=d)
    assert [t["branch"] for t in cli_json("synced-table", "list", data_dir=d)["synced_tables"]
            if t["name"] == "public.feed"] == ["main"]
    with psycopg.connect(lakelet.dsn("lakelet", password_of(d), branch="dev")) as conn:
        assert conn.execute("SELECT count(*) FROM feed").fetchone() == (2,)  # as of the branch point
    # Asked to, the child continues from the version it inherited.
    out = cli_json("synced-table", "create", str(uri), "--target", "feed", "--primary-key", "sku", "--mode",
                   "triggered", "--branch", "dev", data_dir=d)
    assert (out["last_run"], out["version"], out["rows"]) == ("incremental", 1, 3)


def test_the_control_api_answers_with_the_right_status(lakelet: Lakelet, data_root: Path) -> None:
    uri = data_root / "api"
    write(uri, products([1], "a"))
    token = read_run_info(lakelet.data_dir).token  # type: ignore[union-attr]

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{lakelet.http_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    body = {"source": str(uri), "target": "api_t", "primary_key": "sku", "mode": "snapshot"}
    assert call("POST", "/api/v1/synced-tables", body)[0] == 201
    status, out = call("POST", "/api/v1/synced-tables", body)
    assert status == 409 and "exists" in out["error"]
    status, out = call("GET", "/api/v1/synced-tables/public.nope")
    assert status == 404 and "no synced table public.nope" in out["error"]
    status, out = call("POST", "/api/v1/synced-tables", dict(body, target="api_u", mode="later"))
    assert status == 400 and "mode 'later'" in out["error"]
    status, out = call("GET", "/api/v1/synced-tables/api_t")
    assert status == 200 and out["rows"] == 1 and out["mode"] == "snapshot"
    status, out = call("DELETE", "/api/v1/synced-tables/api_t?drop_table=1")
    assert status == 200 and out["table_dropped"] is True
