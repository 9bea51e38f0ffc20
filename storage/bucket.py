"""Opening the store where ``store_uri`` says: a local directory, or a bucket that is the whole
project.

``file://PATH`` (or nothing: ``<data-dir>/store``) is the store as it always was. ``s3://BUCKET/PREFIX``
keeps everything durable in the bucket (see ``storage.uploader`` for the layout and the order of
writes) and uses ``<data-dir>/store`` as the working copy: the SQLite files, the WAL archive (the
tail not yet uploaded is only here) and a bounded cache of packs. Opening one:

1. the bucket exists and takes the credentials (else one line naming which);
2. the lease is taken (a second ``lakelet up`` on the bucket refuses here, see ``storage.lease``);
3. if the local working copy is missing or is not the bucket's latest (a fresh machine, an emptied
   data dir, or a machine that was replaced meanwhile), it is rebuilt from the bucket: the
   published snapshots of the catalog, page index and commit index, and every WAL object;
4. the store opens over an ``S3ObjectStore``; a first publish (``If-Match`` on ``state.json``)
   fences out whoever held the bucket before; the uploader and the lease renewal start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.backpressure import receivers
from storage.lease import LEASE_TTL, Lease
from storage.objectstore import ObjectNotFound
from storage.postgres import PgBinaries, ServiceUser
from storage.remotewal import RemoteWal
from storage.s3 import S3Client, S3Error, parse_s3_uri
from storage.s3objects import S3ObjectStore
from storage.store import Store
from storage.uploader import (
    FILES_PREFIX,
    META_PREFIX,
    STATE_KEY,
    WAL_PREFIX,
    Uploader,
    UploadMetrics,
    read_marker,
    restore,
)

log = logging.getLogger("lakelet.storage")

DEFAULT_CACHE_SIZE = 10 << 30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``cache_size``: bytes, or a number with K/M/G/T (powers of 1024: "512MB", "10GiB")."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cache_size = {text!r} is not a size: use bytes or a number with K, M, G or T (\"10GB\")")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()])


def is_bucket(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("s3://")


def local_root(uri: str | None, default: Path) -> Path:
    """Where the store's files are on this machine: the ``file://`` path, else ``default``."""
    if uri and uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri and not is_bucket(uri):
        raise S3Error(f"store_uri {uri!r} is neither file://PATH nor s3://BUCKET[/PREFIX]")
    return default


def upload_status(store: Store) -> dict[str, Any] | None:
    """A bucket store's upload state (``Uploader.status``), None for a local store."""
    uploader = getattr(store.objects, "uploader", None)
    return uploader.status() if uploader is not None else None


def _stop_orphan_receivers(wal_root: Path) -> None:
    """WAL receivers still writing into this store belong to a ``lakelet up`` that died (this one
    holds the data dir and the lease): it may have paused them (storage.backpressure), and a paused
    process never exits by itself."""
    for pid in receivers(wal_root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.warning("stopped a WAL receiver left by a previous lakelet up", extra={"pid": pid})


def _drop_unpublished_snapshots(client: S3Client, state: dict[str, Any]) -> None:
    """Snapshots uploaded by a round that died before switching ``state.json`` to them."""
    published = set(state.get("files", {}).values())
    stale = [k for k, _ in client.list(META_PREFIX) if not k.startswith(FILES_PREFIX) and k not in published]
    if stale:
        client.delete_many(stale)


def open_store(uri: str | None, root: Path, *, user: ServiceUser, pg: PgBinaries, retention_days: float = 7.0,
               upload_interval: float = 1.0, cache_size: int = DEFAULT_CACHE_SIZE,
               carry: dict[str, Path] | None = None, lease_ttl: float = LEASE_TTL,
               on_lease_lost: Callable[[str], None] | None = None, registry: Any = None,
               **store_args: Any) -> Store:
    """The store ``uri`` names (``root`` is the local directory: the store itself, or the bucket's
    working copy). ``carry``: small files outside the store (the credentials) kept in the bucket too
    and put back when missing."""
    root = local_root(uri, root)
    if not is_bucket(uri):
        return Store.open(root, user=user, pg=pg, retention_days=retention_days, **store_args)
    assert uri is not None
    location = parse_s3_uri(uri)
    client = S3Client(location)
    client.check()
    lease = Lease(client, root.parent, ttl=lease_ttl)
    lease.acquire()
    lease.start()  # renewed from now on: a restore may take longer than the lease lives
    if on_lease_lost is not None:
        lease.on_lost.append(on_lease_lost)
    carry = dict(carry or {})
    try:
        try:
            body, etag = client.get_with_etag(STATE_KEY)
            state: dict[str, Any] = json.loads(body)
        except ObjectNotFound:
            state, etag = {}, None
        marker = read_marker(root)
        has_local = (root / "catalog.db").exists()
        if state:
            if not has_local or marker.get("uri") != location.uri or marker.get("seq") != state.get("seq"):
                if has_local:
                    log.warning("the local store is not the bucket's latest; rebuilding it from the bucket",
                                extra={"store": location.uri, "local_seq": marker.get("seq"),
                                       "bucket_seq": state.get("seq")})
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                started = time.monotonic()
                fetched = restore(client, root, state, carry, lambda p: user.own(p, 0o700 if p.is_dir() else 0o600))
                log.info("store restored from the bucket", extra={
                    "store": location.uri, "seq": state.get("seq"), "bytes": fetched,
                    "seconds": round(time.monotonic() - started, 2)})
        elif has_local and marker.get("uri") != location.uri:
            raise S3Error(f"{root} holds a store that is not in {location.uri}: moving a local store into a bucket "
                          "is not supported; start on an empty data dir, or keep store_uri = file://")
        _stop_orphan_receivers(root / "wal")
        listing = dict(client.list(WAL_PREFIX))
        objects = S3ObjectStore(client, root / "cache", cache_size)
        objects.fence, objects.check = lease.confirm, lease.check
        client.fence = lease.check
        store = Store.open(root, user=user, pg=pg, retention_days=retention_days, objects=objects, **store_args)
        try:
            remote_wal = RemoteWal(client, objects.queue_delete)
            uploader = Uploader(client, root, objects, lease, interval=upload_interval,
                                maintenance=lambda: store._maintenance.shared(), files=carry, remote_wal=remote_wal)
            uploader.adopt(state, etag, listing)
            store.remote_wal = remote_wal
            uploader.drop_orphans({str(b.id) for b in store.catalog.branches()})
            uploader.round(force_publish=True)  # fences out whoever held the bucket before
        except BaseException:
            store.close()
            raise
        objects.uploader = uploader
        if registry is not None:
            registry.register(UploadMetrics(uploader))
        _drop_unpublished_snapshots(client, uploader.state)
        # Closers run last-registered first: the final upload round, then the lease goes.
        objects.closers += [lease.release, uploader.close]
        uploader.start()
        return store
    except BaseException:
        lease.release()
        raise
