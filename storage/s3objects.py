"""The object store in a bucket: packs and image manifests under ``objects/``, read through a
bounded local cache.

Objects are immutable (every key is new: packs are named by a random id, manifests by LSN and
time), so a cached copy never goes stale and the cache needs no invalidation: it keeps whole
objects, least recently used out first once ``cache_size`` bytes are held. A write goes to the
bucket and, on the way, into the cache (an image just written is usually read next).

Deletes are deferred: ``delete`` drops the cached copy at once but only queues the bucket delete.
The uploader (``storage.uploader``) deletes the queued keys in batches after it has published a
catalog snapshot taken after they were queued, so the catalog in the bucket never names an object
the bucket has lost (GC forgets an image in the catalog, then deletes its files).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage.objectstore import TEMP_MARK, ObjectNotFound, check_key
from storage.s3 import S3Client

log = logging.getLogger("lakelet.storage.s3")

PREFIX = "objects/"
FETCH_THREADS = 16


class S3ObjectStore:
    def __init__(self, client: S3Client, cache_dir: Path, cache_size: int) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cache_dir, 0o700)
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Event] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()  # cached key → size, least recent first
        self._held = 0
        self._deletes: list[str] = []
        # Deleted for everyone reading through this store, though the bucket delete is deferred.
        self._doomed: set[str] = set()
        self.closers: list[Callable[[], None]] = []
        # Called before every pack or manifest write: the lease's fencing token, confirmed with a
        # conditional PUT (raises once this process may not write).
        self.fence: Callable[[], None] = lambda: None
        # Called before a delete is queued: the cheap, time-based half of the fence.
        self.check: Callable[[], None] = lambda: None
        self.uploader: Any = None  # the storage.uploader.Uploader mirroring this store, once started
        self.cleanup_temp()
        for path in sorted(self._cached_files(), key=lambda p: p.stat().st_mtime):
            key = str(path.relative_to(cache_dir))
            self._lru[key] = path.stat().st_size
            self._held += self._lru[key]
        self._evict()

    def _cached_files(self) -> list[Path]:
        return [Path(d) / f for d, _, files in os.walk(self.cache_dir) for f in files if not f.startswith(TEMP_MARK)]

    def _path(self, key: str) -> Path:
        return self.cache_dir / check_key(key)

    # -- the cache ------------------------------------------------------------------------------

    def _touch(self, key: str) -> bool:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return True
            return False

    def _admit(self, key: str, size: int) -> None:
        with self._lock:
            if key not in self._lru:
                self._held += size
            self._lru[key] = size
            self._lru.move_to_end(key)
        self._evict(keep=key)

    def _evict(self, keep: str | None = None) -> None:
        with self._lock:
            while self._held > self.cache_size and self._lru:
                victim = next(iter(self._lru))
                if victim == keep:
                    if len(self._lru) == 1:
                        break
                    self._lru.move_to_end(victim)
                    continue
                self._held -= self._lru.pop(victim)
                self._path(victim).unlink(missing_ok=True)

    def _forget(self, key: str) -> None:
        with self._lock:
            if key in self._lru:
                self._held -= self._lru.pop(key)
        self._path(key).unlink(missing_ok=True)

    def _temp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex[:8]}-{path.name}")

    def _fetch(self, key: str) -> Path:
        """The cached copy of ``key``, downloading it (once, however many threads ask) if needed."""
        path = self._path(key)
        while True:
            if self._touch(key) and path.exists():
                return path
            with self._lock:
                event = self._fetching.get(key)
                mine = event is None
                if mine:
                    event = self._fetching[key] = threading.Event()
            assert event is not None
            if not mine:
                event.wait()
                continue
            try:
                tmp = self._temp(path)
                try:
                    self.client.get_to_file(PREFIX + key, tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                self._admit(key, path.stat().st_size)
                return path
            finally:
                with self._lock:
                    del self._fetching[key]
                event.set()

    def prefetch(self, keys: Iterable[str]) -> None:
        """Fetch ``keys`` into the cache in parallel (a materialize names its packs up front), as
        many as fit in the cache; the rest are fetched when read."""
        wanted: list[str] = []
        budget = self.cache_size
        ordered = list(dict.fromkeys(keys))
        missing = [k for k in ordered if k not in self._lru]
        # One listing instead of a HEAD per object (many objects share a folder: packs/).
        sizes = {}
        for folder in {k.rsplit("/", 1)[0] + "/" for k in missing if "/" in k}:
            sizes.update((name[len(PREFIX):], size) for name, size in self.client.list(PREFIX + folder))
        for key in ordered:
            size = self._lru.get(key) or sizes.get(key)
            if size is None:
                continue
            if size > budget:
                break
            budget -= size
            wanted.append(key)
        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="lakelet-fetch") as pool:
            list(pool.map(self._fetch, wanted))

    # -- ObjectStore ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self.put_chunks(key, (data,))

    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> None:
        self.fence()
        path = self._path(key)
        tmp = self._temp(path)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            self.client.put_file(PREFIX + key, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._admit(key, path.stat().st_size)

    def get(self, key: str) -> bytes:
        for _ in range(3):  # evicted between fetch and read: fetch again
            try:
                return self._fetch(key).read_bytes()
            except FileNotFoundError:
                continue
        return self.client.get(PREFIX + key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        for _ in range(3):
            try:
                with open(self._fetch(key), "rb") as f:
                    f.seek(start)
                    return f.read(length)
            except FileNotFoundError:
                continue
        return self.client.get_range(PREFIX + key, start, length)

    def get_to_file(self, key: str, path: Path) -> None:
        for _ in range(3):
            try:
                shutil.copyfile(self._fetch(key), path)
                return
            except FileNotFoundError:
                continue
        self.client.get_to_file(PREFIX + key, path)

    def list(self, prefix: str = "") -> list[str]:
        return sorted(name[len(PREFIX):] for name, _ in self.client.list(PREFIX + prefix)
                      if name not in self._doomed)

    def size(self, key: str) -> int:
        found = None if PREFIX + key in self._doomed else self.client.head(PREFIX + check_key(key))
        if found is None:
            raise ObjectNotFound(key)
        return found[0]

    def exists(self, key: str) -> bool:
        if PREFIX + key in self._doomed:
            return False
        if self._touch(key) and self._path(key).exists():
            return True
        return self.client.head(PREFIX + check_key(key)) is not None

    def delete(self, key: str) -> None:
        self.check()
        self._forget(check_key(key))
        with self._lock:
            self._deletes.append(PREFIX + key)
            self._doomed.add(PREFIX + key)

    def total_bytes(self, prefix: str = "") -> int:
        return sum(size for name, size in self.client.list(PREFIX + prefix) if name not in self._doomed)

    def cleanup_temp(self) -> int:
        removed = 0
        for dirpath, _, files in os.walk(self.cache_dir):
            for name in files:
                if name.startswith(TEMP_MARK):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
        return removed

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()

    # -- for the uploader -----------------------------------------------------------------------

    def take_deletes(self) -> list[str]:
        """Bucket keys queued for deletion so far (the caller deletes them after its next publish)."""
        with self._lock:
            out, self._deletes = self._deletes, []
        return out

    def deleted(self, keys: list[str]) -> None:
        """The bucket no longer has ``keys``."""
        with self._lock:
            self._doomed.difference_update(keys)

    def queue_delete(self, bucket_key: str) -> None:
        """Delete ``bucket_key`` (any key, not only under ``objects/``) after the next publish."""
        self.check()
        with self._lock:
            self._deletes.append(bucket_key)

    def requeue_deletes(self, keys: list[str]) -> None:
        """Put back keys taken by a round that failed before deleting them."""
        with self._lock:
            self._deletes[:0] = keys
