"""``lakelet up`` end to end, as a new user meets it: a real process, real computes, the CLI,
psql/psycopg through the proxy, the control API, metrics, restart and shutdown."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.shell.lakelet_process import Lakelet, cli, cli_json, password_of, running

REPO = Path(__file__).resolve().parents[2]

PSQL = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"


@pytest.fixture(scope="module")
def lakelet() -> Iterator[Lakelet]:
    with running("lakelet-up-", "--suspend-timeout", "600") as server:
        yield server


@pytest.fixture(scope="module")
def data_root(lakelet: Lakelet) -> Path:
    """The module's scratch dir (the running server's data dir is ``data`` in it)."""
    return lakelet.data_dir.parent


def test_first_start_creates_the_project(lakelet: Lakelet) -> None:
    creds = lakelet.data_dir / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    password = password_of(lakelet.data_dir)
    assert password in lakelet.output()  # printed once on first start
    assert (lakelet.data_dir / "store").is_dir() and (lakelet.data_dir / "computes").is_dir()
    with psycopg.connect(lakelet.dsn("lakelet", password)) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole,"
            " pg_has_role('lakelet', 'pg_checkpoint', 'member'),"
            " pg_has_role('lakelet', 'pg_read_all_stats', 'member'),"
            " pg_has_role('lakelet', 'pg_signal_backend', 'member'), current_database()"
            " FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == ("lakelet", False, True, True, True, True, True, "postgres")


def test_psql_with_the_connstr(lakelet: Lakelet) -> None:
    url = cli("connstr", data_dir=lakelet.data_dir, check=True).stdout.strip()
    assert url.startswith("postgresql://lakelet:")
    assert "sslrootcert=" in url  # verify-full against the generated CA
    out = subprocess.run([PSQL, url, "-Atc", "SELECT 40 + 2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


def test_the_pooled_connstr_reaches_a_pooled_session(lakelet: Lakelet) -> None:
    url = cli("connstr", "--pooled", data_dir=lakelet.data_dir, check=True).stdout.strip()
    assert "options=endpoint%3Dmain%20pool%3Dtransaction" in url
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.backend_pid > (1 << 22)  # a pooled client's key, not a backend's pid
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)


def test_status_reports_the_active_endpoint(lakelet: Lakelet) -> None:
    with psycopg.connect(lakelet.dsn("lakelet", password_of(lakelet.data_dir))) as conn:
        conn.execute("SELECT 1")
        status = cli_json("status", data_dir=lakelet.data_dir)
    main = next(e for e in status["endpoints"] if e["branch"] == "main")
    assert main["state"] == "active"
    assert isinstance(main["pid"], int) and main["pid"] > 0
    assert main["host"] and main["port"]
    assert main["connections"] >= 1
    assert main["cu"] >= 0.25
    text = cli("status", data_dir=lakelet.data_dir, check=True).stdout
    assert text.splitlines()[0].split() == ["BRANCH", "STATE", "CU", "PID", "HOST", "PORT", "CONNECTIONS"]


def test_branch_lifecycle_through_the_cli(lakelet: Lakelet) -> None:
    pw = password_of(lakelet.data_dir)
    with psycopg.connect(lakelet.dsn("lakelet", pw), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id int primary key, note text)")
        conn.execute("INSERT INTO items VALUES (1, 'from main') ON CONFLICT DO NOTHING")
    created = cli_json("branch", "create", "feature-x", data_dir=lakelet.data_dir)
    assert created["parent"] == "main"
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch="feature-x"), autocommit=True) as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 1").fetchone() == ("from main",)
        conn.execute("INSERT INTO items VALUES (2, 'only on feature-x')")
    with psycopg.connect(lakelet.dsn("lakelet", pw), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE id = 2").fetchone() == (0,)
    names = [b["name"] for b in cli_json("branch", "list", data_dir=lakelet.data_dir)["branches"]]
    assert {"main", "feature-x"} <= set(names)
    cli("branch", "delete", "feature-x", data_dir=lakelet.data_dir, check=True)
    names = [b["name"] for b in cli_json("branch", "list", data_dir=lakelet.data_dir)["branches"]]
    assert "feature-x" not in names


def test_branch_restore_and_reset_through_the_cli(lakelet: Lakelet) -> None:
    pw = password_of(lakelet.data_dir)
    with psycopg.connect(lakelet.dsn("lakelet", pw), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id int primary key, note text)")
    cli("branch", "create", "restorable", data_dir=lakelet.data_dir, check=True)
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch="restorable"), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (10, 'deleted by mistake')")
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        time.sleep(0.2)
        conn.execute("DELETE FROM items WHERE id = 10")
    restored = cli_json("branch", "restore", "restorable", "--at", moment.isoformat(), data_dir=lakelet.data_dir)
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch="restorable")) as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 10").fetchone() == ("deleted by mistake",)
    names = {b["name"] for b in cli_json("branch", "list", data_dir=lakelet.data_dir)["branches"]}
    backups = [n for n in names if n.startswith("restorable_old_")]
    assert len(backups) == 1, (restored, names)
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch=backups[0])) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE id = 10").fetchone() == (0,)

    cli("branch", "create", "resettable", data_dir=lakelet.data_dir, check=True)
    with psycopg.connect(lakelet.dsn("lakelet", pw), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (11, 'after resettable was made') ON CONFLICT DO NOTHING")
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch="resettable")) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE id = 11").fetchone() == (0,)
    cli("branch", "reset", "resettable", data_dir=lakelet.data_dir, check=True)
    with psycopg.connect(lakelet.dsn("lakelet", pw, branch="resettable")) as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 11").fetchone() == ("after resettable was made",)


def test_role_create_then_login(lakelet: Lakelet) -> None:
    cli("role", "create", "alice", "--password", "s3cret-alice", data_dir=lakelet.data_dir, check=True)
    with psycopg.connect(lakelet.dsn("alice", "s3cret-alice")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)
    roles = [r["name"] for r in cli_json("role", "list", data_dir=lakelet.data_dir)["roles"]]
    assert "alice" in roles and "lakelet" in roles and "lakelet_admin" not in roles
    generated = cli_json("role", "create", "bob", data_dir=lakelet.data_dir)
    assert generated["password"]
    with psycopg.connect(lakelet.dsn("bob", generated["password"])) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("bob",)


def test_suspend_then_wake_on_connect(lakelet: Lakelet) -> None:
    pw = password_of(lakelet.data_dir)
    cli("suspend", "main", data_dir=lakelet.data_dir, check=True)
    main = next(e for e in cli_json("status", data_dir=lakelet.data_dir)["endpoints"] if e["branch"] == "main")
    assert main["state"] == "suspended" and main["pid"] is None
    with psycopg.connect(lakelet.dsn("lakelet", pw)) as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 1").fetchone() == ("from main",)


def test_cli_errors_are_one_line(lakelet: Lakelet) -> None:
    bad = cli("branch", "create", "Bad Name!", data_dir=lakelet.data_dir)
    assert bad.returncode != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Bad Name!" in bad.stderr
    as_json = cli("branch", "delete", "main", "--json", data_dir=lakelet.data_dir)
    assert as_json.returncode != 0
    assert "main" in json.loads(as_json.stderr)["error"]
    missing = cli("suspend", "no-such-branch", data_dir=lakelet.data_dir)
    assert missing.returncode != 0 and "no-such-branch" in missing.stderr
    nowhere = cli("status", data_dir=lakelet.data_dir.parent / "not-running")
    assert nowhere.returncode != 0 and "lakelet up" in nowhere.stderr


def test_metrics_and_health(lakelet: Lakelet) -> None:
    status, body = lakelet.http("/healthz")
    assert status == 200
    status, body = lakelet.http("/metrics")
    assert status == 200
    for name in ("lakelet_proxy_connections_total", "lakelet_proxy_bytes_total", "lakelet_compute_starts_total",
                 "lakelet_compute_state", "lakelet_compute_cu"):
        assert name in body, name
    status, body = lakelet.http("/api/v1/endpoints")
    assert status == 401 and "token" in json.loads(body)["error"]


def test_grafana_dashboard_queries_metrics_that_exist(lakelet: Lakelet) -> None:
    """configs/grafana-dashboard.json must not chart a name Lakelet does not export (a renamed
    metric would otherwise leave an empty panel nobody notices)."""
    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"lakelet_[a-z_]+", e)}
    _, body = lakelet.http("/metrics")
    families = set(re.findall(r"^# TYPE (lakelet_[a-z_]+) ", body, re.M))
    # Counters are declared without their _total suffix in the TYPE line.
    exported = families | {f + "_total" for f in families}
    assert queried and queried <= exported, queried - exported


def test_second_up_on_the_same_data_dir_refuses(lakelet: Lakelet) -> None:
    other = Lakelet(lakelet.data_dir)
    with pytest.raises(AssertionError, match="in use by another lakelet up"):
        other.start(timeout=60)


def test_sigterm_stops_cleanly_and_restart_keeps_everything(lakelet: Lakelet) -> None:
    pw = password_of(lakelet.data_dir)
    with psycopg.connect(lakelet.dsn("lakelet", pw), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (3, 'before restart')")
    started = time.monotonic()
    assert lakelet.stop(timeout=15) == 0
    assert time.monotonic() - started < 15
    assert not (lakelet.data_dir / "run.json").exists()
    lakelet.start()
    assert pw not in lakelet.output()  # not printed again: the project is reused
    with psycopg.connect(lakelet.dsn("lakelet", pw)) as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 3").fetchone() == ("before restart",)


def test_lakelet_password_is_used_when_set(data_root: Path) -> None:
    server = Lakelet(data_root / "with-password", env={"LAKELET_PASSWORD": "chosen-pw-123"},
                     extra_args=["--log-format", "json"])
    server.start()
    try:
        assert password_of(server.data_dir) == "chosen-pw-123"
        events = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        assert any(e.get("msg", e.get("message")) == "lakelet is up" for e in events), server.output()
        with psycopg.connect(server.dsn("lakelet", "chosen-pw-123")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(server.dsn("lakelet", "wrong"))
    finally:
        assert server.stop() == 0
