"""The last commit at or before a moment, without reading all of a branch's WAL every time.

A branch at a timestamp needs the LSN of the last commit at or before it. Reading every archived
segment with ``pg_waldump`` makes that cost grow with the WAL kept (days of it, in the retention
window). Instead the index remembers, per finished segment file, the earliest commit time in it:
a query reads in full only the segments nobody has read yet, and otherwise only those whose
earliest commit is not after the moment, newest first, stopping at the first that answers.

The index is a cache (``commits.db`` in the store; losing it only costs a full read), kept across
restarts so the first lookup after one does not read everything again.

Exactness: a segment "holds" the records that *start* in it. A run of segments is read from a
segment boundary (``pg_waldump`` skips the tail of a record begun in the segment before), and a
segment's earliest commit is remembered only when the read went on for two more segments, so a
commit record crossing into the next segment was read whole. Candidates come off a heap ordered
by the highest LSN they can hold, so the first commit popped is the latest one on the history.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path

from storage import lsn as lsnmod
from storage import wal
from storage.postgres import PgBinaries, ServiceUser


class _Unread(Enum):
    """What the index says of a segment it has not read (None already means "no commit")."""

    UNREAD = 0


_UNREAD = _Unread.UNREAD
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _to_us(t: datetime | None) -> int | None:
    return None if t is None else (t - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class HistoryPiece:
    """Part of a branch's history: one timeline of one branch's streamed WAL, the LSNs of it that
    belong to the history (from ``start``, before ``end``, at most ``cutoff``)."""

    files: dict[str, Path]
    tli: int
    start: int
    end: int | None
    cutoff: int | None

    def holds(self, lsn: int) -> bool:
        return (lsn >= self.start and (self.end is None or lsn < self.end)
                and (self.cutoff is None or lsn <= self.cutoff))


@dataclass(frozen=True)
class _Candidate:
    """A remembered segment whose earliest commit is not after the moment: read only if needed."""

    piece: HistoryPiece
    run: list[str]
    index: int


class CommitIndex:
    def __init__(self, pg: PgBinaries, user: ServiceUser, seg_size: int, path: Path) -> None:
        self.pg = pg
        self.user = user
        self.seg_size = seg_size
        self._lock = threading.Lock()
        # A cache: no fsync, and a damaged file is simply started over.
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError:
            path.unlink(missing_ok=True)
            self.db = self._open(path)
        # "<branch-dir>/<segment>" → earliest commit time in that finished segment (None: no
        # commit). A finished segment never changes, and its name never comes back with other
        # contents: timeline IDs are unique store-wide and never reused (a reset branch writes on
        # a new one). Keyed by name, not by local file, so the index stays valid when the store is
        # rebuilt from a bucket on another machine and when segments live only in the bucket.
        self._earliest: dict[str, datetime | None] = {
            name: _from_us(us) for name, us in self.db.execute("SELECT name, commit_us FROM earliest_segment")}
        # Makes ``files`` readable for pg_waldump (``Store.readable_wal``: segments only in a bucket).
        self.readable: Callable[[dict[str, Path]], contextlib.AbstractContextManager[dict[str, Path]]] = \
            contextlib.nullcontext

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")
        db.execute("DROP TABLE IF EXISTS earliest")  # keyed by local file: older stores
        db.execute("CREATE TABLE IF NOT EXISTS earliest_segment (name TEXT PRIMARY KEY, commit_us INTEGER)")
        return db

    def close(self) -> None:
        self.db.close()

    def last_commit(self, pieces: Iterable[HistoryPiece], when: datetime) -> int | None:
        """LSN of the last commit (in LSN order) at or before ``when`` on the history, or None."""
        heap: list[tuple[int, int, wal.WalRecord | _Candidate]] = []
        order = itertools.count()  # ties: never compare the payloads
        for piece in pieces:
            names = sorted(n for n in piece.files if int(n[:8], 16) == piece.tli)
            for run in wal.contiguous_runs(names, self.seg_size):
                known = [self._known(piece.files[n]) for n in run]
                unread = next((i for i, k in enumerate(known) if k is _UNREAD), len(run))
                for i in range(unread):
                    earliest = known[i]
                    if isinstance(earliest, datetime) and earliest <= when:
                        last_lsn = self._start(run[i]) + self.seg_size - 1
                        heapq.heappush(heap, (-last_lsn, next(order), _Candidate(piece, run, i)))
                if unread < len(run):
                    for r in self._read(piece, run[unread:]):
                        if r.commit_time is not None and r.commit_time <= when and piece.holds(r.lsn):
                            heapq.heappush(heap, (-r.lsn, next(order), r))
        while heap:
            _, _, item = heapq.heappop(heap)
            if isinstance(item, wal.WalRecord):
                return item.lsn  # nothing left on the heap can hold a later LSN
            piece, run, i = item.piece, item.run, item.index
            start = self._start(run[i])
            for r in self._scan(piece, run[i:i + 2]):  # the next segment completes a record crossing into it
                if start <= r.lsn < start + self.seg_size and r.commit_time is not None \
                        and r.commit_time <= when and piece.holds(r.lsn):
                    heapq.heappush(heap, (-r.lsn, next(order), r))
        return None

    def forget_missing(self, present: set[str]) -> None:
        """Drop what is remembered of segments not in ``present`` ("<branch-dir>/<segment>": after GC)."""
        with self._lock:
            gone = [k for k in self._earliest if k not in present]
            for key in gone:
                del self._earliest[key]
            self.db.executemany("DELETE FROM earliest_segment WHERE name = ?", [(k,) for k in gone])

    # -- internals -------------------------------------------------------------------------------

    def _start(self, name: str) -> int:
        return lsnmod.segment_start(name, self.seg_size)[1]

    @staticmethod
    def _key(path: Path) -> str | None:
        if path.name.endswith(".partial"):
            return None  # still growing
        return f"{path.parent.name}/{path.name}"

    def _known(self, path: Path) -> datetime | None | _Unread:
        key = self._key(path)
        return self._earliest.get(key, _UNREAD) if key is not None else _UNREAD

    def _scan(self, piece: HistoryPiece, names: list[str]) -> list[wal.WalRecord]:
        with self.readable({n: piece.files[n] for n in names}) as files:
            return wal.scan(self.pg, self.user, files, piece.tli, self.seg_size, transactions_only=True)

    def _read(self, piece: HistoryPiece, names: list[str]) -> list[wal.WalRecord]:
        """Read ``names`` (a contiguous run's tail) in full and remember their earliest commits."""
        records = self._scan(piece, names)
        earliest: dict[int, datetime] = {}
        for r in records:
            if r.commit_time is not None:
                seg = r.lsn - r.lsn % self.seg_size
                if seg not in earliest or r.commit_time < earliest[seg]:
                    earliest[seg] = r.commit_time
        learned: dict[str, datetime | None] = {}
        for name in names[:-2]:
            key = self._key(piece.files[name])
            if key is not None:
                learned[key] = earliest.get(self._start(name))
        with self._lock:
            self._earliest.update(learned)
            self.db.executemany("INSERT OR REPLACE INTO earliest_segment VALUES (?, ?)",
                                [(key, _to_us(t)) for key, t in learned.items()])
        return records
