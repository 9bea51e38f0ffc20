"""The store: branches as timelines over a WAL archive and a deduplicated page store.

Layout under ``<data-dir>/store/``: ``catalog.db`` (branches, timelines, images, roles),
``pages.db`` + ``objects/`` (packs and image manifests), ``wal/<branch-id>/`` (each branch's
archived WAL, written by its compute's synchronous receiver) and ``wal/history/`` (every timeline
history file).

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage import images, wal
from storage import lsn as lsnmod
from storage.catalog import BranchRow, Catalog, ImageRow
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
from storage.objectstore import LocalObjectStore
from storage.pagestore import PageStore
from storage.postgres import PgBinaries, ServiceUser, last_error_line, run

log = logging.getLogger("lakelet.storage")

ROOT_BRANCH = "main"
ADMIN_ROLE = "lakelet_admin"
BRANCH_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SOURCE_FILE = "lakelet-source.json"
IMAGE_WAL_THRESHOLD = 256 << 20
# Small WAL segments: a branch that wrote a little holds a little, in the archive and in copies.
WAL_SEGMENT_MB = 1


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
    def __init__(self, root: Path, *, user: ServiceUser, pg: PgBinaries, retention_days: float = 7.0) -> None:
        self.root = root
        self.user = user
        self.pg = pg
        self.retention = timedelta(days=retention_days)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        self.catalog = Catalog(root / "catalog.db")
        self.objects = LocalObjectStore(root / "objects")
        self.objects.cleanup_temp()
        self.pages = PageStore(self.objects, root / "pages.db")
        self.wal_root = root / "wal"
        self.history_dir = self.wal_root / "history"
        self.tmp_root = root / "tmp"
        for d in (self.wal_root, self.history_dir, self.tmp_root):
            d.mkdir(exist_ok=True)
            user.own(d, 0o700)
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir()
        user.own(self.tmp_root, 0o700)
        # Materialize → promote → note_timeline must not interleave between two branches, or both
        # could pick the same new timeline ID. Callers hold this across the three steps.
        self.promotion_lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, *, user: ServiceUser, pg: PgBinaries, retention_days: float = 7.0) -> Store:
        return cls(root, user=user, pg=pg, retention_days=retention_days)

    def close(self) -> None:
        self.pages.close()
        self.catalog.close()

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
        """WAL directories of ``row``'s ancestry, nearest first: each branch's receiver dir, then
        the checkpoint segments its images brought along."""
        out: list[Path] = []
        for branch, _ in self._ancestry(row):
            out += [self.wal_root / str(branch.id), self.wal_root / f"{branch.id}.ckpt"]
        return out

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
        return self.get_branch(ROOT_BRANCH)

    def _check_new_name(self, name: str) -> None:
        if not BRANCH_NAME.match(name or ""):
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
        records = self._records(prow)
        if lsnmod.looks_like(at):
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
        commits = [r for r in records if r.commit_time is not None]
        if not commits or when < commits[0].commit_time:  # type: ignore[operator]
            raise InvalidTarget(f"--at {at} is before the oldest commit kept for branch {prow.name!r}")
        last = [r for r in commits if r.commit_time <= when][-1]  # type: ignore[operator]
        return last.lsn, "through"

    def _records(self, row: BranchRow) -> list[wal.WalRecord]:
        """Every WAL record on ``row``'s history (each ancestor up to its branch point), by LSN."""
        out: list[wal.WalRecord] = []
        for branch, cutoff in self._ancestry(row):
            files = wal.segments(self.wal_root / str(branch.id))
            tls = self.catalog.timelines(branch.id)
            if branch.parent_id is None and not any(t == 1 for t, _ in tls):
                tls = [(1, 0), *tls]
            ends: list[int | None] = [start for _, start in tls[1:]]
            ends.append(None)
            for (tli, start), end in zip(tls, ends, strict=True):
                for rec in wal.scan(self.pg, self.user, files, tli):
                    if rec.lsn < start or (end is not None and rec.lsn >= end):
                        continue
                    if cutoff is not None and rec.lsn > cutoff:
                        continue
                    out.append(rec)
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
        with self.catalog.transaction() as db:
            for b in doomed:
                for table in ("timelines", "images", "roles"):
                    db.execute(f"DELETE FROM {table} WHERE branch_id = ?", (b.id,))
                db.execute("DELETE FROM branches WHERE id = ?", (b.id,))
        # Data goes only after the catalog forgot it; unreferenced pages go at the next GC.
        for b in doomed:
            shutil.rmtree(self.wal_root / str(b.id), ignore_errors=True)
            shutil.rmtree(self.wal_root / f"{b.id}.ckpt", ignore_errors=True)
            for key in self.objects.list(f"images/{b.id}/"):
                self.objects.delete(key)

    def rename_branch(self, old: str, new: str) -> None:
        row = self._row(old)
        self._check_new_name(new)
        with self.catalog.transaction() as db:
            db.execute("UPDATE branches SET name = ? WHERE id = ?", (new, row.id))

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
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM timelines WHERE branch_id = ?", (row.id,))
            db.execute("DELETE FROM images WHERE branch_id = ?", (row.id,))
            db.execute("UPDATE branches SET parent_lsn = ?, target_kind = ?, created_at = ? WHERE id = ?",
                       (lsn, kind, time.time(), row.id))
        shutil.rmtree(self.wal_root / str(row.id), ignore_errors=True)
        shutil.rmtree(self.wal_root / f"{row.id}.ckpt", ignore_errors=True)
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
        return self.get_branch(name), backup

    # -- roles ------------------------------------------------------------------------------------

    def set_roles(self, branch: str, roles: dict[str, str | None]) -> None:
        self.catalog.set_roles(self._row(branch).id, roles)

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
        key = f"images/{branch_id}/{ckpt:016X}-{time.time_ns()}.manifest"
        stats = images.write_image(self.pages, self.objects, datadir, key)
        self._keep_checkpoint_segment(branch_id, datadir, tli, ckpt)
        image_id = self.catalog.add_image(branch_id, ckpt, tli, key, stats.logical_bytes)
        self.catalog.set_running(branch_id, False)
        log.info("image stored", extra={"branch_id": branch_id, "lsn": lsnmod.fmt(ckpt), "files": stats.files,
                                         "logical_bytes": stats.logical_bytes, "new_bytes": stats.new_bytes})
        self._write_source(datadir, branch_id, image_id)
        return self.catalog.images(branch_id)[-1]

    def _keep_checkpoint_segment(self, branch_id: int, datadir: Path, tli: int, ckpt: int) -> None:
        """Recovery from an image starts by reading its checkpoint record, so the segment holding
        it must be in the archive even when no receiver ever streamed it (the initdb image)."""
        name = lsnmod.segment_name(tli, ckpt, self._segment_size())
        src = datadir / "pg_wal" / name
        dest_dir = self.wal_root / f"{branch_id}.ckpt"
        streamed = self.wal_root / str(branch_id)
        if not src.exists() or any(p.exists() for p in (dest_dir / name, streamed / name,
                                                          streamed / f"{name}.partial")):
            return
        dest_dir.mkdir(exist_ok=True)
        self.user.own(dest_dir, 0o700)
        tmp = dest_dir / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest_dir / name)

    def take_image(self, branch: str, datadir: Path) -> None:
        """Store a cleanly shut down compute's data dir as the branch's newest image."""
        self._image(self._row(branch).id, datadir)

    def needs_image(self, branch: str) -> bool:
        row = self._row(branch)
        latest = self._latest_image(row)
        since = latest.created_at if latest else 0
        wal_dir = self.wal_root / str(row.id)
        grown = sum(p.stat().st_size for p in wal_dir.glob("*") if p.is_file() and p.stat().st_mtime > since)
        return grown > IMAGE_WAL_THRESHOLD

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
        if not (datadir / "PG_VERSION").exists():
            return False
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
        own_timelines = self.catalog.timelines(row.id)
        settings: dict[str, str] = {}
        if own_timelines or row.parent_id is None:
            image = self._image_for(row)
            target_tli = self._tli_at(row, None)
        else:
            assert row.parent_lsn is not None
            image = self._image_for(row, row.parent_lsn)
            target_tli = self._tli_at(row, row.parent_lsn)
            kind = row.target_kind or "before"
            if kind == "immediate" and image is not None and image.lsn == row.parent_lsn:
                settings["recovery_target"] = "immediate"
            else:
                settings["recovery_target_lsn"] = lsnmod.fmt(row.parent_lsn)
                settings["recovery_target_inclusive"] = "true" if kind == "through" else "false"
            settings["recovery_target_action"] = "promote"
        if image is None:
            raise MaterializeError(f"no image of branch {branch!r} or its ancestors: the store is incomplete")
        shutil.rmtree(datadir, ignore_errors=True)
        images.restore_image(self.pages, self.objects, image.manifest_key, datadir)
        settings["restore_command"] = wal.restore_command(self._dirs(row), self.history_dir)
        settings["recovery_target_timeline"] = str(target_tli)
        _write_recovery_settings(datadir, settings)
        self.user.own_tree(datadir)
        return Materialized(datadir, needs_recovery=True)

    def note_timeline(self, branch: str, datadir: Path) -> None:
        """After a promotion: keep the new timeline's history file store-wide and record where the
        branch's new timeline starts."""
        row = self._row(branch)
        self.catalog.set_running(row.id, True)
        tlis = wal.copy_history(datadir / "pg_wal", self.history_dir)
        if not tlis:
            return
        tli = tlis[-1]
        start = wal.history_switch_lsn(self.history_dir / f"{tli:08X}.history")
        self.catalog.add_timeline(row.id, tli, start)

    def mark_running(self, branch: str) -> None:
        """A compute started on the branch: until its next clean image, WAL may run past it."""
        self.catalog.set_running(self._row(branch).id, True)

    # -- retention ----------------------------------------------------------------------------------

    def gc(self) -> GcReport:
        """Drop images and WAL that no branch and no instant inside the retention window can need,
        then pages no remaining image references."""
        cutoff = time.time() - self.retention.total_seconds()
        branches = self.catalog.branches()
        keep_ids: set[int] = set()
        wal_floor: dict[int, int] = {}
        for row in branches:
            own = self.catalog.images(row.id)
            old = [i for i in own if i.created_at < cutoff]
            kept = [i for i in own if i.created_at >= cutoff] + old[-1:]
            keep_ids.update(i.id for i in kept)
            # Each child that never ran still starts from an image at or before its branch point.
            for child in self.catalog.children(row.id):
                needed = self._image_for(child, child.parent_lsn)
                if needed is not None:
                    keep_ids.add(needed.id)
            if kept:
                wal_floor[row.id] = min(i.lsn for i in kept)
        for row in branches:
            for child in self.catalog.children(row.id):
                needed = self._image_for(child, child.parent_lsn)
                if needed is not None and needed.branch_id == row.id:
                    wal_floor[row.id] = min(wal_floor.get(row.id, needed.lsn), needed.lsn)
        doomed = [i for i in self.catalog.images() if i.id not in keep_ids]
        with self.catalog.transaction() as db:
            db.executemany("DELETE FROM images WHERE id = ?", [(i.id,) for i in doomed])
        freed = 0
        for image in doomed:
            freed += self.objects.size(image.manifest_key) if self.objects.exists(image.manifest_key) else 0
            self.objects.delete(image.manifest_key)
        wal_deleted = 0
        seg_size = self._segment_size()
        for branch_id, floor in wal_floor.items():
            for name, path in wal.segments(self.wal_root / str(branch_id)).items():
                _, start = lsnmod.segment_start(name, seg_size)
                if start + seg_size <= floor - seg_size:  # keep one segment of slack before the floor
                    freed += path.stat().st_size
                    path.unlink()
                    wal_deleted += 1
        live: set[bytes] = set()
        for image in self.catalog.images():
            live |= images.image_digests(self.objects, image.manifest_key)
        freed += self.pages.collect(live)
        return GcReport(len(doomed), wal_deleted, freed)

    def _segment_size(self) -> int:
        return WAL_SEGMENT_MB << 20


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
