"""The recovery plan: which image a branch starts from, which WAL directories replay serves, on
which timeline, and up to which target.

One seam of the store: pure reads of the catalog; ``Store.materialize`` acts on the plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from storage import lsn as lsnmod
from storage.catalog import BranchRow, ImageRow
from storage.errors import MaterializeError

if TYPE_CHECKING:
    from storage.store import Store


def ancestry(store: Store, row: BranchRow) -> list[tuple[BranchRow, int | None]]:
    """[(branch, cutoff LSN)] from ``row`` up to the root; cutoff None = the branch's end."""
    out: list[tuple[BranchRow, int | None]] = [(row, None)]
    while row.parent_id is not None:
        cutoff = row.parent_lsn
        row = store.catalog.branch_by_id(row.parent_id)  # type: ignore[assignment]
        out.append((row, cutoff))
    return out


def tli_at(store: Store, row: BranchRow, at: int | None) -> int:
    """The timeline live on ``row``'s history at LSN ``at`` (None = its latest)."""
    for branch, cutoff in ancestry(store, row):
        limit = at if at is not None else cutoff
        if cutoff is not None and limit is not None:
            limit = min(limit, cutoff)
        starts = [(start, t) for t, start in store.catalog.timelines(branch.id) if limit is None or start <= limit]
        if starts:
            return max(starts)[1]
        at = limit
    return 1


def dirs(store: Store, row: BranchRow) -> list[Path]:
    """Streamed WAL directories of ``row``'s ancestry, nearest first."""
    out: list[Path] = []
    for branch, _ in ancestry(store, row):
        out.append(store.wal_root / str(branch.id))
        legacy = store.wal_root / f"{branch.id}.ckpt"  # checkpoint copies of older stores
        if legacy.is_dir():
            out.append(legacy)
    return out


def image_for(store: Store, row: BranchRow, at: int | None = None) -> ImageRow | None:
    """Nearest image at or before ``at`` on ``row``'s ancestry (None = latest)."""
    for branch, cutoff in ancestry(store, row):
        limit = at if at is not None else cutoff
        if cutoff is not None and limit is not None:
            limit = min(limit, cutoff)
        candidates = [i for i in store.catalog.images(branch.id) if limit is None or i.lsn <= limit]
        if candidates:
            return candidates[-1]
        at = limit
    return None


def start_image(store: Store, row: BranchRow) -> ImageRow | None:
    """The image ``materialize`` starts ``row`` from: its nearest image at its end when it has
    run (or is the root), else the nearest one at or before its branch point."""
    if store.catalog.timelines(row.id) or row.parent_id is None:
        return image_for(store, row)
    return image_for(store, row, row.parent_lsn)


def recovery_plan(store: Store, row: BranchRow) -> tuple[ImageRow, dict[str, str], list[Path]]:
    """(start image, recovery settings, WAL directories for ``restore_command``) for ``row``."""
    image = start_image(store, row)
    if image is None:
        raise MaterializeError(f"no image of branch {row.name!r} or its ancestors: the store is incomplete")
    own_ckpt = store._ckpt_dir(image.manifest_key)
    if store.catalog.timelines(row.id) or row.parent_id is None:
        # It has run: its state is the end of its WAL, so replay all of it (streamed segments
        # first: the image's own checkpoint copy ends where the streamed one may go on).
        return image, {"recovery_target_timeline": str(tli_at(store, row, None))}, [*dirs(store, row), own_ckpt]
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
        "recovery_target_timeline": str(tli_at(store, row, target)),
    }
    return image, settings, [*dirs(store, row), own_ckpt]
