"""Run a client library's own test folder twice — against a plain PostgreSQL 15 and through a fresh
``lakelet up`` — and print the tests whose outcome differs. Compatibility is judged by other
people's tests: a driver's suite must pass through the proxy exactly as it does direct.

    .venv/bin/python scripts/client_suite.py [--keep] /tmp/psycopg-tests [-- PYTEST ARGS...]

Both targets get the same kind of role: a non-superuser owner (LOGIN CREATEDB CREATEROLE, owning
database ``postgres``, with the grants ``lakelet up`` gives its project role), logging in with
SCRAM over TCP. The DSN is passed in ``PSYCOPG_TEST_DSN`` (``--dsn-var`` to change). Outcomes come
from pytest's JUnit XML; the suite's own code is run, never copied into this repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lakelet.client import wait_healthy  # noqa: E402
from lakelet.project import OWNER_GRANTS  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402

PASSWORD = "client-suite-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"client_suite: {what} exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"client_suite: {what} did not listen on {port} within {timeout:.0f}s")


def start_plain(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """initdb, SCRAM over TCP, and the owner role ``app``; returns the postmaster and the DSN."""
    pg, user = find_binaries(), resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))
    data, sock = root / "plain", root / "plain-socket"
    sock.mkdir()
    user.own(root, 0o755)
    user.own(sock, 0o700)
    subprocess.run([pg["initdb"], "-D", str(data), "-U", "admin", "--auth-local=trust", "--auth-host=scram-sha-256",
                    "-E", "UTF8", "--locale=C.UTF-8", "-N"], check=True, capture_output=True,
                   preexec_fn=user.preexec, env=user.child_env(), cwd="/")
    port = free_port()
    proc = subprocess.Popen([pg["postgres"], "-D", str(data), "-k", str(sock), "-c", "listen_addresses=127.0.0.1",
                             "-c", f"port={port}", "-c", "max_connections=200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=user.preexec,
                            env=user.child_env(), cwd="/", start_new_session=True)
    wait_port(port, proc, "postgres")
    grants = ", ".join(OWNER_GRANTS)
    sql = (f"CREATE ROLE app LOGIN CREATEDB CREATEROLE PASSWORD '{PASSWORD}'; GRANT {grants} TO app; "
           "ALTER DATABASE postgres OWNER TO app;")
    deadline = time.monotonic() + 60
    while True:  # the socket accepts while the server is still starting up
        out = subprocess.run([pg["psql"], "-h", str(sock), "-p", str(port), "-U", "admin", "-d", "postgres", "-v",
                              "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True,
                             preexec_fn=user.preexec, env=user.child_env(), cwd="/")
        if out.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"client_suite: setting up the plain server failed: {out.stderr.strip()}")
        time.sleep(0.2)
    return proc, f"host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=postgres sslmode=disable"


def start_lakelet(root: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port, http = free_port(), free_port()
    env = {**os.environ, "LAKELET_PASSWORD": PASSWORD, "LAKELET_DATA_API": "", **extra_env}
    log = open(root / "lakelet-up.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "lakelet.cli", "up", "--data-dir", str(root / "data"),
                             "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    if not wait_healthy(http, lambda: proc.poll() is None, 180):
        raise SystemExit(f"client_suite: lakelet up not healthy; see {root / 'lakelet-up.log'}")
    return proc, f"host=127.0.0.1 port={port} user=lakelet password={PASSWORD} dbname=postgres sslmode=disable"


def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def outcomes(xml_path: Path) -> dict[str, str]:
    """test id → passed / failed / error / skipped, from pytest's JUnit XML."""
    out: dict[str, str] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                     else "skipped" if "skipped" in kinds else "passed")
    return out


def run_suite(folder: Path, dsn: str, dsn_var: str, xml: Path, args: list[str], log: Path,
              python: str = sys.executable) -> dict[str, str]:
    env = {**os.environ, dsn_var: dsn}
    with open(log, "wb") as f:
        subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}", *args],
                       cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT)
    if not xml.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit("client_suite: pytest wrote no results:\n" + "\n".join(tail))
    return outcomes(xml)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the client's test folder (its rootdir, holding tests/)")
    ap.add_argument("--dsn-var", default="PSYCOPG_TEST_DSN", help="environment variable the suite reads")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, XML)")
    ap.add_argument("--lakelet-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for lakelet up, e.g. LAKELET_WARM_BACKENDS=0 (repeatable)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that runs the suite, e.g. a venv holding psycopg_pool (default: this one)")
    ap.add_argument("--proxy-dsn-suffix", default="",
                    help="appended to the proxy's DSN only, e.g. \"options='pool=transaction'\"")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    args = ap.parse_args()
    if args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    root = Path(tempfile.mkdtemp(prefix="client-suite-", dir="/tmp"))
    os.chmod(root, 0o755)
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        plain, plain_dsn = start_plain(root)
        procs.append((plain, signal.SIGINT))
        print(f"direct: {plain_dsn}", flush=True)
        direct = run_suite(args.folder, plain_dsn, args.dsn_var, root / "direct.xml", args.pytest_args,
                           root / "direct.log", args.python)
        stop(plain, signal.SIGINT)
        lake, lake_dsn = start_lakelet(root, dict(kv.split("=", 1) for kv in args.lakelet_env))
        procs.append((lake, signal.SIGTERM))
        lake_dsn = f"{lake_dsn} {args.proxy_dsn_suffix}".strip()
        print(f"proxy:  {lake_dsn}", flush=True)
        proxied = run_suite(args.folder, lake_dsn, args.dsn_var, root / "proxy.xml", args.pytest_args,
                            root / "proxy.log", args.python)
    finally:
        for proc, sig in reversed(procs):
            stop(proc, sig)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for name, results in (("direct", direct), ("proxy", proxied)):
        counts = {k: sum(1 for v in results.values() if v == k) for k in ("passed", "failed", "error", "skipped")}
        print(f"{name:<7} " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    differ = sorted(t for t in set(direct) | set(proxied) if direct.get(t) != proxied.get(t))
    for t in differ:
        print(f"  {t}: direct {direct.get(t, 'missing')}, proxy {proxied.get(t, 'missing')}")
    print(f"{len(differ)} test(s) differ" + (f"; logs in {root}" if args.keep else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
