"""Point in time: a timestamp or LSN on a branch's history resolved to a recovery target.

One seam of the store: it reads the WAL a branch's ancestry streamed (through the commit index for
timestamps) and never writes anything."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from storage import lsn as lsnmod
from storage import wal
from storage.catalog import BranchRow
from storage.commits import HistoryPiece
from storage.errors import InvalidTarget

if TYPE_CHECKING:
    from storage.store import Store


def resolve_at(store: Store, prow: BranchRow, at: str) -> tuple[int, str]:
    if lsnmod.looks_like(at):
        found = records(store, prow)
        target = lsnmod.parse(at)
        if not found or target > found[-1].lsn:
            end = lsnmod.fmt(found[-1].lsn) if found else "none yet"
            raise InvalidTarget(f"LSN {at} is beyond the end of branch {prow.name!r}'s WAL ({end})")
        if target < found[0].lsn:
            raise InvalidTarget(f"LSN {at} is older than the history kept for {prow.name!r} "
                                f"(oldest {lsnmod.fmt(found[0].lsn)})")
        first_at_or_after = next(r for r in found if r.lsn >= target)
        return first_at_or_after.lsn, "before"
    when = parse_time(at)
    now = datetime.now(UTC)
    if when > now:
        raise InvalidTarget(f"--at {at} is in the future: choose a moment before {now.isoformat()}")
    if when < now - store.retention:
        raise InvalidTarget(f"--at {at} is outside the retention window of {store.retention.days} days")
    last = store.commits.last_commit(pieces(store, prow), when)
    if last is None:
        raise InvalidTarget(f"--at {at} is before the oldest commit kept for branch {prow.name!r}")
    return last, "through"


def pieces(store: Store, row: BranchRow) -> Iterator[HistoryPiece]:
    """Where ``row``'s history lies: per ancestor and timeline, the streamed segments and
    which LSNs of them belong to it."""
    for branch, cutoff in store._ancestry(row):
        files = store.wal_files(branch.id)
        tls = store.catalog.timelines(branch.id)
        if branch.parent_id is None and not any(t == 1 for t, _ in tls):
            tls = [(1, 0), *tls]
        ends: list[int | None] = [start for _, start in tls[1:]]
        ends.append(None)
        for (tli, start), end in zip(tls, ends, strict=True):
            yield HistoryPiece(files, tli, start, end, cutoff)


def records(store: Store, row: BranchRow) -> list[wal.WalRecord]:
    """Every WAL record on ``row``'s history (each ancestor up to its branch point), by LSN."""
    out: list[wal.WalRecord] = []
    for piece in pieces(store, row):
        on_tli = {n: p for n, p in piece.files.items() if int(n[:8], 16) == piece.tli}
        with store.readable_wal(on_tli) as files:
            out += [r for r in wal.scan(store.pg, store.user, files, piece.tli, store._segment_size())
                    if piece.holds(r.lsn)]
    out.sort(key=lambda r: r.lsn)
    return out


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidTarget(f"--at {text!r} is neither an ISO-8601 timestamp (2026-11-25T10:00:00Z) "
                            "nor an LSN (0/16B3748)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
