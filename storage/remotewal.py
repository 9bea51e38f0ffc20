"""WAL segments that are only in the bucket: with an ``s3://`` store, local disk keeps just the
tail of each branch's WAL archive.

Once the uploader (``storage.uploader``) has a finished segment in the bucket it drops the local
copy and records it here (``offload``); every finished segment but each directory's newest one
goes so (``pg_receivewal`` resumes after the newest segment in its directory, so that one stays).
The store asks this index for a branch's whole archive (local files plus these names) and reads
offloaded segments back on demand:

* point in time and the commit index read through ``readable`` (a private directory holding a
  hard link to every local file — an eviction meanwhile cannot pull it from under ``pg_waldump``
  — and a fresh download of every offloaded one, removed afterwards);
* ``materialize`` stages the finished segments a replay needs (links and downloads) next to the
  compute's data dir, so its ``restore_command`` never depends on what is evicted while it runs.

Deleting an offloaded segment (GC, a deleted or reset branch) queues its bucket key with the
object store's deferred deletes: it leaves the bucket after the next catalog publish, like packs.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from storage.s3 import S3Client

WAL_PREFIX = "wal/"


class RemoteWal:
    def __init__(self, client: S3Client, queue_delete: Callable[[str], None]) -> None:
        self.client = client
        self._queue_delete = queue_delete
        self._lock = threading.Lock()
        # "<branch-id>/<segment>" → (size, mtime) of finished segments in the bucket only.
        self._offloaded: dict[str, tuple[int, float]] = {}

    def offload(self, rel: str, size: int, mtime: float) -> None:
        with self._lock:
            self._offloaded[rel] = (size, mtime)

    def is_offloaded(self, rel: str) -> bool:
        with self._lock:
            return rel in self._offloaded

    def entries(self, branch_dir: str) -> dict[str, tuple[int, float]]:
        """Segment name → (size, mtime) of ``branch_dir``'s offloaded segments."""
        prefix = branch_dir + "/"
        with self._lock:
            return {rel[len(prefix):]: v for rel, v in self._offloaded.items() if rel.startswith(prefix)}

    def all(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return dict(self._offloaded)

    def forget(self, rel: str) -> None:
        """The segment is gone for the store: delete it from the bucket (deferred)."""
        with self._lock:
            known = self._offloaded.pop(rel, None)
        if known is not None:
            self._queue_delete(WAL_PREFIX + rel)

    def drop_dir(self, branch_dir: str) -> None:
        for name in self.entries(branch_dir):
            self.forget(f"{branch_dir}/{name}")

    def fetch(self, rel: str, dest: Path) -> None:
        """Download one offloaded segment to ``dest`` (atomically)."""
        tmp = dest.with_name(f".{dest.name}.fetch")
        try:
            self.client.get_to_file(WAL_PREFIX + rel, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (free, and it keeps the file alive if evicted meanwhile), else a copy."""
    try:
        os.link(src, dest)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        shutil.copyfile(src, dest)
