"""``lakelet up --store s3://…`` end to end: lose the machine, keep the project.

A real ``lakelet up`` writes through the proxy while its bucket (moto's S3 server on loopback,
behind a relay that can answer 503 SlowDown) has a bad spell; then it is killed with SIGKILL and
its data dir removed. A fresh ``up`` on an empty data dir and the same bucket brings back every
branch, role and acknowledged row (row by row), with point-in-time still working. A second ``up``
on a bucket in use refuses in one line, and so do a missing bucket and missing credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from storage.s3 import S3Client, parse_s3_uri
from tests.conftest import environ, scratch_dir
from tests.s3server import FaultyRelay, S3Server, aws_env, free_port, moto_server, require_credentials
from tests.shell.lakelet_process import Lakelet, cli, cli_json, password_of

UPLOAD_INTERVAL = 0.5
# Commits acknowledged this long before the kill must all come back (the promise is one upload
# interval plus one upload round; the margin is for a loaded 2-core machine).
WINDOW = 4.0
# The bucket fails this long: longer than the 5 s after which commits wait for it.
OUTAGE = 9.0


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[S3Server, FaultyRelay]]:
    with moto_server() as server:
        relay = FaultyRelay(server.endpoint)
        try:
            yield server, relay
        finally:
            relay.close()


def kill_leftovers(data_dir: Path) -> None:
    """SIGKILL every process still naming ``data_dir`` (computes and WAL receivers outlive a
    kill -9 of ``lakelet up``: they run in their own sessions)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(data_dir).encode() in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass




def up(data_dir: Path, uri: str, endpoint: str) -> Lakelet:
    env = {**aws_env(endpoint), "LAKELET_WAL_UPLOAD_INTERVAL": str(UPLOAD_INTERVAL), "LAKELET_PASSWORD": ""}
    return Lakelet(data_dir, extra_args=["--store", uri, "--suspend-timeout", "600"], env=env)


def write_for(conn: psycopg.Connection, table: str, seconds: float, start: int, acked: dict[int, float]) -> float:
    """Insert rows ``start``, ``start + 1``… one commit at a time for ``seconds``; record when each
    was acknowledged. Returns the longest a commit took."""
    n = start
    longest = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (n,))
        acked[n] = time.monotonic()
        longest = max(longest, acked[n] - t0)
        n += 1
        time.sleep(0.01)
    return longest


def test_kill_9_and_an_empty_data_dir_lose_nothing_acknowledged(s3: tuple[S3Server, FaultyRelay]) -> None:
    server, relay = s3
    uri = f"s3://{server.new_bucket()}/lake"
    with scratch_dir("lakelet-s3up-") as root:
        data_dir = root / "data"
        first = up(data_dir, uri, relay.endpoint)
        first.start()
        try:
            password = password_of(data_dir)
            ca = (data_dir / "tls" / "ca.crt").read_bytes()
            acked: dict[int, float] = {}
            with psycopg.connect(first.dsn("lakelet", password), autocommit=True) as conn:
                conn.execute("CREATE TABLE t (n int PRIMARY KEY)")
                write_for(conn, "t", 2.0, 1, acked)
                before_outage = max(acked) + 1
                moment = datetime.now(UTC).isoformat()
                time.sleep(0.5)
                cli("branch", "create", "feature", data_dir=data_dir, check=True)
                cli("role", "create", "alice", "--password", "wonderland", data_dir=data_dir, check=True)
                # The bucket answers 503 SlowDown for a while: commits go on (fsynced locally) until
                # the WAL not yet uploaded is HOLD_AFTER seconds old, then they wait until the
                # upload has caught up.
                # Meanwhile /healthz and `lakelet status` say the store's durability is stalled.
                health: list[tuple[int, str]] = []
                status_text: list[str] = []
                sampled = threading.Event()

                def sample() -> None:
                    while not sampled.wait(0.5):
                        health.append(first.http("/healthz"))
                        if health[-1][0] == 503 and not any("store: durability stalled" in t for t in status_text):
                            status_text.append(cli("status", data_dir=data_dir).stdout)

                sampler = threading.Thread(target=sample, daemon=True)
                relay.failing.set()
                threading.Timer(OUTAGE, relay.failing.clear).start()
                sampler.start()
                longest = write_for(conn, "t", OUTAGE + 2.0, max(acked) + 1, acked)
                sampled.set()
                sampler.join()
                assert relay.refused > 0 and not relay.failing.is_set()
                assert longest > 2.0  # some commit waited for the bucket
                stalled = [json.loads(body)["durability_stalled"] for code, body in health if code == 503]
                assert any("not yet in s3://" in s.get("store", "") for s in stalled), health
                assert any("store: durability stalled: the WAL not yet in" in t for t in status_text), status_text
                write_for(conn, "t", WINDOW + 4.0, max(acked) + 1, acked)
                deadline = time.monotonic() + 60
                while first.http("/healthz")[0] != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert first.http("/healthz")[0] == 200  # caught up: durable again
                assert "of WAL not yet uploaded, last upload" in cli("status", data_dir=data_dir).stdout
            with psycopg.connect(first.dsn("lakelet", password, branch="feature"), autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (-1)")
            feature_acked = time.monotonic()
            time.sleep(WINDOW)
            killed_at = time.monotonic()
            first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.proc.wait()  # type: ignore[union-attr]
        finally:
            first.kill()
            kill_leftovers(data_dir)
        assert "S3 request failing; retrying with backoff" in first.output()
        assert "commits wait: the WAL not yet in" in first.output()
        assert "commits go on: the bucket caught up" in first.output()
        shutil.rmtree(data_dir)

        second = up(data_dir, uri, server.endpoint)
        second.start()
        try:
            assert password_of(data_dir) == password  # the project's credentials came back too
            assert (data_dir / "tls" / "ca.crt").read_bytes() == ca  # and its CA: sslrootcert still verifies
            branches = {b["name"] for b in cli_json("branch", "list", data_dir=data_dir)["branches"]}
            assert branches == {"main", "feature"}
            with psycopg.connect(second.dsn("lakelet", password), autocommit=True) as conn:
                have = {r[0] for r in conn.execute("SELECT n FROM t")}
            must = {k for k, t in acked.items() if t < killed_at - WINDOW}
            assert must and must <= have, f"lost acknowledged rows: {sorted(must - have)[:10]}"
            assert have <= set(acked)  # nothing that was not written
            assert len(must) > before_outage  # rows written during and after the 503s are among them
            with psycopg.connect(second.dsn("alice", "wonderland"), autocommit=True) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("alice",)
            with psycopg.connect(second.dsn("lakelet", password, branch="feature"), autocommit=True) as conn:
                feature = {r[0] for r in conn.execute("SELECT n FROM t")}
            assert feature_acked < killed_at - WINDOW and -1 in feature
            cli("branch", "create", "past", "--at", moment, data_dir=data_dir, check=True)
            with psycopg.connect(second.dsn("lakelet", password, branch="past"), autocommit=True) as conn:
                past = {r[0] for r in conn.execute("SELECT n FROM t")}
            assert past == set(range(1, before_outage))

            status, metrics = second.http("/metrics")
            assert status == 200 and "lakelet_store_upload_backlog_seconds" in metrics
            assert "lakelet_store_commits_held 0.0" in metrics

            # A second up on the bucket in use refuses in one line.
            other = subprocess.run(
                [sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(root / "other"), "--store", uri,
                 "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
                capture_output=True, text=True, timeout=120, env=aws_env(server.endpoint))
            assert other.returncode != 0
            lines = other.stderr.strip().splitlines()
            assert len(lines) == 1 and "is in use by lakelet pid" in lines[0], other.stderr

            # Another lakelet takes the bucket over: this one stops writing to it and exits.
            bucket = uri.split("/")[2]
            client = server.client()
            lease = json.loads(client.get_object(Bucket=bucket, Key="lake/lease.json")["Body"].read())
            lease.update(token=lease["token"] + 1, holder={"host": "elsewhere", "pid": 1}, renewed_at=time.time())
            client.put_object(Bucket=bucket, Key="lake/lease.json", Body=json.dumps(lease).encode())
            assert second.proc is not None
            assert second.proc.wait(120) == 1
            assert "was taken by another lakelet up; this one stopped writing to it" in second.output()
        finally:
            second.kill()
            kill_leftovers(data_dir)


def _failed_up(workdir: Path, uri: str, env: dict[str, str]) -> list[str]:
    """``lakelet up --store uri`` that must fail at start: the lines it wrote to stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(workdir / "data"), "--store", uri,
         "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()


def test_missing_bucket_credentials_or_endpoint_fail_at_start_in_one_line(s3: tuple[S3Server, FaultyRelay],
                                                                 workdir: Path) -> None:
    server, _ = s3

    def start(uri: str, env: dict[str, str]) -> list[str]:
        return _failed_up(workdir, uri, env)

    lines = start("s3://no-such-bucket-here/x", aws_env(server.endpoint))
    assert len(lines) == 1 and "bucket 'no-such-bucket-here' does not exist" in lines[0], lines
    env = {k: v for k, v in aws_env(server.endpoint).items() if not k.startswith("AWS_ACCESS_KEY_ID")
           and not k.startswith("AWS_SECRET")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(workdir / "none")
    lines = start(f"s3://{server.new_bucket()}", env)
    assert len(lines) == 1 and "credentials" in lines[0], lines
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lines = start(f"s3://{server.new_bucket()}", aws_env(nobody))
    assert len(lines) == 1 and f"check that {nobody} is reachable" in lines[0], lines


def test_refused_credentials_fail_at_start_in_one_line_naming_which(workdir: Path) -> None:
    """Against a server that checks signatures (moto's IAM mode): a wrong secret and an unknown
    key each fail ``up`` in one line naming the credentials and S3's reason, while the right key
    on a missing bucket names the bucket."""
    with moto_server() as server:
        bucket = server.new_bucket()
        key, secret = require_credentials(server)

        def start(uri: str, key: str, secret: str) -> list[str]:
            env = {**aws_env(server.endpoint), "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
            return _failed_up(workdir, uri, env)

        lines = start(f"s3://{bucket}/x", key, secret + "x")
        assert len(lines) == 1 and "refused the credentials" in lines[0] and "SignatureDoesNotMatch" in lines[0], lines
        lines = start(f"s3://{bucket}/x", "AKIANOSUCHKEY0000000", secret)
        assert len(lines) == 1 and "refused the credentials" in lines[0] and "InvalidAccessKeyId" in lines[0], lines
        lines = start("s3://no-such-bucket-here/x", key, secret)
        assert len(lines) == 1 and "bucket 'no-such-bucket-here' does not exist" in lines[0], lines
        # The right key is taken: the same check passes, and a conditional write works signed.
        with environ({**server.env(), "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}):
            client = S3Client(parse_s3_uri(f"s3://{bucket}/x"))
            client.check()
            client.put("probe", b"1", if_none_match=True)
            assert client.get("probe") == b"1"
