"""The Data API as ``lakelet up`` serves it: configured by flag and environment, found with
``lakelet data-api url``, a token's role reaching the branch through the proxy-created schema,
and a suspended branch woken by an HTTP request."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import psycopg
import pytest

from tests.conftest import scratch_dir
from tests.shell.lakelet_process import Lakelet, cli, cli_json, free_port

SECRET = "up-test-secret-that-is-at-least-32-chars"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def lakelet() -> Iterator[Lakelet]:
    saved = os.environ.pop("LAKELET_PASSWORD", None)
    with scratch_dir("lakelet-dataapi-up-") as root:
        server = Lakelet(root / "data", extra_args=["--suspend-timeout", "600", "--data-api",
                                                    f"127.0.0.1:{free_port()}"],
                         env={"LAKELET_DATA_API_JWT_SECRET": SECRET, "LAKELET_DATA_API_ANON_ROLE": "",
                              "LAKELET_DATA_API_MAX_ROWS": "50"})
        server.start()
        try:
            yield server
        finally:
            server.kill()  # stopped by the last test; killed here if a test failed before it
            if saved is not None:
                os.environ["LAKELET_PASSWORD"] = saved


def password_of(data_dir: Path) -> str:
    return re.search(r"^password=(.*)$", (data_dir / "credentials").read_text(), re.M).group(1)  # type: ignore


def http(url: str, token: str | None = None) -> tuple[int, dict, object]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def test_url_tokens_and_wake(lakelet: Lakelet) -> None:
    url = cli("data-api", "url", data_dir=lakelet.data_dir, check=True).stdout.strip()
    port = lakelet.extra_args[-1].rsplit(":", 1)[1]
    assert url == f"http://localhost:{port}/main/postgres/rest/v1/"
    out = cli_json("data-api", "url", "main", "--database", "other", data_dir=lakelet.data_dir)
    assert out["url"].endswith("/main/other/rest/v1/")
    missing = cli("data-api", "url", "nope", data_dir=lakelet.data_dir)
    assert missing.returncode != 0 and "nope" in missing.stderr

    with psycopg.connect(lakelet.dsn("lakelet", password_of(lakelet.data_dir)), autocommit=True) as conn:
        conn.execute("CREATE TABLE gadgets (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO gadgets SELECT n, 'g' || n FROM generate_series(1, 60) n")
    base = f"http://127.0.0.1:{port}/main/postgres/rest/v1/"
    status, headers, body = http(base + "gadgets")
    assert status == 401 and body["code"] == "PGRST302" and headers["WWW-Authenticate"] == "Bearer"
    token = jwt.encode({"role": "lakelet", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    status, headers, body = http(base + "gadgets?select=name&id=lte.2&order=id", token)
    assert status == 200 and body == [{"name": "g1"}, {"name": "g2"}]
    status, headers, body = http(base + "gadgets?select=id", token)
    assert status == 200 and len(body) == 50  # data_api_max_rows from the environment

    cli("suspend", "main", data_dir=lakelet.data_dir, check=True)
    main = next(e for e in cli_json("status", data_dir=lakelet.data_dir)["endpoints"] if e["branch"] == "main")
    assert main["state"] == "suspended"
    status, _, body = http(base + "gadgets?select=name&id=eq.60", token)
    assert status == 200 and body == [{"name": "g60"}]
    main = next(e for e in cli_json("status", data_dir=lakelet.data_dir)["endpoints"] if e["branch"] == "main")
    assert main["state"] == "active"


def test_sigterm_stops_up_with_the_data_api_cleanly(lakelet: Lakelet) -> None:
    assert lakelet.stop(timeout=30) == 0
    assert "data API is up" in lakelet.output()
    assert "Traceback" not in lakelet.output()
