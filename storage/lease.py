"""Who may write the bucket: one lease object, taken and renewed with conditional PUTs.

``lease.json`` names its holder (host, boot, pid, data dir), when it was last renewed and a
fencing token that grows by one at every change of holder. Taking it is a PUT with
``If-None-Match: *`` (no lease yet) or ``If-Match: <the ETag read>`` (an expired one, or one whose
holder is a dead process on this very machine — a ``kill -9``'d ``lakelet up``); of two racing
takers the bucket lets exactly one win. A live lease makes a second ``lakelet up`` refuse in one
line. Renewal is again ``If-Match`` on the holder's own last ETag, so a holder whose lease was taken
learns it at its next renewal (412), and one that cannot renew for two thirds of the TTL stops
writing on its own before anyone else may take over.

Fencing, so that one whose lease was taken never writes after the taker started:

* ``confirm`` is a renewal made on the write path: a conditional PUT (``If-Match``) on the lease
  object, which fails once anyone else wrote it. Every upload round (WAL, catalog, page and commit
  index snapshots, the publish, batch deletes) and every pack or manifest write confirms first;
* ``check`` runs before every attempt of every write, retries included (``S3Client.fence``): no
  write is sent more than two thirds of the TTL after the last confirmation, i.e. before the lease
  can look expired to anyone else;
* the catalog publish is itself conditional on the state object (``storage.uploader``), and its
  snapshots are keyed by the holder's token, so not even a write in flight at the takeover can
  replace what the new holder published.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from storage.errors import StorageError
from storage.objectstore import ObjectNotFound
from storage.s3 import PreconditionFailed, S3Client, S3Error

log = logging.getLogger("lakelet.storage.lease")

LEASE_KEY = "lease.json"
LEASE_TTL = 20.0


class StoreInUse(StorageError):
    """Another ``lakelet up`` holds the bucket's lease."""


class LeaseLost(StorageError):
    """This process no longer holds the lease: it must not write to the bucket."""


def _wall() -> float:
    """This machine's clock, which lease expiry across machines trusts (one seam to skew it)."""
    return time.time()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, client: S3Client, data_dir: Path, *, ttl: float = LEASE_TTL) -> None:
        self.client = client
        self.ttl = ttl
        self.me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "data_dir": str(data_dir)}
        self.token = 0
        self._etag: str | None = None
        self._renewed = 0.0  # monotonic time of the last successful renewal
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one conditional PUT at a time: each needs the last ETag
        self.on_lost: list[Callable[[str], None]] = []

    # -- taking it ------------------------------------------------------------------------------

    def _body(self, renewed_at: float) -> bytes:
        return json.dumps({"token": self.token, "holder": self.me, "renewed_at": renewed_at,
                           "ttl": self.ttl}).encode()

    def _takeable(self, held: dict[str, object]) -> str | None:
        """None if ``held`` can be taken over now, else why not (for the refusal line)."""
        holder = held.get("holder") or {}
        assert isinstance(holder, dict)
        age = _wall() - float(held.get("renewed_at", 0))  # type: ignore[arg-type]
        ttl = float(held.get("ttl", LEASE_TTL))  # type: ignore[arg-type]
        if age > ttl:
            return None
        if (holder.get("host"), holder.get("boot")) == (self.me["host"], self.me["boot"]) \
                and not _pid_alive(int(holder.get("pid", 0))):
            return None  # a dead process on this machine: a kill -9'd lakelet up
        return (f"{self.client.where()} is in use by lakelet pid {holder.get('pid')} on {holder.get('host')} "
                f"(data dir {holder.get('data_dir')}, renewed {max(age, 0):.0f}s ago): stop it, or wait "
                f"{ttl - age:.0f}s for its lease to expire")

    def acquire(self) -> None:
        try:
            body, etag = self.client.get_with_etag(LEASE_KEY)
        except ObjectNotFound:
            body, etag = b"", None
        held: dict[str, object] = json.loads(body) if body else {}
        if held:
            refusal = self._takeable(held)
            if refusal:
                raise StoreInUse(refusal)
        self.token = int(held.get("token", 0)) + 1  # type: ignore[call-overload]
        try:
            if etag is None:
                self._etag = self.client.put(LEASE_KEY, self._body(_wall()), if_none_match=True, fenced=False)
            else:
                self._etag = self.client.put(LEASE_KEY, self._body(_wall()), if_match=etag, fenced=False)
        except PreconditionFailed:
            raise StoreInUse(f"{self.client.where()} was just taken by another lakelet up: stop it first") from None
        self._renewed = time.monotonic()
        log.info("store lease taken", extra={"store": self.client.where(), "token": self.token})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lakelet-lease", daemon=True)
        self._thread.start()

    # -- holding it -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if self._lost:
                return
            self.renew()

    def _put_renewal(self) -> None:
        with self._lock:
            if self._lost is not None:
                raise LeaseLost(self._lost)
            started = time.monotonic()
            self._etag = self.client.put(LEASE_KEY, self._body(_wall()), if_match=self._etag, fenced=False)
            self._renewed = started

    def renew(self) -> None:
        try:
            self._put_renewal()
        except LeaseLost:
            return
        except PreconditionFailed:
            self.lose(f"the lease on {self.client.where()} was taken by another lakelet up; "
                      "this one stopped writing to it")
        except S3Error as e:
            if time.monotonic() - self._renewed > self.ttl * 2 / 3:
                self.lose(f"could not renew the lease on {self.client.where()} for "
                          f"{time.monotonic() - self._renewed:.0f}s ({e}); stopped writing to it")

    def confirm(self) -> None:
        """The fencing token is still ours, now: a conditional PUT on the lease object (it
        renews the lease too). Raises ``LeaseLost`` once someone else wrote it."""
        self.check()
        try:
            self._put_renewal()
        except PreconditionFailed:
            self.lose(f"the lease on {self.client.where()} was taken by another lakelet up; "
                      "this one stopped writing to it")
            raise LeaseLost(str(self._lost)) from None

    def lose(self, why: str) -> None:
        if self._lost:
            return
        self._lost = why
        log.error(why)
        for callback in self.on_lost:
            callback(why)

    def check(self) -> None:
        """The fence: raise unless this process may still write to the bucket."""
        if self._lost is None and time.monotonic() - self._renewed > self.ttl * 2 / 3:
            self.lose(f"the lease on {self.client.where()} was not renewed for "
                      f"{time.monotonic() - self._renewed:.0f}s; stopped writing to it")
        if self._lost is not None:
            raise LeaseLost(self._lost)

    @property
    def lost(self) -> str | None:
        return self._lost

    def release(self) -> None:
        """Give the lease up (a clean stop): the next ``lakelet up`` may take it at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._lost is None and self._etag is not None:
            try:
                self.client.put(LEASE_KEY, self._body(0.0), if_match=self._etag, fenced=False)
            except S3Error as e:
                log.warning("could not release the store lease; it expires by itself",
                            extra={"error": str(e), "ttl": self.ttl})
