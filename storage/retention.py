"""Retention: what no branch and no instant inside the window can need goes (images, WAL, pages).

One seam of the store (``Store.gc`` is the facade's entry point): it reads the catalog through the
store, decides what to keep, and deletes catalog rows first and files after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage import images
from storage import lsn as lsnmod
from storage.catalog import BranchRow, ImageRow

if TYPE_CHECKING:
    from storage.store import Store

FORKED_DIR = "forked"


@dataclass(frozen=True)
class GcReport:
    images_deleted: int
    wal_files_deleted: int
    bytes_freed: int


def gc(store: Store) -> GcReport:
    """Drop images and WAL that no branch and no instant inside the retention window can need,
    then pages no remaining image references. The catalog forgets first and files go after,
    so a crash at any point leaves every surviving branch materializable."""
    with store._maintenance.exclusive():
        keep, floors = needed(store)
        doomed = [i for i in store.catalog.images() if i.id not in keep]
        with store.catalog.transaction() as db:
            store.catalog.delete_images(db, [i.id for i in doomed])
        freed = store._drop_image_files(doomed)
        wal_deleted, wal_freed = drop_wal_below(store, floors)
        store.commits.forget_missing({f"{p.parent.name}/{p.name}" for b in store.catalog.branches()
                                      for p in store.wal_files(b.id).values()})
        live: set[bytes] = set()
        for image in store.catalog.images():
            live |= images.image_digests(store.objects, image.manifest_key)
        freed += wal_freed + store.pages.collect(live)
    return GcReport(len(doomed), wal_deleted, freed)


def needed(store: Store) -> tuple[set[int], dict[int, int]]:
    """(IDs of images to keep, per branch the lowest LSN of its own WAL still needed).

    A branch needs its images made inside the window plus the newest older one (every instant
    in the window is at or after it); with no image older than the window, all of its own WAL
    (instants before its first image replay from its branch point). Each branch also needs
    the image ``materialize`` starts it from, and from there all WAL up its ancestry: the
    branches between it and that image, whatever their own images, must keep WAL up to the
    branch point."""
    cutoff = time.time() - store.retention.total_seconds()
    branches = store.catalog.branches()
    keep: set[int] = set()
    floors: dict[int, int] = {}
    whole_history: set[int] = set()
    for row in branches:
        own = store.catalog.images(row.id)
        old = [i for i in own if i.created_at < cutoff]
        keep.update(i.id for i in own if i.created_at >= cutoff)
        keep.update(i.id for i in old[-1:])
        floors[row.id] = old[-1].lsn if old else 0
        if not old:
            whole_history.add(row.id)
    for row in branches:
        starts = [store._start_image(row)]
        if row.parent_id is not None and row.id in whole_history:
            starts.append(store._image_for(row, row.parent_lsn))
        for image in starts:
            if image is not None:
                keep.add(image.id)
                lower_floors(store, row, image, floors)
    return keep, floors


def lower_floors(store: Store, row: BranchRow, image: ImageRow, floors: dict[int, int]) -> None:
    for branch, _ in store._ancestry(row):
        if branch.id == image.branch_id:
            floors[branch.id] = min(floors[branch.id], image.lsn)
            return
        floors[branch.id] = 0


def drop_wal_below(store: Store, floors: dict[int, int]) -> tuple[int, int]:
    """Delete streamed segments wholly below each branch's floor; (files, bytes)."""
    seg_size = store._segment_size()
    deleted = freed = 0
    for branch_id, floor in floors.items():
        offloaded = store._offloaded(branch_id)
        for name, path in store.wal_files(branch_id).items():
            _, start = lsnmod.segment_start(name, seg_size)
            if start + seg_size <= floor - seg_size:  # keep one segment of slack before the floor
                if name in offloaded and store.remote_wal is not None:
                    freed += offloaded[name][0]
                    store.remote_wal.forget(f"{branch_id}/{name}")
                else:
                    freed += path.stat().st_size
                    path.unlink()
                deleted += 1
        forked = store.wal_root / str(branch_id) / FORKED_DIR
        cutoff = time.time() - store.retention.total_seconds()
        for path in forked.glob("*") if forked.is_dir() else []:
            if path.stat().st_mtime < cutoff:
                freed += path.stat().st_size
                path.unlink()
                deleted += 1
    return deleted, freed
