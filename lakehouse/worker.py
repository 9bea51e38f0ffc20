"""``python -m lakehouse.worker SPEC.json``: one sync as its own process.

A process, not a thread of ``lakelet up``: decoding is Python work that would otherwise compete
with the proxy's relay for the GIL, and a process can be killed (by a test, by the OOM killer)
without taking anything else down — the Delta log and the slot make the next run resume exactly.

Commands arrive as lines on stdin: ``drain LSN`` (flush and confirm through LSN; status then shows
``drained_lsn``) and ``stop``. SIGTERM stops too. Exit codes: 0 stopped, 3 the compute went away
(the manager restarts the worker once it is active again), 2 a configuration error (in status),
1 anything else, e.g. the object store not answering (restarted with backoff).
"""

from __future__ import annotations

import fcntl
import logging
import signal
import sys
import threading
from pathlib import Path

import psycopg2

from lakehouse.location import LocationError
from lakehouse.syncer import StopSync, Syncer, SyncSpec, parse_lsn


def _commands(syncer: Syncer) -> None:
    for line in sys.stdin:
        parts = line.split()
        if parts[:1] == ["drain"] and len(parts) == 2:
            syncer.drain_target = parse_lsn(parts[1])
        elif parts[:1] == ["stop"]:
            syncer.stop_requested = True
    syncer.stop_requested = True  # the manager is gone: stop rather than run unsupervised


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lakehouse-sync %(message)s")
    spec = SyncSpec.load(Path(argv[0]))
    # One worker per sync, whoever starts it: a second one would race the first for the slot and
    # the Delta tables. The lock goes with the process (also on kill -9).
    Path(spec.state_dir).mkdir(parents=True, exist_ok=True)
    lock = open(Path(spec.state_dir) / "worker.lock", "w")  # noqa: SIM115 - held for the process' life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another worker runs this sync; exiting", file=sys.stderr)
        return 3
    syncer = Syncer(spec)
    signal.signal(signal.SIGTERM, lambda *_: setattr(syncer, "stop_requested", True))
    if not (len(argv) > 1 and argv[1] == "--no-stdin"):
        threading.Thread(target=_commands, args=(syncer,), daemon=True).start()
    try:
        syncer.run()
    except StopSync as e:
        syncer.status.state, syncer.status.error = "error", str(e)
        syncer.write_status(force=True)
        return 2
    except LocationError as e:  # the object store did not answer: the manager retries with backoff
        syncer.status.state, syncer.status.error = "disconnected", str(e)
        syncer.write_status(force=True)
        return 1
    except (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.DatabaseError) as e:
        # DatabaseError: psycopg2 reports a server gone mid-COPY ("no COPY in progress") so.
        reason = (str(e).strip().splitlines() or ["connection lost"])[0]
        syncer.status.state, syncer.status.error = "disconnected", reason
        syncer.write_status(force=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
