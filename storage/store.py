"""The store: branches as timelines over a WAL archive and a deduplicated page store.

Layout under ``<data-dir>/store/``: ``catalog.db`` (branches, timelines, images, roles),
``pages.db`` + ``objects/`` (packs and image manifests), ``wal/<branch-id>/`` (each branch's
archived WAL, written by its compute's synchronous receiver), ``wal/ckpt/<image>/`` (each image's
own copy of the WAL its replay starts with, as it was when the image was made: the segment holding
the shutdown checkpoint of a clean image, the whole backup range of an online one) and
``wal/history/`` (every timeline history file).

Images are made when a compute shuts down cleanly (``take_image``) and, while it runs, from a base
backup of it (``take_online_image``, when ``needs_image`` says its WAL has grown).

``materialize`` is the one way a compute gets a data directory: the nearest image on the branch's
ancestry, plus ``recovery.signal`` and a ``restore_command`` over the ancestry's WAL, so that
Postgres itself replays to the target and promotes onto a new, store-wide unique timeline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage import images, online, pitr, plan, retention, wal
from storage import lsn as lsnmod
from storage.catalog import BranchRow, Catalog, ImageRow
from storage.commits import CommitIndex, HistoryPiece
from storage.errors import (
    BranchExists,
    BranchNotFound,
    HasChildren,
    InvalidName,
    InvalidTarget,
    MaterializeError,
    ProtectedBranch,
    StorageError,
)
from storage.objectstore import LocalObjectStore, ObjectStore, fsync_dir
from storage.pagestore import PageStore
from storage.pitr import parse_time
from storage.postgres import PgBinaries, ServiceUser, last_error_line, quote_literal, repair_tree, run
from storage.remotewal import RemoteWal, link_or_copy
from storage.retention import FORKED_DIR, GcReport

log = logging.getLogger("lakelet.storage")

ROOT_BRANCH = "main"
ADMIN_ROLE = "lakelet_admin"
BRANCH_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole name: fullmatch (``$`` allows a final newline)
SOURCE_FILE = "lakelet-source.json"
# Next to a compute's data dir: placeholder history files that steer its promotion's timeline ID.
RESERVED_DIR = "reserved-timelines"
# Next to a compute's data dir: finished WAL segments its replay needs, staged by materialize when
# the archive keeps only its tail locally (a bucket store).
STAGED_WAL_DIR = "staged-wal"
IMAGE_WAL_THRESHOLD = 256 << 20
# Small WAL segments: a branch that wrote a little holds a little, in the archive and in copies.
WAL_SEGMENT_MB = 1
# A shutdown checkpoint record (with a page header it may straddle) is far smaller than this.
CHECKPOINT_RECORD_MAX = 512
# How long an online image waits for the receiver to archive the WAL through the backup's end.
STREAMED_TIMEOUT = 60.0


@dataclass(frozen=True)
class Branch:
    id: int
    name: str
    parent: str | None
    parent_lsn: str | None
    created_at: datetime


@dataclass(frozen=True)
class BranchInfo:
    branch: Branch
    logical_bytes: int
    wal_bytes: int
    images: int


@dataclass(frozen=True)
class Materialized:
    datadir: Path
    needs_recovery: bool
    # The timeline the compute promotes onto (reserved for it by the store), None without recovery.
    timeline: int | None = None


def controldata(pg: PgBinaries, user: ServiceUser, datadir: Path) -> dict[str, str]:
    proc = run([pg["pg_controldata"], "-D", str(datadir)], user, env={"LC_ALL": "C"})
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


class Store:
    def __init__(self, root: Path, *, user: ServiceUser, pg: PgBinaries, retention_days: float = 7.0,
                 image_wal_threshold: int = IMAGE_WAL_THRESHOLD, objects: ObjectStore | None = None) -> None:
        self.root = root
        self.user = user
        self.pg = pg
        self.retention = timedelta(days=retention_days)
        # WAL a branch may stream past its newest image before ``needs_image`` asks for another.
        self.image_wal_threshold = image_wal_threshold
        root.mkdir(parents=True, exist_ok=True)
        user.share_dir(root)
        self.catalog = Catalog(root / "catalog.db")
        # Packs and manifests: this directory, or a bucket (storage.bucket.open_store passes it).
        self.objects: ObjectStore = objects if objects is not None else LocalObjectStore(root / "objects")
        self.objects.cleanup_temp()
        self.pages = PageStore(self.objects, root / "pages.db")
        self.commits = CommitIndex(pg, user, self._segment_size(), root / "commits.db")
        self.commits.readable = self.readable_wal
        # With a bucket store: the WAL segments that are only in the bucket (storage.remotewal).
        self.remote_wal: RemoteWal | None = None
        self.wal_root = root / "wal"
        self.history_dir = self.wal_root / "history"
        self.ckpt_root = self.wal_root / "ckpt"
        self.tmp_root = root / "tmp"
        for d in (self.wal_root, self.history_dir, self.ckpt_root, self.tmp_root):
            d.mkdir(exist_ok=True)
            user.own(d, 0o700)
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir()
        user.own(self.tmp_root, 0o700)
        # Timeline IDs are unique store-wide and handed out here (``_reserve_timeline``): a
        # counter under a lock held for an increment, never across a replay.
        self._tli_lock = threading.Lock()
        self._next_tli = max([*wal.history_tlis(self.history_dir), 1]) + 1
        self._reserved: set[int] = set()
        # GC decides which pages are live from the catalog, but an image's pages exist before its
        # catalog row does, and a restore reads packs GC may rewrite: GC runs alone.
        self._maintenance = SharedExclusiveLock()
        # Called with a branch name after its roles changed, or None after the branch set changed
        # (in the thread that made the change): the control plane keeps its memory current so.
        self._listeners: list[Callable[[str | None], None]] = []
        self._make_private()
        self._sweep_crash_leftovers()

    def _make_private(self) -> None:
        """Check and repair modes: the catalog (with every role's verifier), the page store and
        the packs (every row) are ours alone; the WAL archive belongs to the service user, which
        streams into it and replays from it. The store dir itself only lets that user through."""
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False):
                repair_tree(Path(entry.path))
        repair_tree(self.root / "objects")
        repair_tree(self.wal_root, owner=self.user)

    def subscribe(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(branch)`` after a branch's roles change, ``listener(None)`` after the
        branch set changes (create, delete, rename, reset, restore)."""
        self._listeners.append(listener)

    def _changed(self, branch: str | None = None) -> None:
        for listener in self._listeners:
            try:
                listener(branch)
            except Exception:
                log.exception("store change listener failed")

    @classmethod
    def open(cls, root: Path, *, user: ServiceUser, pg: PgBinaries, retention_days: float = 7.0,
             image_wal_threshold: int = IMAGE_WAL_THRESHOLD, objects: ObjectStore | None = None) -> Store:
        return cls(root, user=user, pg=pg, retention_days=retention_days, image_wal_threshold=image_wal_threshold,
                   objects=objects)

    def close(self) -> None:
        self.objects.close()  # a bucket backend uploads what is left first
        self.commits.close()
        self.pages.close()
        self.catalog.close()

    def _sweep_crash_leftovers(self) -> None:
        """Remove what an operation killed half-way left behind, none of which the catalog refers
        to: WAL of deleted branches, manifests and checkpoint copies of images never recorded (or
        already dropped). Runs at open, when no operation of this store is in flight; leftover
        pages go at the next GC."""
        branch_ids = {str(b.id) for b in self.catalog.branches()}
        for entry in os.listdir(self.wal_root):
            stem = entry.removesuffix(".ckpt")
            if stem.isdigit() and stem not in branch_ids:
                self._drop_wal(entry)
        recorded = {i.manifest_key for i in self.catalog.images()}
        for key in self.objects.list("images/"):
            if key.endswith(".manifest") and key not in recorded:
                self.objects.delete(key)
        wanted = {self._ckpt_dir(key).name for key in recorded}
        for entry in os.listdir(self.ckpt_root):
            if entry not in wanted:
                shutil.rmtree(self.ckpt_root / entry, ignore_errors=True)

    # -- lookups ----------------------------------------------------------------------------------

    def _row(self, name: str) -> BranchRow:
        row = self.catalog.branch_by_name(name)
        if row is None:
            known = ", ".join(b.name for b in self.catalog.branches()) or "none"
            raise BranchNotFound(f"branch {name!r} does not exist (branches: {known})")
        return row

    def _public(self, row: BranchRow) -> Branch:
        parent = self.catalog.branch_by_id(row.parent_id) if row.parent_id else None
        return Branch(row.id, row.name, parent.name if parent else None,
                      lsnmod.fmt(row.parent_lsn) if row.parent_lsn is not None else None, row.created)

    def get_branch(self, name: str) -> Branch:
        return self._public(self._row(name))

    def branch_names(self) -> list[str]:
        return [b.name for b in self.catalog.branches()]

    def receiver_dir(self, branch: str) -> Path:
        """``wal_dir``, made fit for ``pg_receivewal`` to resume in (short partials padded)."""
        path = self.wal_dir(branch)
        padded = wal.pad_partials(path, self._segment_size())
        if padded:
            log.warning("padded partial WAL segments a full disk left short", extra={"branch": branch,
                                                                                    "segments": padded})
        return path

    def wal_dir(self, branch: str) -> Path:
        path = self.wal_root / str(self._row(branch).id)
        if not path.exists():
            path.mkdir()
            self.user.own(path, 0o700)
        return path

    def _ancestry(self, row: BranchRow) -> list[tuple[BranchRow, int | None]]:
        return plan.ancestry(self, row)

    def _tli_at(self, row: BranchRow, at: int | None) -> int:
        return plan.tli_at(self, row, at)

    def _dirs(self, row: BranchRow) -> list[Path]:
        return plan.dirs(self, row)

    def _ckpt_dir(self, manifest_key: str) -> Path:
        """Where an image keeps the WAL segment(s) holding its checkpoint record. Named after the
        manifest, not the image's catalog ID, so it is in place before the row that makes the
        image exist."""
        stem = manifest_key.removeprefix("images/").removesuffix(".manifest").replace("/", "-")
        return self.ckpt_root / stem

    # -- branches ---------------------------------------------------------------------------------

    def bootstrap(self) -> Branch:
        """Create ``main`` on first use: initdb, then image 0, so nothing durable depends on a
        compute's local disk from the very first start."""
        existing = self.catalog.branch_by_name(ROOT_BRANCH)
        if existing is not None:
            return self._public(existing)
        work = Path(tempfile.mkdtemp(prefix="initdb-", dir=self.tmp_root))
        self.user.own(work, 0o700)
        datadir = work / "pgdata"
        proc = run([self.pg["initdb"], "-D", str(datadir), "-U", ADMIN_ROLE, "--auth=trust", "-E", "UTF8",
                    "--locale=C.UTF-8", "--no-sync", f"--wal-segsize={WAL_SEGMENT_MB}"], self.user, check=False)
        if proc.returncode != 0:
            proc = run([self.pg["initdb"], "-D", str(datadir), "-U", ADMIN_ROLE, "--auth=trust", "-E", "UTF8",
                        "--locale=C", "--no-sync", f"--wal-segsize={WAL_SEGMENT_MB}"], self.user, check=False)
        if proc.returncode != 0:
            raise MaterializeError(f"initdb failed: {last_error_line(proc.stderr + proc.stdout)}")
        with self.catalog.transaction() as db:
            branch_id = self.catalog.insert_branch(db, ROOT_BRANCH, None, None, None)
        self._image(branch_id, datadir)
        shutil.rmtree(work, ignore_errors=True)
        log.info("created root branch", extra={"branch": ROOT_BRANCH})
        self._changed()
        return self.get_branch(ROOT_BRANCH)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not BRANCH_NAME.fullmatch(name):
            raise InvalidName(f"branch name {name!r} is not allowed: use 1-63 characters of a-z, 0-9, _ and -, "
                              "starting with a letter or digit")
        if self.catalog.branch_by_name(name) is not None:
            raise BranchExists(f"branch {name!r} already exists: choose another name or delete it first")

    def create_branch(self, name: str, parent: str = ROOT_BRANCH, *, at: str | None = None,
                      head_lsn: str | None = None) -> Branch:
        """A new branch from ``parent`` at its head (``head_lsn`` when its compute runs), at an LSN,
        or at a timestamp. Writes one catalog row: O(1) whatever the database size."""
        self._check_new_name(name)
        prow = self._row(parent)
        lsn, kind = self._resolve_target(prow, at, head_lsn)
        with self.catalog.transaction() as db:
            branch_id = self.catalog.insert_branch(db, name, prow.id, lsn, kind)
            self.catalog.copy_roles(db, branch_id, prow.id)
        self._changed()
        return self.get_branch(name)

    def _resolve_target(self, prow: BranchRow, at: str | None, head_lsn: str | None) -> tuple[int, str]:
        if at:
            return self._resolve_at(prow, at)
        if head_lsn:
            return lsnmod.parse(head_lsn), "before"
        if not self.catalog.timelines(prow.id) and prow.parent_id is not None:
            # Never ran: its head is still its own branch point.
            assert prow.parent_lsn is not None
            return prow.parent_lsn, prow.target_kind or "before"
        latest = self._latest_image(prow)
        if latest is not None and not self.catalog.is_running(prow.id):
            return latest.lsn, "immediate"  # stopped cleanly: its newest image is its head
        records = self._records(prow)
        if not records:
            raise InvalidTarget(f"branch {prow.name!r} has no history in the store yet: start it once first")
        return records[-1].lsn, "through"

    def _resolve_at(self, prow: BranchRow, at: str) -> tuple[int, str]:
        return pitr.resolve_at(self, prow, at)

    def _pieces(self, row: BranchRow) -> Iterator[HistoryPiece]:
        return pitr.pieces(self, row)

    def _records(self, row: BranchRow) -> list[wal.WalRecord]:
        return pitr.records(self, row)

    def list_branches(self) -> list[BranchInfo]:
        out = []
        for row in self.catalog.branches():
            image = self._image_for(row)
            logical = image.logical_bytes if image else 0
            wal_bytes = sum(p.stat().st_size for p in (self.wal_root / str(row.id)).glob("*") if p.is_file())
            wal_bytes += sum(size for size, _ in self._offloaded(row.id).values())
            out.append(BranchInfo(self._public(row), logical, wal_bytes, len(self.catalog.images(row.id))))
        return out

    def physical_bytes(self) -> int:
        total = self.objects.total_bytes()
        for dirpath, _, files in os.walk(self.wal_root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        if self.remote_wal is not None:
            total += sum(size for size, _ in self.remote_wal.all().values())
        return total

    def delete_branch(self, name: str, *, force: bool = False) -> None:
        row = self._row(name)
        if row.parent_id is None:
            raise ProtectedBranch(f"branch {name!r} is the root branch and cannot be deleted")
        doomed = [row]
        i = 0
        while i < len(doomed):
            kids = self.catalog.children(doomed[i].id)
            if kids and not force:
                names = ", ".join(k.name for k in kids)
                raise HasChildren(f"branch {name!r} has child branches ({names}): delete them first or pass --force")
            doomed += kids
            i += 1
        dropped = [i for b in doomed for i in self.catalog.images(b.id)]
        with self.catalog.transaction() as db:
            for b in doomed:
                self.catalog.delete_branch(db, b.id)
        # Data goes only after the catalog forgot it (a crash in between leaves leftovers the next
        # open sweeps); unreferenced pages go at the next GC.
        self._changed()
        self._drop_image_files(dropped)
        for b in doomed:
            self._drop_wal(str(b.id))
            self._drop_wal(f"{b.id}.ckpt")

    def subtree(self, name: str) -> list[str]:
        """``name`` and every branch descending from it, parents before children."""
        rows = [self._row(name)]
        i = 0
        while i < len(rows):
            rows += self.catalog.children(rows[i].id)
            i += 1
        return [r.name for r in rows]

    def rename_branch(self, old: str, new: str) -> None:
        row = self._row(old)
        self._check_new_name(new)
        with self.catalog.transaction() as db:
            self.catalog.rename_branch(db, row.id, new)
        self._changed()

    def reset_branch(self, name: str, *, head_lsn: str | None = None) -> Branch:
        """Re-point ``name`` to its parent's current head, dropping its own changes."""
        row = self._row(name)
        if row.parent_id is None:
            raise ProtectedBranch(f"branch {name!r} has no parent to reset to")
        kids = self.catalog.children(row.id)
        if kids:
            raise HasChildren(f"branch {name!r} has child branches ({', '.join(k.name for k in kids)}): "
                              "delete them before resetting it")
        prow = self.catalog.branch_by_id(row.parent_id)
        assert prow is not None
        lsn, kind = self._resolve_target(prow, None, head_lsn)
        dropped = self.catalog.images(row.id)
        with self.catalog.transaction() as db:
            self.catalog.repoint_branch(db, row.id, lsn, kind)
        self._drop_image_files(dropped)
        self._drop_wal(str(row.id))
        self._drop_wal(f"{row.id}.ckpt")
        self._changed()
        return self.get_branch(name)

    def restore_branch(self, name: str, at: str) -> tuple[Branch, str]:
        """``name`` as it was at ``at``; the current state stays as ``<name>_old_<timestamp>``."""
        row = self._row(name)
        lsn, kind = self._resolve_at(row, at)
        backup = f"{name}_old_{datetime.now(UTC):%Y%m%d%H%M%S}"[:63]
        self._check_new_name(backup)
        with self.catalog.transaction() as db:
            self.catalog.rename_branch(db, row.id, backup)
            new_id = self.catalog.insert_branch(db, name, row.id, lsn, kind)
            self.catalog.copy_roles(db, new_id, row.id)
            # Children follow the name: they keep their data (their parent_lsn is on the old line).
        self._changed()
        return self.get_branch(name), backup

    # -- roles ------------------------------------------------------------------------------------

    def set_roles(self, branch: str, roles: dict[str, str | None]) -> None:
        self.catalog.set_roles(self._row(branch).id, roles)
        self._changed(branch)

    def roles(self, branch: str) -> dict[str, str | None]:
        return self.catalog.roles(self._row(branch).id)

    # -- images -----------------------------------------------------------------------------------

    def _latest_image(self, row: BranchRow) -> ImageRow | None:
        own = self.catalog.images(row.id)
        return own[-1] if own else None

    def _image_for(self, row: BranchRow, at: int | None = None) -> ImageRow | None:
        return plan.image_for(self, row, at)

    def _image(self, branch_id: int, datadir: Path) -> ImageRow:
        info = controldata(self.pg, self.user, datadir)
        state = info.get("Database cluster state", "")
        if state != "shut down":
            raise MaterializeError(f"cannot image {datadir}: it was not shut down cleanly (state: {state})")
        ckpt = lsnmod.parse(info["Latest checkpoint location"])
        tli = int(info["Latest checkpoint's TimeLineID"])
        seg = self._segment_size()
        names = sorted({lsnmod.segment_name(tli, lsn, seg) for lsn in (ckpt, ckpt + CHECKPOINT_RECORD_MAX)})
        if not (datadir / "pg_wal" / names[0]).exists():
            raise MaterializeError(f"cannot image {datadir}: WAL segment {names[0]} with its checkpoint is missing")
        # Recovery from an image starts by reading its checkpoint record, and the streamed archive
        # may not have it (nothing streams initdb's WAL). And a branch made exactly at the image
        # must replay nothing after it, while the streamed segment goes on with whatever the parent
        # wrote later: this copy, taken now, ends at the checkpoint.
        segments = [datadir / "pg_wal" / n for n in names if (datadir / "pg_wal" / n).exists()]
        image = self._record_image(branch_id, datadir, ckpt, tli, segments, redo_lsn=None)
        self._write_source(datadir, branch_id, image.id)
        return image

    def _record_image(self, branch_id: int, datadir: Path, lsn: int, tli: int, segments: list[Path],
                      redo_lsn: int | None) -> ImageRow:
        """Store ``datadir`` as an image at ``lsn``, with its own copy of ``segments`` (the WAL
        replay from it needs first).

        Pages, manifest and WAL copy are durable before the catalog row that makes the image
        exist: a crash before it leaves only leftovers, never a half image."""
        key = f"images/{branch_id}/{lsn:016X}-{time.time_ns()}.manifest"
        with self._maintenance.shared():
            stats = images.write_image(self.pages, self.objects, datadir, key)
            self._keep_wal_copy(segments, self._ckpt_dir(key))
            image_id = self.catalog.add_image(branch_id, lsn, tli, key, stats.logical_bytes, redo_lsn=redo_lsn)
        log.info("image stored", extra={"branch_id": branch_id, "lsn": lsnmod.fmt(lsn), "files": stats.files,
                                         "online": redo_lsn is not None, "logical_bytes": stats.logical_bytes,
                                         "new_bytes": stats.new_bytes})
        return next(i for i in self.catalog.images(branch_id) if i.id == image_id)

    def _keep_wal_copy(self, segments: list[Path], dest: Path) -> None:
        """Copy ``segments``, as they are now, into ``dest`` (atomically: all or nothing)."""
        tmp = self.ckpt_root / f".{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for src in segments:
            self._copy_segment(src, tmp / src.name)
            with open(tmp / src.name, "rb") as f:
                os.fsync(f.fileno())
            self.user.own(tmp / src.name, 0o600)
        self.user.own(tmp, 0o700)
        fsync_dir(tmp)
        os.replace(tmp, dest)
        fsync_dir(self.ckpt_root)

    def _drop_image_files(self, dropped: list[ImageRow]) -> int:
        """Delete manifests and checkpoint copies of images the catalog no longer has."""
        freed = 0
        for image in dropped:
            if self.objects.exists(image.manifest_key):
                freed += self.objects.size(image.manifest_key)
            self.objects.delete(image.manifest_key)
            ckpt_dir = self._ckpt_dir(image.manifest_key)
            if ckpt_dir.is_dir():
                freed += sum(p.stat().st_size for p in ckpt_dir.iterdir())
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return freed

    def take_image(self, branch: str, datadir: Path) -> None:
        """Store a cleanly shut down compute's data dir as the branch's newest image."""
        self._image(self._row(branch).id, datadir)

    def take_online_image(self, branch: str, *, host: str, port: int,
                          add_files: Callable[[Path], object] | None = None) -> ImageRow:
        """Image ``branch`` while its compute (listening at ``host``/``port``) runs on.

        A base backup of the running compute (see ``storage.online`` for why this design), stored
        like any image once the archive holds its WAL through the backup's end. Its catalog row
        has ``lsn`` = the backup's end (the first LSN it can serve: materialize never picks it for
        an earlier target) and ``redo_lsn`` = the backup's start. Its WAL copy (what a clean
        image's checkpoint copy is) holds every segment from the redo point to the end, so the
        image alone reaches consistency: GC keeps the branch's WAL from ``lsn`` on, as for any
        image, and may drop what lies before the copy.

        The branch stays marked running: its compute goes on writing past the image.
        ``add_files(datadir)`` may add to the copy before it is stored what ``pg_basebackup``
        leaves out (the compute's lakehouse-sync slots, ``compute.logical_slots.copy_live``)."""
        row = self._row(branch)
        work = Path(tempfile.mkdtemp(prefix="online-", dir=self.tmp_root))
        try:
            self.user.own(work, 0o700)
            backup = online.base_backup(self.pg, self.user, host=host, port=port, role=ADMIN_ROLE,
                                        datadir=work / "pgdata")
            if add_files is not None:
                add_files(backup.datadir)
            segments = self._streamed_range(row, backup)
            return self._record_image(row.id, backup.datadir, backup.end_lsn, backup.tli, segments,
                                      redo_lsn=backup.start_lsn)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _streamed_range(self, row: BranchRow, backup: online.BaseBackup) -> list[Path]:
        """The archived segments holding ``backup``'s WAL range, once the receiver completed them.

        Ending a backup switches to a new segment, so the one holding the backup's end is
        completed (renamed from ``.partial``) as soon as the receiver has all of the range."""
        seg = self._segment_size()
        names = online.segment_names(backup.tli, backup.start_lsn, backup.end_lsn, seg)
        deadline = time.monotonic() + STREAMED_TIMEOUT
        while True:
            files = self.wal_files(row.id)
            last = files.get(names[-1])
            if last is not None and not last.name.endswith(".partial"):
                break
            if time.monotonic() > deadline:
                raise online.OnlineImageError(f"WAL through {lsnmod.fmt(backup.end_lsn)} of branch {row.name!r} "
                                              f"did not reach the store in {STREAMED_TIMEOUT:.0f}s")
            time.sleep(0.05)
        missing = [n for n in names if n not in files]
        if missing:
            raise online.OnlineImageError(f"WAL segment {missing[0]} of branch {row.name!r} is not in the store")
        return [files[n] for n in names]

    def needs_image(self, branch: str) -> bool:
        """Whether the branch streamed more WAL than the threshold since its newest image: replay
        after a crash, and the WAL GC must keep, grow with it until a new image is made."""
        row = self._row(branch)
        latest = self._latest_image(row)
        since = latest.created_at if latest else 0
        wal_dir = self.wal_root / str(row.id)
        grown = sum(p.stat().st_size for p in wal_dir.glob("*") if p.is_file() and p.stat().st_mtime > since)
        grown += sum(size for size, mtime in self._offloaded(row.id).values() if mtime > since)
        return grown > self.image_wal_threshold

    # -- materialize --------------------------------------------------------------------------------

    def _write_source(self, datadir: Path, branch_id: int, image_id: int) -> None:
        (datadir.parent / SOURCE_FILE).write_text(json.dumps({"branch_id": branch_id, "image_id": image_id}))

    def _cache_is_current(self, row: BranchRow, datadir: Path) -> bool:
        latest = self._latest_image(row)
        try:
            source = json.loads((datadir.parent / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            return False
        if latest is None or source != {"branch_id": row.id, "image_id": latest.id}:
            return False
        if not (datadir / "PG_VERSION").exists() or datadir.stat().st_uid != self.user.uid:
            return False  # (another owner: made for an earlier service user; rebuilt for this one)
        info = controldata(self.pg, self.user, datadir)
        return (info.get("Database cluster state") == "shut down"
                and lsnmod.parse(info["Latest checkpoint location"]) == latest.lsn)

    def materialize(self, branch: str, datadir: Path) -> Materialized:
        """Build ``datadir`` for ``branch``'s latest state (or its branch point, for a branch that
        never ran). Reuses the local copy only when it is exactly the newest image."""
        row = self._row(branch)
        if self._cache_is_current(row, datadir):
            return Materialized(datadir, needs_recovery=False)
        (datadir.parent / SOURCE_FILE).unlink(missing_ok=True)
        image, settings, dirs = self._recovery_plan(row)
        log.info("materialize", extra={"branch": branch, "image_id": image.id, "image_lsn": lsnmod.fmt(image.lsn),
                                       "online_image": image.online})
        shutil.rmtree(datadir, ignore_errors=True)
        with self._maintenance.shared():
            images.restore_image(self.pages, self.objects, image.manifest_key, datadir)
        staged = self._stage_wal(row, image, settings, dirs, datadir.parent / STAGED_WAL_DIR)
        if staged is not None:
            dirs = [staged, *dirs]
        tli = self._reserve_timeline()
        try:
            fillers = self._timeline_fillers(datadir.parent / RESERVED_DIR, int(settings["recovery_target_timeline"]),
                                             tli)
            settings["restore_command"] = wal.restore_command(dirs, self.history_dir, fillers,
                                                              seg_size=self._segment_size())
            _write_recovery_settings(datadir, settings)
            self.user.own_tree(datadir)
        except BaseException:
            self.release_timeline(tli)
            raise
        return Materialized(datadir, needs_recovery=True, timeline=tli)

    def _reserve_timeline(self) -> int:
        with self._tli_lock:
            tli = self._next_tli
            self._next_tli += 1
            self._reserved.add(tli)
            return tli

    def release_timeline(self, tli: int | None) -> None:
        """A start that reserved ``tli`` is over (promoted and noted, or given up)."""
        with self._tli_lock:
            self._reserved.discard(tli)  # type: ignore[arg-type]

    def _timeline_fillers(self, fillers: Path, target: int, tli: int) -> Path:
        """Make Postgres promote onto ``tli``, which the store reserved for this start.

        At promotion Postgres takes the first timeline after ``target`` that has no history file
        (asking ``restore_command``). IDs between them belong to other branches: finished ones
        have a history file in the store, the others (reserved by starts still replaying) get a
        placeholder here, so the probe runs on to ``tli`` whatever the others do meanwhile. Only
        the existence of these files is ever checked: the target's own history is real."""
        shutil.rmtree(fillers, ignore_errors=True)
        fillers.mkdir(parents=True)
        real = set(wal.history_tlis(self.history_dir))
        for other in range(target + 1, tli):
            if other not in real:
                (fillers / f"{other:08X}.history").write_text(f"# timeline {other} belongs to another branch\n")
        self.user.own_tree(fillers)
        self.user.own(fillers, 0o700)
        return fillers

    def _start_image(self, row: BranchRow) -> ImageRow | None:
        return plan.start_image(self, row)

    def _recovery_plan(self, row: BranchRow) -> tuple[ImageRow, dict[str, str], list[Path]]:
        return plan.recovery_plan(self, row)

    def note_timeline(self, branch: str, datadir: Path, expected: int | None = None) -> None:
        """After a promotion: keep the new timeline's history file store-wide and record where the
        branch's new timeline starts (``expected``: the timeline ``materialize`` reserved)."""
        row = self._row(branch)
        self.catalog.set_running(row.id, True)
        shutil.rmtree(datadir.parent / STAGED_WAL_DIR, ignore_errors=True)  # replay is over
        try:
            # restore_command runs as the compute's user and must read them: a history file it
            # cannot read counts as missing, and Postgres would promote onto a taken timeline.
            tlis = wal.copy_history(datadir / "pg_wal", self.history_dir, self.user)
        finally:
            self.release_timeline(expected)
        if not tlis:
            return
        tli = tlis[-1]
        if expected is not None and tli != expected:
            raise MaterializeError(f"branch {branch!r} promoted onto timeline {tli}, not the reserved {expected}")
        start = wal.history_switch_lsn(self.history_dir / f"{tli:08X}.history")
        self.catalog.add_timeline(row.id, tli, start)
        self._seed_timeline_start(branch, datadir, tli, start)

    def _seed_timeline_start(self, branch: str, datadir: Path, tli: int, start: int) -> None:
        """Make the branch's archive end where the new timeline begins, before the WAL receiver
        starts: move aside older timelines' segments that lie wholly past the switch point, and
        put the new timeline's segment holding the switch point in as a ``.partial``.

        ``pg_receivewal`` resumes after the newest segment in its directory (highest segment
        number, then highest timeline), on that segment's timeline. A crash in the middle of a
        record larger than what is left of a segment (or a disk that filled up) can leave whole
        segments of the old timeline past the point where recovery ended, which is where the new
        timeline forks: resuming there, the server answers "not in this server's history" and the
        receiver never streams. Those segments hold only the torn record's bytes (recovery ends at
        the end of valid WAL, and every branch point and commit lies before it), so no history
        needs them; they go to ``forked/`` (out of every reader's way), which GC empties after
        the retention window.

        With the new timeline's first segment present as a ``.partial`` (same segment number as
        the old one holding the switch point, higher timeline), the receiver resumes at that
        segment's start on the new timeline, for any switch LSN, aligned or not, and overwrites
        the file with what it streams."""
        seg = self._segment_size()
        archive = self.wal_dir(branch)
        first = start - start % seg
        for entry in os.listdir(archive):
            m = wal.SEGMENT.match(entry)
            if m is None:
                continue
            old_tli, seg_start = lsnmod.segment_start(m.group(1), seg)
            if old_tli != tli and seg_start >= start:
                path = archive / entry
                forked = archive / FORKED_DIR
                forked.mkdir(exist_ok=True)
                self.user.own(forked, 0o700)
                os.replace(path, forked / entry)
                log.warning("moved aside WAL past a timeline switch", extra={
                    "branch": branch, "segment": path.name, "switch_lsn": lsnmod.fmt(start)})
        name = lsnmod.segment_name(tli, first, seg)
        src = datadir / "pg_wal" / name
        if name in wal.segments(archive) or not src.exists():
            return
        tmp = archive / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        self.user.own(tmp, 0o600)
        os.replace(tmp, archive / f"{name}.partial")
        fsync_dir(archive)

    def mark_running(self, branch: str) -> None:
        """A compute started on the branch: until its next clean image, WAL may run past it."""
        self.catalog.set_running(self._row(branch).id, True)

    # -- the WAL archive, wherever its segments are ---------------------------------------------------

    def _offloaded(self, branch_id: int | str) -> dict[str, tuple[int, float]]:
        return self.remote_wal.entries(str(branch_id)) if self.remote_wal is not None else {}

    def wal_files(self, branch_id: int | str) -> dict[str, Path]:
        """A branch's whole archive, canonical segment name → file. With a bucket store, segments
        only in the bucket are named by where they would be locally (they do not exist there):
        read them through ``readable_wal``."""
        files = wal.segments(self.wal_root / str(branch_id))
        for name in self._offloaded(branch_id):
            files.setdefault(name, self.wal_root / str(branch_id) / name)
        return files

    def _drop_wal(self, branch_dir: str) -> None:
        shutil.rmtree(self.wal_root / branch_dir, ignore_errors=True)
        if self.remote_wal is not None:
            self.remote_wal.drop_dir(branch_dir)

    def _copy_segment(self, src: Path, dest: Path, *, link: bool = False) -> None:
        """``src`` (an archive path) to ``dest``: from local disk, else from the bucket."""
        try:
            if link:
                link_or_copy(src, dest)
            else:
                shutil.copyfile(src, dest)
            return
        except FileNotFoundError:
            rel = f"{src.parent.name}/{src.name}"
            if self.remote_wal is None or not self.remote_wal.is_offloaded(rel):
                raise
        self.remote_wal.fetch(rel, dest)

    @contextmanager
    def readable_wal(self, files: dict[str, Path]) -> Iterator[dict[str, Path]]:
        """``files`` (from ``wal_files``) as files that exist until the block ends. Locally the
        archive is complete and is used as it is; with a bucket store, a private directory holds a
        hard link to each local file (an eviction meanwhile does not pull it away) and a download
        of each offloaded one."""
        if self.remote_wal is None:
            yield files
            return
        work = Path(tempfile.mkdtemp(prefix="walread-", dir=self.tmp_root))
        try:
            out: dict[str, Path] = {}
            for name, src in files.items():
                dest = work / src.parent.name / src.name  # keeps "<branch>/<segment>": the commit index's key
                dest.parent.mkdir(exist_ok=True)
                try:
                    self._copy_segment(src, dest, link=True)
                except FileNotFoundError:
                    done = src.with_name(src.name.removesuffix(".partial"))
                    if done == src:
                        raise
                    dest = dest.with_name(done.name)  # a .partial finished (renamed) meanwhile
                    self._copy_segment(done, dest, link=True)
                out[name] = dest
            yield out
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _stage_wal(self, row: BranchRow, image: ImageRow, settings: dict[str, str], dirs: list[Path],
                   staged: Path) -> Path | None:
        """With a bucket store: put every finished segment replay from ``image`` may ask for into
        ``staged`` (links to local ones, downloads of offloaded ones), so the compute's
        ``restore_command`` serves them whatever the uploader evicts while it replays. Segments
        from the image's redo point on, up to each ancestor's branch point and the target, of the
        archive directories the plan serves (none when it serves only the image's own WAL copy)."""
        shutil.rmtree(staged, ignore_errors=True)
        served = {d.name for d in dirs if d.parent == self.wal_root}
        if self.remote_wal is None or not served:
            return None
        seg = self._segment_size()
        start = image.redo_lsn if image.redo_lsn is not None else image.lsn
        target = lsnmod.parse(settings["recovery_target_lsn"]) if "recovery_target_lsn" in settings else None
        staged.mkdir(parents=True)
        fetched = 0
        for branch, cutoff in self._ancestry(row):
            if str(branch.id) not in served:
                continue
            for name, path in self.wal_files(branch.id).items():
                if path.name.endswith(".partial"):
                    continue  # growing: served from the archive itself
                first = lsnmod.segment_start(name, seg)[1]
                if first + seg <= start - seg or any(x is not None and first > x for x in (cutoff, target)):
                    continue
                self._copy_segment(path, staged / name, link=True)
                fetched += 1
        self.user.own_tree(staged)
        self.user.own(staged, 0o700)
        log.info("staged WAL for replay", extra={"branch": row.name, "segments": fetched})
        return staged

    # -- retention ----------------------------------------------------------------------------------

    def gc(self) -> GcReport:
        """Drop what no branch and no instant inside the retention window can need (``storage.retention``)."""
        return retention.gc(self)




    def _segment_size(self) -> int:
        return WAL_SEGMENT_MB << 20


class SharedExclusiveLock:
    """Many holders in shared mode (image writes, restores) or one in exclusive mode (GC)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


RECOVERY_KEYS = ("restore_command", "recovery_target")


def _write_recovery_settings(datadir: Path, settings: dict[str, str]) -> None:
    """Replace any recovery settings an image carried (from its own materialize) with these."""
    conf = datadir / "postgresql.auto.conf"
    lines = conf.read_text().splitlines(keepends=True) if conf.exists() else []
    keep = [ln for ln in lines if not ln.lstrip().startswith(RECOVERY_KEYS) and "written by lakelet" not in ln]
    keep.append("# recovery settings, written by lakelet materialize\n")
    keep += [f"{k} = {quote_literal(v)}\n" for k, v in settings.items()]
    conf.write_text("".join(keep))
    (datadir / "recovery.signal").touch()




__all__ = ["Branch", "BranchInfo", "GcReport", "Materialized", "Store", "StorageError", "parse_time"]
