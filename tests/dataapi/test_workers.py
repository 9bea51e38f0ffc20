"""The Data API's worker processes under a real ``lakelet up``: a worker killed with -9 is
replaced while the others keep answering, its HTTP load keeps a compute awake and its absence
lets it scale to zero, a request to a suspended branch wakes it through a worker, the metrics on
``/metrics`` are the sum over the workers, and no worker outlives ``lakelet up``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import scratch_dir
from tests.shell.lakelet_process import Lakelet, cli_json, free_port, password_of

pytestmark = pytest.mark.timeout(400)

SUSPEND_TIMEOUT = 3


def wait_for(what: str, check: Callable[[], object], timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def workers_of(pid: int) -> list[int]:
    """The ``dataapi.worker`` children of ``lakelet up``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"dataapi.worker" in cmd:
            out.append(int(entry))
    return sorted(out)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def http(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def state(server: Lakelet) -> str:
    return next(e for e in cli_json("status", data_dir=server.data_dir)["endpoints"] if e["branch"] == "main")["state"]


def served(server: Lakelet) -> float:
    """``lakelet_data_api_requests_total`` for 200s on main, as ``/metrics`` shows it."""
    status, text = server.http("/metrics")
    assert status == 200
    m = re.search(r'^lakelet_data_api_requests_total\{branch="main",method="GET",status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def server() -> Iterator[Lakelet]:
    saved = os.environ.pop("LAKELET_PASSWORD", None)
    with scratch_dir("lakelet-dataapi-workers-") as root:
        api_port = free_port()
        server = Lakelet(root / "data", extra_args=["--suspend-timeout", str(SUSPEND_TIMEOUT), "--data-api",
                                                    f"127.0.0.1:{api_port}", "--data-api-workers", "2"],
                         env={"LAKELET_DATA_API_ANON_ROLE": "lakelet", "LAKELET_DATA_API_IDLE_TIMEOUT": "1"})
        server.start()
        server.api = f"http://127.0.0.1:{api_port}/main/postgres/rest/v1/"  # type: ignore[attr-defined]
        try:
            with psycopg.connect(server.dsn("lakelet", password_of(server.data_dir)), autocommit=True) as conn:
                conn.execute("CREATE TABLE things (id int PRIMARY KEY, name text)")
                conn.execute("INSERT INTO things SELECT n, 't' || n FROM generate_series(1, 10) n")
            yield server
        finally:
            server.kill()
            if saved is not None:
                os.environ["LAKELET_PASSWORD"] = saved


def get_thing(server: Lakelet, n: int = 1) -> tuple[int, object]:
    return http(server.api + f"things?id=eq.{n}")  # type: ignore[attr-defined]


def test_metrics_are_summed_over_the_workers(server: Lakelet) -> None:
    assert server.proc is not None
    wait_for("the schema reload after CREATE TABLE", lambda: get_thing(server)[0] == 200)
    first, second = workers_of(server.proc.pid)
    before = served(server)
    # A stopped worker accepts nothing: each batch is served by the other one alone.
    for stopped, count in ((first, 3), (second, 4)):
        os.kill(stopped, signal.SIGSTOP)
        try:
            for n in range(count):
                assert get_thing(server, n + 1) == (200, [{"id": n + 1, "name": f"t{n + 1}"}])
        finally:
            os.kill(stopped, signal.SIGCONT)
    assert served(server) == before + 7


def test_a_worker_killed_is_replaced_and_the_api_keeps_answering(server: Lakelet) -> None:
    assert server.proc is not None
    before = workers_of(server.proc.pid)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    for n in range(10):  # the other worker serves meanwhile
        assert get_thing(server, n + 1)[0] == 200
    after = wait_for("a replacement worker", lambda: (w := workers_of(server.proc.pid)) and len(w) == 2
                     and before[0] not in w and w)
    assert before[1] in after  # type: ignore[operator]
    wait_for("the restart in the log", lambda: "a data API worker exited; starting another" in server.output())
    wait_for("the restart counter", lambda: "lakelet_data_api_worker_restarts_total 1.0" in server.http("/metrics")[1])
    wait_for("the new worker serving", lambda: all(get_thing(server)[0] == 200 for _ in range(6)))


def test_http_load_keeps_the_compute_awake_and_its_absence_lets_it_suspend(server: Lakelet) -> None:
    assert get_thing(server)[0] == 200
    assert state(server) == "active"
    # Requests through the workers for three suspend timeouts: the compute stays up throughout.
    deadline = time.monotonic() + 3 * SUSPEND_TIMEOUT
    while time.monotonic() < deadline:
        assert get_thing(server)[0] == 200
        assert state(server) == "active"
        time.sleep(0.3)
    # No requests: the workers' idle connections close and the compute scales to zero.
    wait_for("scale to zero", lambda: state(server) == "suspended")


def test_a_request_to_a_suspended_branch_wakes_it_through_a_worker(server: Lakelet) -> None:
    wait_for("scale to zero", lambda: state(server) == "suspended")
    # Both workers have served main before, with the compute that is gone now.
    for n in range(4):
        assert get_thing(server, n + 1) == (200, [{"id": n + 1, "name": f"t{n + 1}"}])
    assert state(server) == "active"
    status, body = http(server.api.replace("/main/", "/nope/") + "things")  # type: ignore[attr-defined]
    assert status == 404 and body["code"] == "PGRST125"  # type: ignore[index]


def test_lakelet_up_stopping_stops_its_workers(server: Lakelet) -> None:
    assert server.proc is not None
    workers = workers_of(server.proc.pid)
    assert len(workers) == 2
    assert server.stop(timeout=60) == 0
    wait_for("the workers to exit", lambda: all(gone(p) for p in workers), timeout=30)
    assert "Traceback" not in server.output()


def test_a_killed_lakelet_up_leaves_no_worker_behind() -> None:
    saved = os.environ.pop("LAKELET_PASSWORD", None)
    try:
        with scratch_dir("lakelet-dataapi-workers-kill-") as root:
            server = Lakelet(root / "data", extra_args=["--data-api", f"127.0.0.1:{free_port()}",
                                                        "--data-api-workers", "2"])
            server.start()
            try:
                assert server.proc is not None
                workers = workers_of(server.proc.pid)
                assert len(workers) == 2
                server.kill()  # SIGKILL: no chance to stop them
                wait_for("the orphaned workers to exit", lambda: all(gone(p) for p in workers), timeout=30)
            finally:
                server.kill()
                # What a killed up leaves (its compute) the next start stops; do that now.
                server.start()
                server.stop(timeout=60)
    finally:
        if saved is not None:
            os.environ["LAKELET_PASSWORD"] = saved


def test_a_taken_port_is_reported_and_starts_no_worker() -> None:
    saved = os.environ.pop("LAKELET_PASSWORD", None)
    try:
        with scratch_dir("lakelet-dataapi-workers-busy-") as root, socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = Lakelet(root / "data", extra_args=["--data-api", f"127.0.0.1:{port}", "--data-api-workers", "2"])
            server.start()  # the Postgres endpoint and control API run without the Data API
            try:
                assert server.proc is not None
                assert "the data API could not listen; running without it: set data_api (--data-api)" \
                    in server.output()
                assert workers_of(server.proc.pid) == []
                assert server.stop(timeout=60) == 0
            finally:
                server.kill()
    finally:
        if saved is not None:
            os.environ["LAKELET_PASSWORD"] = saved
