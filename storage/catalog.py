"""The catalog: branches, their timelines, images and roles, in SQLite.

Everything here is metadata; data lives in the object store and the WAL archive. Every change is
one SQLite transaction, so a crash leaves the catalog as it was before or after the change. The
class is the interface a Postgres-backed catalog would implement for a multi-machine setup.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS branches (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES branches(id),
    parent_lsn INTEGER,
    target_kind TEXT,            -- how parent_lsn is reached: before | through | immediate
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS timelines (
    branch_id INTEGER NOT NULL,
    tli INTEGER NOT NULL,
    start_lsn INTEGER NOT NULL,
    PRIMARY KEY (branch_id, tli)
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    branch_id INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    tli INTEGER NOT NULL,
    manifest_key TEXT NOT NULL,
    logical_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    redo_lsn INTEGER             -- online images only: where replay from the image starts
);
CREATE TABLE IF NOT EXISTS running (
    branch_id INTEGER PRIMARY KEY  -- started since its newest image: WAL may run past that image
);
CREATE TABLE IF NOT EXISTS roles (
    branch_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    verifier TEXT,
    PRIMARY KEY (branch_id, name)
);
"""


@dataclass(frozen=True)
class BranchRow:
    id: int
    name: str
    parent_id: int | None
    parent_lsn: int | None
    target_kind: str | None
    created_at: float

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, UTC)


@dataclass(frozen=True)
class ImageRow:
    id: int
    branch_id: int
    lsn: int
    tli: int
    manifest_key: str
    logical_bytes: int
    created_at: float
    # None for an image of a cleanly shut down cluster (its state is its checkpoint, at ``lsn``).
    # For an online image, the LSN its replay starts from; it is consistent only from ``lsn`` on.
    redo_lsn: int | None = None

    @property
    def online(self) -> bool:
        return self.redo_lsn is not None

    @property
    def redo(self) -> int:
        return self.redo_lsn if self.redo_lsn is not None else self.lsn


class Catalog:
    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring catalogs of older stores up to SCHEMA (CREATE TABLE IF NOT EXISTS adds no columns)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        if "redo_lsn" not in columns:
            self.db.execute("ALTER TABLE images ADD COLUMN redo_lsn INTEGER")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # -- branches -------------------------------------------------------------------------------

    def _branch(self, row: tuple | None) -> BranchRow | None:
        return BranchRow(*row) if row else None

    def branch_by_name(self, name: str) -> BranchRow | None:
        with self._lock:
            return self._branch(self.db.execute(
                "SELECT id, name, parent_id, parent_lsn, target_kind, created_at FROM branches WHERE name = ?",
                (name,)).fetchone())

    def branch_by_id(self, branch_id: int) -> BranchRow | None:
        with self._lock:
            return self._branch(self.db.execute(
                "SELECT id, name, parent_id, parent_lsn, target_kind, created_at FROM branches WHERE id = ?",
                (branch_id,)).fetchone())

    def branches(self) -> list[BranchRow]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id, name, parent_id, parent_lsn, target_kind, created_at FROM branches ORDER BY id").fetchall()
        return [BranchRow(*r) for r in rows]

    def children(self, branch_id: int) -> list[BranchRow]:
        return [b for b in self.branches() if b.parent_id == branch_id]

    def insert_branch(self, db: sqlite3.Connection, name: str, parent_id: int | None, parent_lsn: int | None,
                      target_kind: str | None) -> int:
        cur = db.execute(
            "INSERT INTO branches (name, parent_id, parent_lsn, target_kind, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, parent_id, parent_lsn, target_kind, time.time()))
        return int(cur.lastrowid or 0)

    # -- timelines ------------------------------------------------------------------------------

    # Changes made inside a caller's ``transaction()`` (several steps that commit together).

    def copy_roles(self, db: sqlite3.Connection, to_branch: int, from_branch: int) -> None:
        db.execute("INSERT INTO roles SELECT ?, name, verifier FROM roles WHERE branch_id = ?",
                   (to_branch, from_branch))

    def rename_branch(self, db: sqlite3.Connection, branch_id: int, name: str) -> None:
        db.execute("UPDATE branches SET name = ? WHERE id = ?", (name, branch_id))

    def delete_branch(self, db: sqlite3.Connection, branch_id: int) -> None:
        """The branch row and everything that hangs off it."""
        for table in ("timelines", "images", "roles", "running"):
            db.execute(f"DELETE FROM {table} WHERE branch_id = ?", (branch_id,))
        db.execute("DELETE FROM branches WHERE id = ?", (branch_id,))

    def repoint_branch(self, db: sqlite3.Connection, branch_id: int, parent_lsn: int, target_kind: str) -> None:
        """A reset: the branch starts over at a new point of its parent, without its own history."""
        for table in ("timelines", "images", "running"):
            db.execute(f"DELETE FROM {table} WHERE branch_id = ?", (branch_id,))
        db.execute("UPDATE branches SET parent_lsn = ?, target_kind = ?, created_at = ? WHERE id = ?",
                   (parent_lsn, target_kind, time.time(), branch_id))

    def delete_images(self, db: sqlite3.Connection, image_ids: list[int]) -> None:
        db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in image_ids])

    def timelines(self, branch_id: int) -> list[tuple[int, int]]:
        """(tli, start_lsn) of a branch, oldest first."""
        with self._lock:
            return [(t, s) for t, s in self.db.execute(
                "SELECT tli, start_lsn FROM timelines WHERE branch_id = ? ORDER BY start_lsn, tli", (branch_id,))]

    def add_timeline(self, branch_id: int, tli: int, start_lsn: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO timelines VALUES (?, ?, ?)", (branch_id, tli, start_lsn))

    # -- images ---------------------------------------------------------------------------------

    def images(self, branch_id: int | None = None) -> list[ImageRow]:
        sql = "SELECT id, branch_id, lsn, tli, manifest_key, logical_bytes, created_at, redo_lsn FROM images"
        args: tuple = ()
        if branch_id is not None:
            sql += " WHERE branch_id = ?"
            args = (branch_id,)
        with self._lock:
            return [ImageRow(*r) for r in self.db.execute(sql + " ORDER BY lsn, id", args)]

    def add_image(self, branch_id: int, lsn: int, tli: int, manifest_key: str, logical_bytes: int, *,
                  redo_lsn: int | None = None) -> int:
        """Record an image. A clean one (no ``redo_lsn``) is the branch's head: in the same
        transaction the branch stops counting as running, so a crash never leaves a new image next
        to a stale "WAL may run past it" mark (or the reverse). An online one is taken while the
        compute runs on, so the mark stays."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO images (branch_id, lsn, tli, manifest_key, logical_bytes, created_at, redo_lsn)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (branch_id, lsn, tli, manifest_key, logical_bytes, time.time(), redo_lsn))
            if redo_lsn is None:
                db.execute("DELETE FROM running WHERE branch_id = ?", (branch_id,))
            return int(cur.lastrowid or 0)

    def is_running(self, branch_id: int) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM running WHERE branch_id = ?", (branch_id,)).fetchone() is not None

    def set_running(self, branch_id: int, running: bool) -> None:
        with self.transaction() as db:
            if running:
                db.execute("INSERT OR IGNORE INTO running VALUES (?)", (branch_id,))
            else:
                db.execute("DELETE FROM running WHERE branch_id = ?", (branch_id,))

    # -- roles ----------------------------------------------------------------------------------

    def roles(self, branch_id: int) -> dict[str, str | None]:
        with self._lock:
            return dict(self.db.execute("SELECT name, verifier FROM roles WHERE branch_id = ?", (branch_id,)))

    def set_roles(self, branch_id: int, roles: dict[str, str | None]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM roles WHERE branch_id = ?", (branch_id,))
            db.executemany("INSERT INTO roles VALUES (?, ?, ?)", [(branch_id, n, v) for n, v in roles.items()])
