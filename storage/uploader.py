"""Keeps the bucket the whole project: the WAL archive as it grows, and consistent snapshots of the
catalog, the page index and the commit index, every ``wal_upload_interval``.

Locally the store works as it always did (``pg_receivewal`` fsyncs into ``store/wal/``, SQLite
files in ``store/``); this thread mirrors it. One round:

1. every file under ``wal/`` that changed since it was last uploaded goes up (a growing
   ``.partial`` segment again each time it grew — that is what bounds the loss window);
2. the SQLite files that changed are snapshotted (SQLite's online backup), catalog first and page
   index second while GC is held off, so every image the catalog names has its pages in the index;
3. history files and images' WAL copies are scanned again: they are written before the catalog
   rows that name them, so after this step the bucket has every one the snapshot names;
4. the snapshots go up under new keys and ``state.json`` is switched to them with ``If-Match`` on
   the ETag this process last wrote — the publish is atomic, and fenced: a process whose lease was
   taken over fails here (412) and stops;
5. only then are objects deleted (batches of up to 1000): the files that disappeared locally before
   the round started, the keys the object store queued (GC, branch deletes), and the previous
   snapshots. The bucket's catalog therefore never names anything the bucket no longer has.

A commit acknowledged before a round starts is in the bucket when that round ends: the promise is
"within ``wal_upload_interval`` plus one round". S3 errors are retried inside each request (see
``storage.s3``); a round that still fails is logged once as one line and the next round retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zstandard

from storage import wal
from storage.backpressure import CommitHold
from storage.lease import Lease, LeaseLost
from storage.objectstore import ObjectNotFound
from storage.remotewal import RemoteWal
from storage.s3 import PreconditionFailed, S3Client, S3Error
from storage.s3objects import S3ObjectStore

log = logging.getLogger("lakelet.storage.uploader")

STATE_KEY = "state.json"
WAL_PREFIX = "wal/"
META_PREFIX = "meta/"
FILES_PREFIX = "meta/files/"
# SQLite files kept in the bucket, in snapshot order (the catalog before the page index).
DATABASES = ("catalog.db", "pages.db", "commits.db")
MARKER = "bucket.json"
UPLOAD_THREADS = 4

Signature = tuple[int, int]


def _sig(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _db_sig(path: Path) -> tuple[Signature | None, Signature | None]:
    return _sig(path), _sig(path.with_name(path.name + "-wal"))


def read_marker(root: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((root / MARKER).read_text()))
    except (OSError, ValueError):
        return {}


def write_marker(root: Path, uri: str, seq: int) -> None:
    tmp = root / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"uri": uri, "seq": seq}))
    os.replace(tmp, root / MARKER)


class Uploader:
    def __init__(self, client: S3Client, root: Path, objects: S3ObjectStore, lease: Lease, *,
                 interval: float, maintenance: Callable[[], contextlib.AbstractContextManager[object]],
                 files: dict[str, Path] | None = None, hold_after: float | None = None,
                 remote_wal: RemoteWal | None = None) -> None:
        self.client = client
        # Finished segments go from local disk once in the bucket (None: keep every one locally).
        self.remote_wal = remote_wal
        self.evicted = 0
        self.root = root
        self.wal_root = root / "wal"
        self.objects = objects
        self.lease = lease
        self.interval = interval
        self.maintenance = maintenance
        self.files = dict(files or {})
        self._uploaded: dict[str, Signature] = {}  # bucket key → local signature it was uploaded at
        self._db_sigs: dict[str, tuple[Signature | None, Signature | None]] = {}
        self.state: dict[str, Any] = {}
        self._state_etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_lock = threading.Lock()
        self._confirmed = False  # this round confirmed the lease (see _confirm)
        self.failing: str | None = None
        self.rounds = 0
        self.last_round_at = 0.0  # wall time at which the last successful round started
        self.bytes_uploaded = 0
        # Commits wait (storage.backpressure) once the WAL not yet uploaded is older than this.
        self.hold_after = hold_after if hold_after is not None else max(5.0, 5 * interval)
        self.hold = CommitHold(self.wal_root)
        self._pending_since: dict[str, tuple[Signature | None, float]] = {}
        self._watchdog: threading.Thread | None = None
        self.backlog_seconds = 0.0  # the watchdog's latest backlog_age()
        self.bytes_behind = 0  # and the size of the WAL files changed since their last upload

    # -- start ----------------------------------------------------------------------------------

    def adopt(self, state: dict[str, Any], etag: str | None, listing: dict[str, int]) -> None:
        """Start from what the bucket holds: the published state, and every WAL object whose local
        file has the same size counts as uploaded (segments are written once; a ``.partial`` that
        matches is uploaded again once, which is cheap)."""
        self.state, self._state_etag = state, etag
        for key, size in listing.items():
            if not key.startswith(WAL_PREFIX):
                continue
            local = self.wal_root / key[len(WAL_PREFIX):]
            sig = _sig(local)
            if sig is not None and sig[0] == size and not key.endswith(".partial"):
                self._uploaded[key] = sig
            elif sig is None and self.remote_wal is not None and offloadable(key[len(WAL_PREFIX):]):
                self.remote_wal.offload(key[len(WAL_PREFIX):], size, time.time())
            elif sig is None:
                self._uploaded[key] = (size, 0)  # in the bucket only: deleted after the first publish

    def drop_orphans(self, branch_dirs: set[str]) -> None:
        """Forget offloaded segments of branches the catalog does not have (a crash between a
        branch delete and the bucket delete), and of timelines with no history file (see
        ``_drop_unknown_timelines``): they go with the next round's deletes."""
        if self.remote_wal is None:
            return
        known = {1} | {int(p.name[:8], 16) for p in (self.wal_root / "history").glob("*.history")}
        for rel in self.remote_wal.all():
            branch_dir, name = rel.split("/", 1)
            if branch_dir not in branch_dirs or int(name[:8], 16) not in known:
                self.remote_wal.forget(rel)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lakelet-uploader", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="lakelet-upload-watch", daemon=True)
        self._watchdog.start()

    def backlog_age(self) -> float:
        """Seconds since the oldest WAL change not yet in the bucket was first seen (0: none)."""
        now = time.monotonic()
        seen: dict[str, tuple[Signature | None, float]] = {}
        behind = 0
        for path in self._walk(self.wal_root):
            key = WAL_PREFIX + str(path.relative_to(self.wal_root))
            sig, done = _sig(path), self._uploaded.get(key)
            if sig is not None and done != sig:
                before = self._pending_since.get(key)
                seen[key] = before if before is not None and before[0] == done else (done, now)
                behind += sig[0]
        self._pending_since = seen
        self.bytes_behind = behind
        return now - min(t for _, t in seen.values()) if seen else 0.0

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                age = self.backlog_seconds = self.backlog_age()
            except OSError:
                continue
            if age > self.hold_after:
                self.hold.hold(f"the WAL not yet in {self.client.where()} is {age:.0f}s old "
                               f"({self.failing or 'the upload is behind'}); they complete once it is uploaded")
            elif age < self.hold_after / 2:
                self.hold.release()

    def status(self) -> dict[str, Any]:
        """How far the bucket is behind, for ``lakelet status`` and ``/healthz`` (no I/O: what the
        watchdog measured last). ``stalled`` is why commits cannot become durable in the bucket
        now (None while it keeps up): the oldest change not yet uploaded is older than the point
        where commits start waiting for it."""
        stalled = None
        if self.hold.holding or self.backlog_seconds > self.hold_after:
            stalled = (f"the WAL not yet in {self.client.where()} is {self.backlog_seconds:.0f}s old "
                       f"({self.failing or 'the upload is behind'})")
        return {"store": self.client.where(), "bytes_behind": self.bytes_behind,
                "backlog_seconds": round(self.backlog_seconds, 3),
                "last_upload": self.last_round_at or None, "failing": self.failing,
                "commits_held": self.hold.holding, "stalled": stalled}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.round_logged()

    def round_logged(self) -> bool:
        try:
            self.round()
        except LeaseLost:
            self._stop.set()
            return False
        except (S3Error, OSError, sqlite3.Error) as e:
            if self.failing is None:
                log.error("upload to the bucket failing; retrying every round (acknowledged commits are kept "
                          "locally meanwhile)", extra={"store": self.client.where(), "error": str(e)})
            self.failing = str(e)
            return False
        if self.failing is not None:
            log.info("upload to the bucket recovered", extra={"store": self.client.where()})
            self.failing = None
        return True

    def close(self) -> None:
        """Stop, after a last round (a clean stop leaves the bucket exactly as the local store)."""
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None:
                thread.join()
        self.hold.release()
        if self.lease.lost is None:
            self.round_logged()

    # -- one round ------------------------------------------------------------------------------

    def round(self, *, force_publish: bool = False) -> None:
        with self._round_lock:
            started = time.time()
            self.lease.check()
            self._confirmed = False
            doomed = self.objects.take_deletes()
            try:
                gone = self._upload_tree(self.wal_root, WAL_PREFIX)
                self._evict()
                snapshots = self._snapshot()
                self._upload_tree(self.wal_root / "history", WAL_PREFIX + "history/")
                self._upload_tree(self.wal_root / "ckpt", WAL_PREFIX + "ckpt/")
                self._upload_files()
                superseded = self._publish(snapshots, force=force_publish)
            except BaseException:
                self.objects.requeue_deletes(doomed)
                raise
            doomed += gone + superseded
            if doomed:
                self._confirm()
                try:
                    self.client.delete_many(doomed)
                except BaseException:
                    self.objects.requeue_deletes([k for k in doomed if k.startswith("objects/") or (
                        k.startswith(WAL_PREFIX) and k not in gone)])
                    raise
                self.objects.deleted(doomed)
                for key in gone:
                    self._uploaded.pop(key, None)
            self.rounds += 1
            self.last_round_at = started

    def _evict(self) -> None:
        """Drop the local copy of every finished segment the bucket has, but the newest of each
        branch directory (``pg_receivewal`` resumes after it)."""
        if self.remote_wal is None:
            return
        for entry in os.scandir(self.wal_root):
            if not (entry.is_dir() and entry.name.isdigit()):
                continue
            finished = sorted((lsn_order(name), name) for name in os.listdir(entry.path)
                              if (m := wal.SEGMENT.match(name)) and m.group(2) is None)
            for _, name in finished[:-1]:
                path = Path(entry.path) / name
                key = f"{WAL_PREFIX}{entry.name}/{name}"
                sig = _sig(path)
                if sig is None or self._uploaded.get(key) != sig:
                    continue
                self.remote_wal.offload(f"{entry.name}/{name}", sig[0], sig[1] / 1e9)
                path.unlink(missing_ok=True)
                del self._uploaded[key]
                self.evicted += 1

    def _confirm(self) -> None:
        """Before a round's first write: the fencing token is still ours (a conditional PUT on
        the lease object; ``LeaseLost`` once another took it). A round with nothing to write
        sends nothing, so an idle store costs no requests."""
        if not self._confirmed:
            self.lease.confirm()
            self._confirmed = True

    def _walk(self, top: Path) -> Iterator[Path]:
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # a WAL copy being made
            for name in files:
                if not name.startswith("."):
                    yield Path(dirpath) / name

    def _upload_tree(self, top: Path, prefix: str) -> list[str]:
        """Upload what changed under ``top``; returns the bucket keys of files gone from it."""
        present: set[str] = set()
        todo: list[tuple[str, Path, Signature]] = []
        for path in self._walk(top):
            key = prefix + str(path.relative_to(top))
            present.add(key)
            sig = _sig(path)
            if sig is not None and self._uploaded.get(key) != sig:
                todo.append((key, path, sig))
        if todo:
            self._confirm()
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="lakelet-upload") as pool:
                list(pool.map(lambda t: self._upload_one(*t), todo))
        return [k for k in self._uploaded if k.startswith(prefix) and k not in present]

    def _upload_one(self, key: str, path: Path, sig: Signature) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # a .partial renamed to its final name meanwhile: the next round sends that
        self.client.put(key, data)
        self.bytes_uploaded += len(data)
        self._uploaded[key] = sig

    def pending(self) -> tuple[int, int]:
        """(files, bytes) under ``wal/`` changed since their last upload: what a lost machine
        would lose right now."""
        files = size = 0
        for path in self._walk(self.wal_root):
            sig = _sig(path)
            if sig is not None and self._uploaded.get(WAL_PREFIX + str(path.relative_to(self.wal_root))) != sig:
                files += 1
                size += sig[0]
        return files, size

    def _upload_files(self) -> None:
        for name, path in self.files.items():
            key = FILES_PREFIX + name
            sig = _sig(path)
            if sig is not None and self._uploaded.get(key) != sig:
                self._confirm()
                self.client.put(key, path.read_bytes())
                self._uploaded[key] = sig

    def _snapshot(self) -> dict[str, bytes]:
        """Consistent, compressed copies of the SQLite files that changed since the last round."""
        out: dict[str, bytes] = {}
        with self.maintenance():
            for name in DATABASES:
                path = self.root / name
                sig = _db_sig(path)
                if sig[0] is None or (self._db_sigs.get(name) == sig and name in self.state.get("files", {})):
                    continue
                out[name] = _backup(path)
                self._db_sigs[name] = sig
        return out

    def _publish(self, snapshots: dict[str, bytes], *, force: bool) -> list[str]:
        """Upload new snapshots and switch ``state.json`` to them; returns keys now superseded."""
        if not snapshots and not force:
            return []
        self._confirm()
        seq = int(self.state.get("seq", 0)) + 1
        files = dict(self.state.get("files", {}))
        superseded = []
        for name, blob in snapshots.items():
            # Keyed by the holder's token too: a write still in flight when another took the lease
            # can never replace a snapshot the new holder published under the same seq.
            key = f"{META_PREFIX}{seq:012d}-{self.lease.token}/{name}.zst"
            self.client.put(key, blob)
            self.bytes_uploaded += len(blob)
            if name in files:
                superseded.append(files[name])
            files[name] = key
        state = {"seq": seq, "token": self.lease.token, "files": files, "published_at": time.time()}
        self.lease.check()
        body = json.dumps(state).encode()
        try:
            if self._state_etag is None:
                self._state_etag = self.client.put(STATE_KEY, body, if_none_match=True)
            else:
                self._state_etag = self.client.put(STATE_KEY, body, if_match=self._state_etag)
        except PreconditionFailed:
            self.lease.lose(f"another lakelet up published to {self.client.where()}; this one stopped writing to it")
            raise LeaseLost(str(self.lease.lost)) from None
        self.state = state
        write_marker(self.root, self.client.location.uri, seq)
        return superseded


class UploadMetrics:
    """Prometheus collector: how far the bucket is behind, and whether commits wait for it."""

    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        u = self.uploader
        yield GaugeMetricFamily("lakelet_store_upload_backlog_seconds",
                                "Age of the oldest WAL change not yet in the bucket", value=u.backlog_seconds)
        yield CounterMetricFamily("lakelet_store_uploaded_bytes", "Bytes uploaded to the bucket",
                                  value=u.bytes_uploaded)
        yield GaugeMetricFamily("lakelet_store_upload_failing", "1 while upload rounds to the bucket fail",
                                value=1 if u.failing else 0)
        yield GaugeMetricFamily("lakelet_store_commits_held", "1 while commits wait for the bucket to catch up",
                                value=1 if u.hold.holding else 0)


def lsn_order(segment: str) -> tuple[int, int]:
    """(segment number, timeline): ``pg_receivewal``'s order for "the newest segment"."""
    return int(segment[8:16], 16) << 32 | int(segment[16:24], 16), int(segment[:8], 16)


def offloadable(rel: str) -> bool:
    """A finished segment directly in a branch's archive ("<branch-id>/<segment>")."""
    parts = rel.split("/")
    return len(parts) == 2 and parts[0].isdigit() and bool((m := wal.SEGMENT.match(parts[1])) and m.group(2) is None)


def _backup(path: Path) -> bytes:
    """SQLite's online backup of ``path`` (a consistent copy while others write), zstd-compressed."""
    tmp = path.with_name(f".{path.name}.snapshot")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(path)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    try:
        return zstandard.ZstdCompressor(level=3).compress(tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def _drop_unknown_timelines(wal_root: Path) -> None:
    """Remove restored segments of timelines with no history file. A round that died between
    uploading a new timeline's first segments and its history file leaves such segments; the
    timeline is unknown to the restored catalog, so a promotion may pick its ID again, and its
    stale segments must not be served (or resumed after) under that ID."""
    known = {1} | {int(p.name[:8], 16) for p in (wal_root / "history").glob("*.history")}
    for path in wal_root.glob("*/*"):
        m = wal.SEGMENT.match(path.name)
        if m and path.parent.name.isdigit() and int(m.group(1)[:8], 16) not in known:
            path.unlink()


def restore(client: S3Client, root: Path, state: dict[str, Any], files: dict[str, Path],
            own: Callable[[Path], None]) -> int:
    """Bring ``root`` (an empty local store) to what the bucket published: the SQLite files from
    ``state``'s snapshots, every WAL object, and the carried files that are missing locally.
    Returns the bytes fetched."""
    fetched = 0
    decompress = zstandard.ZstdDecompressor()
    for name, key in state.get("files", {}).items():
        if name not in DATABASES:
            continue
        blob = client.get(key)
        fetched += len(blob)
        tmp = root / f".{name}.restore"
        with open(tmp, "wb") as f:
            f.write(decompress.decompressobj().decompress(blob))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / name)
    wal_keys = [(k, size) for k, size in client.list(WAL_PREFIX) if not any(p.startswith(".") for p in k.split("/"))]
    # Locally only the tail: finished segments stay in the bucket (storage.remotewal), but the
    # newest of each branch directory, which pg_receivewal resumes after.
    segs = [(k, size) for k, size in wal_keys if offloadable(k[len(WAL_PREFIX):])]
    wal_keys = [item for item in wal_keys if item not in segs]
    newest: dict[str, tuple[tuple[int, int], tuple[str, int]]] = {}
    for key, size in segs:
        branch_dir, name = key[len(WAL_PREFIX):].split("/")
        if branch_dir not in newest or lsn_order(name) > newest[branch_dir][0]:
            newest[branch_dir] = (lsn_order(name), (key, size))
    wal_keys += [item for _, item in newest.values()]

    def fetch(item: tuple[str, int]) -> int:
        key, size = item
        dest = root / "wal" / key[len(WAL_PREFIX):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.restore")
        try:
            client.get_to_file(key, tmp)
        except ObjectNotFound:
            return 0
        os.replace(tmp, dest)
        return size

    with ThreadPoolExecutor(8, thread_name_prefix="lakelet-restore-wal") as pool:
        fetched += sum(pool.map(fetch, wal_keys))
    _drop_unknown_timelines(root / "wal")
    for dirpath, _, filenames in os.walk(root / "wal"):
        own(Path(dirpath))
        for name in filenames:
            own(Path(dirpath) / name)
    for name, path in files.items():
        if path.exists():
            continue
        try:
            data = client.get(FILES_PREFIX + name)
        except ObjectNotFound:
            continue
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        fetched += len(data)
    return fetched


__all__ = ["DATABASES", "UploadMetrics", "Uploader", "read_marker", "restore", "write_marker"]
