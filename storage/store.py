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

from storage import images, online, wal
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
from storage.postgres import PgBinaries, ServiceUser, last_error_line, repair_tree, run

log = logging.getLogger("lakelet.storage")

ROOT_BRANCH = "main"
ADMIN_ROLE = "lakelet_admin"
BRANCH_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole name: fullmatch (``$`` allows a final newline)
SOURCE_FILE = "lakelet-source.json"
# Where a branch's archive keeps old-timeline WAL found past a timeline switch (a torn record).
FORKED_DIR = "forked"
# Next to a compute's data dir: placeholder history files that steer its promotion's timeline ID.
RESERVED_DIR = "reserved-timelines"
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


@dataclass(frozen=True)
class GcReport:
    images_deleted: int
    wal_files_deleted: int
    bytes_freed: int


def _pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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
                shutil.rmtree(self.wal_root / entry, ignore_errors=True)
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

    def wal_dir(self, branch: str) -> Path:
        path = self.wal_root / str(self._row(branch).id)
        if not path.exists():
            path.mkdir()
            self.user.own(path, 0o700)
        return path

    def _ancestry(self, row: BranchRow) -> list[tuple[BranchRow, int | None]]:
        """[(branch, cutoff LSN)] from ``row`` up to the root; cutoff None = the branch's end."""
        out: list[tuple[BranchRow, int | None]] = [(row, None)]
        while row.parent_id is not None:
            cutoff = row.parent_lsn
            row = self.catalog.branch_by_id(row.parent_id)  # type: ignore[assignment]
            out.append((row, cutoff))
        return out

    def _tli_at(self, row: BranchRow, at: int | None) -> int:
        """The timeline live on ``row``'s history at LSN ``at`` (None = its latest)."""
        for branch, cutoff in self._ancestry(row):
            limit = at if at is not None else cutoff
            if cutoff is not None and limit is not None:
                limit = min(limit, cutoff)
            starts = [(start, t) for t, start in self.catalog.timelines(branch.id) if limit is None or start <= limit]
            if starts:
                return max(starts)[1]
            at = limit
        return 1

    def _dirs(self, row: BranchRow) -> list[Path]:
        """Streamed WAL directories of ``row``'s ancestry, nearest first."""
        out: list[Path] = []
        for branch, _ in self._ancestry(row):
            out.append(self.wal_root / str(branch.id))
            legacy = self.wal_root / f"{branch.id}.ckpt"  # checkpoint copies of older stores
            if legacy.is_dir():
                out.append(legacy)
        return out

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
            db.execute("INSERT INTO roles SELECT ?, name, verifier FROM roles WHERE branch_id = ?",
                       (branch_id, prow.id))
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
        if lsnmod.looks_like(at):
            records = self._records(prow)
            target = lsnmod.parse(at)
            if not records or target > records[-1].lsn:
                end = lsnmod.fmt(records[-1].lsn) if records else "none yet"
                raise InvalidTarget(f"LSN {at} is beyond the end of branch {prow.name!r}'s WAL ({end})")
            if target < records[0].lsn:
                raise InvalidTarget(f"LSN {at} is older than the history kept for {prow.name!r} "
                                    f"(oldest {lsnmod.fmt(records[0].lsn)})")
            first_at_or_after = next(r for r in records if r.lsn >= target)
            return first_at_or_after.lsn, "before"
        when = parse_time(at)
        now = datetime.now(UTC)
        if when > now:
            raise InvalidTarget(f"--at {at} is in the future: choose a moment before {now.isoformat()}")
        if when < now - self.retention:
            raise InvalidTarget(f"--at {at} is outside the retention window of {self.retention.days} days")
        last = self.commits.last_commit(self._pieces(prow), when)
        if last is None:
            raise InvalidTarget(f"--at {at} is before the oldest commit kept for branch {prow.name!r}")
        return last, "through"

    def _pieces(self, row: BranchRow) -> Iterator[HistoryPiece]:
        """Where ``row``'s history lies: per ancestor and timeline, the streamed segments and
        which LSNs of them belong to it."""
        for branch, cutoff in self._ancestry(row):
            files = wal.segments(self.wal_root / str(branch.id))
            tls = self.catalog.timelines(branch.id)
            if branch.parent_id is None and not any(t == 1 for t, _ in tls):
                tls = [(1, 0), *tls]
            ends: list[int | None] = [start for _, start in tls[1:]]
            ends.append(None)
            for (tli, start), end in zip(tls, ends, strict=True):
                yield HistoryPiece(files, tli, start, end, cutoff)

    def _records(self, row: BranchRow) -> list[wal.WalRecord]:
        """Every WAL record on ``row``'s history (each ancestor up to its branch point), by LSN."""
        out: list[wal.WalRecord] = []
        for piece in self._pieces(row):
            out += [r for r in wal.scan(self.pg, self.user, piece.files, piece.tli, self._segment_size())
                    if piece.holds(r.lsn)]
        out.sort(key=lambda r: r.lsn)
        return out

    def list_branches(self) -> list[BranchInfo]:
        out = []
        for row in self.catalog.branches():
            image = self._image_for(row)
            logical = image.logical_bytes if image else 0
            wal_bytes = sum(p.stat().st_size for p in (self.wal_root / str(row.id)).glob("*") if p.is_file())
            out.append(BranchInfo(self._public(row), logical, wal_bytes, len(self.catalog.images(row.id))))
        return out

    def physical_bytes(self) -> int:
        total = self.objects.total_bytes()
        for dirpath, _, files in os.walk(self.wal_root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
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
                for table in ("timelines", "images", "roles", "running"):
                    db.execute(f"DELETE FROM {table} WHERE branch_id = ?", (b.id,))
                db.execute("DELETE FROM branches WHERE id = ?", (b.id,))
        # Data goes only after the catalog forgot it (a crash in between leaves leftovers the next
        # open sweeps); unreferenced pages go at the next GC.
        self._changed()
        self._drop_image_files(dropped)
        for b in doomed:
            shutil.rmtree(self.wal_root / str(b.id), ignore_errors=True)
            shutil.rmtree(self.wal_root / f"{b.id}.ckpt", ignore_errors=True)

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
            db.execute("UPDATE branches SET name = ? WHERE id = ?", (new, row.id))
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
            db.execute("DELETE FROM timelines WHERE branch_id = ?", (row.id,))
            db.execute("DELETE FROM images WHERE branch_id = ?", (row.id,))
            db.execute("DELETE FROM running WHERE branch_id = ?", (row.id,))
            db.execute("UPDATE branches SET parent_lsn = ?, target_kind = ?, created_at = ? WHERE id = ?",
                       (lsn, kind, time.time(), row.id))
        self._drop_image_files(dropped)
        shutil.rmtree(self.wal_root / str(row.id), ignore_errors=True)
        shutil.rmtree(self.wal_root / f"{row.id}.ckpt", ignore_errors=True)
        self._changed()
        return self.get_branch(name)

    def restore_branch(self, name: str, at: str) -> tuple[Branch, str]:
        """``name`` as it was at ``at``; the current state stays as ``<name>_old_<timestamp>``."""
        row = self._row(name)
        lsn, kind = self._resolve_at(row, at)
        backup = f"{name}_old_{datetime.now(UTC):%Y%m%d%H%M%S}"[:63]
        self._check_new_name(backup)
        with self.catalog.transaction() as db:
            db.execute("UPDATE branches SET name = ? WHERE id = ?", (backup, row.id))
            new_id = self.catalog.insert_branch(db, name, row.id, lsn, kind)
            db.execute("INSERT INTO roles SELECT ?, name, verifier FROM roles WHERE branch_id = ?", (new_id, row.id))
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
        """Nearest image at or before ``at`` on ``row``'s ancestry (None = latest)."""
        for branch, cutoff in self._ancestry(row):
            limit = at if at is not None else cutoff
            if cutoff is not None and limit is not None:
                limit = min(limit, cutoff)
            candidates = [i for i in self.catalog.images(branch.id) if limit is None or i.lsn <= limit]
            if candidates:
                return candidates[-1]
            at = limit
        return None

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
            shutil.copyfile(src, tmp / src.name)
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

    def take_online_image(self, branch: str, *, host: str, port: int) -> ImageRow:
        """Image ``branch`` while its compute (listening at ``host``/``port``) runs on.

        A base backup of the running compute (see ``storage.online`` for why this design), stored
        like any image once the archive holds its WAL through the backup's end. Its catalog row
        has ``lsn`` = the backup's end (the first LSN it can serve: materialize never picks it for
        an earlier target) and ``redo_lsn`` = the backup's start. Its WAL copy (what a clean
        image's checkpoint copy is) holds every segment from the redo point to the end, so the
        image alone reaches consistency: GC keeps the branch's WAL from ``lsn`` on, as for any
        image, and may drop what lies before the copy.

        The branch stays marked running: its compute goes on writing past the image."""
        row = self._row(branch)
        work = Path(tempfile.mkdtemp(prefix="online-", dir=self.tmp_root))
        try:
            self.user.own(work, 0o700)
            backup = online.base_backup(self.pg, self.user, host=host, port=port, role=ADMIN_ROLE,
                                        datadir=work / "pgdata")
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
            files = wal.segments(self.wal_root / str(row.id))
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
        tli = self._reserve_timeline()
        try:
            fillers = self._timeline_fillers(datadir.parent / RESERVED_DIR, int(settings["recovery_target_timeline"]),
                                             tli)
            settings["restore_command"] = wal.restore_command(dirs, self.history_dir, fillers)
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
        """The image ``materialize`` starts ``row`` from: its nearest image at its end when it has
        run (or is the root), else the nearest one at or before its branch point."""
        if self.catalog.timelines(row.id) or row.parent_id is None:
            return self._image_for(row)
        return self._image_for(row, row.parent_lsn)

    def _recovery_plan(self, row: BranchRow) -> tuple[ImageRow, dict[str, str], list[Path]]:
        """(start image, recovery settings, WAL directories for ``restore_command``) for ``row``."""
        image = self._start_image(row)
        if image is None:
            raise MaterializeError(f"no image of branch {row.name!r} or its ancestors: the store is incomplete")
        own_ckpt = self._ckpt_dir(image.manifest_key)
        if self.catalog.timelines(row.id) or row.parent_id is None:
            # It has run: its state is the end of its WAL, so replay all of it (streamed segments
            # first: the image's own checkpoint copy ends where the streamed one may go on).
            return image, {"recovery_target_timeline": str(self._tli_at(row, None))}, [*self._dirs(row), own_ckpt]
        target = row.parent_lsn
        assert target is not None
        if image.lsn == target and not image.online:
            # Exactly at an image (the head of a parent that shut down cleanly): the image is the
            # state. No recovery target: when the parent has not run since, nothing follows its
            # shutdown checkpoint, and Postgres would end recovery before "reaching" any target.
            # Only the image's own checkpoint copy is served, so replay cannot run on into WAL the
            # parent wrote after the image; recovery reads the checkpoint and promotes.
            return image, {"recovery_target_timeline": str(image.tli)}, [own_ckpt]
        # An online image at the target takes the general path: replay through its backup end
        # makes it consistent, and the record at the target (there is one: targets are records)
        # stops recovery there.
        kind = row.target_kind or "before"
        settings = {
            "recovery_target_lsn": lsnmod.fmt(target),
            # "immediate" marks a checkpoint record at the target: replaying through it is the same.
            "recovery_target_inclusive": "false" if kind == "before" else "true",
            "recovery_target_action": "promote",
            "recovery_target_timeline": str(self._tli_at(row, target)),
        }
        return image, settings, [*self._dirs(row), own_ckpt]

    def note_timeline(self, branch: str, datadir: Path, expected: int | None = None) -> None:
        """After a promotion: keep the new timeline's history file store-wide and record where the
        branch's new timeline starts (``expected``: the timeline ``materialize`` reserved)."""
        row = self._row(branch)
        self.catalog.set_running(row.id, True)
        try:
            tlis = wal.copy_history(datadir / "pg_wal", self.history_dir)
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

    # -- retention ----------------------------------------------------------------------------------

    def gc(self) -> GcReport:
        """Drop images and WAL that no branch and no instant inside the retention window can need,
        then pages no remaining image references. The catalog forgets first and files go after,
        so a crash at any point leaves every surviving branch materializable."""
        with self._maintenance.exclusive():
            keep, floors = self._needed()
            doomed = [i for i in self.catalog.images() if i.id not in keep]
            with self.catalog.transaction() as db:
                db.executemany("DELETE FROM images WHERE id = ?", [(i.id,) for i in doomed])
            freed = self._drop_image_files(doomed)
            wal_deleted, wal_freed = self._drop_wal_below(floors)
            self.commits.forget_missing()
            live: set[bytes] = set()
            for image in self.catalog.images():
                live |= images.image_digests(self.objects, image.manifest_key)
            freed += wal_freed + self.pages.collect(live)
        return GcReport(len(doomed), wal_deleted, freed)

    def _needed(self) -> tuple[set[int], dict[int, int]]:
        """(IDs of images to keep, per branch the lowest LSN of its own WAL still needed).

        A branch needs its images made inside the window plus the newest older one (every instant
        in the window is at or after it); with no image older than the window, all of its own WAL
        (instants before its first image replay from its branch point). Each branch also needs
        the image ``materialize`` starts it from, and from there all WAL up its ancestry: the
        branches between it and that image, whatever their own images, must keep WAL up to the
        branch point."""
        cutoff = time.time() - self.retention.total_seconds()
        branches = self.catalog.branches()
        keep: set[int] = set()
        floors: dict[int, int] = {}
        whole_history: set[int] = set()
        for row in branches:
            own = self.catalog.images(row.id)
            old = [i for i in own if i.created_at < cutoff]
            keep.update(i.id for i in own if i.created_at >= cutoff)
            keep.update(i.id for i in old[-1:])
            floors[row.id] = old[-1].lsn if old else 0
            if not old:
                whole_history.add(row.id)
        for row in branches:
            needed = [self._start_image(row)]
            if row.parent_id is not None and row.id in whole_history:
                needed.append(self._image_for(row, row.parent_lsn))
            for image in needed:
                if image is not None:
                    keep.add(image.id)
                    self._lower_floors(row, image, floors)
        return keep, floors

    def _lower_floors(self, row: BranchRow, image: ImageRow, floors: dict[int, int]) -> None:
        for branch, _ in self._ancestry(row):
            if branch.id == image.branch_id:
                floors[branch.id] = min(floors[branch.id], image.lsn)
                return
            floors[branch.id] = 0

    def _drop_wal_below(self, floors: dict[int, int]) -> tuple[int, int]:
        """Delete streamed segments wholly below each branch's floor; (files, bytes)."""
        seg_size = self._segment_size()
        deleted = freed = 0
        for branch_id, floor in floors.items():
            for name, path in wal.segments(self.wal_root / str(branch_id)).items():
                _, start = lsnmod.segment_start(name, seg_size)
                if start + seg_size <= floor - seg_size:  # keep one segment of slack before the floor
                    freed += path.stat().st_size
                    path.unlink()
                    deleted += 1
            forked = self.wal_root / str(branch_id) / FORKED_DIR
            cutoff = time.time() - self.retention.total_seconds()
            for path in forked.glob("*") if forked.is_dir() else []:
                if path.stat().st_mtime < cutoff:
                    freed += path.stat().st_size
                    path.unlink()
                    deleted += 1
        return deleted, freed

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
    keep += [f"{k} = {_pg_quote(v)}\n" for k, v in settings.items()]
    conf.write_text("".join(keep))
    (datadir / "recovery.signal").touch()


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidTarget(f"--at {text!r} is neither an ISO-8601 timestamp (2026-11-25T10:00:00Z) "
                            "nor an LSN (0/16B3748)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


__all__ = ["Branch", "BranchInfo", "GcReport", "Materialized", "Store", "StorageError", "parse_time"]
