"""Keeping a branch's lakehouse-sync replication slots alive across data-dir rebuilds.

Postgres keeps a logical slot in ``pg_replslot/<name>/state`` (position and catalog horizon) and
needs, to decode from it, the WAL from its ``restart_lsn`` on and the snapshots it serialized in
``pg_logical/``. A compute's data dir is rebuilt from the store after a crash or the loss of
``computes/``, and none of that would survive: images skip ``pg_replslot`` (except these slots,
see ``storage.images``), and ``pg_wal`` holds only what replay needed. So:

- before ``materialize`` replaces a data dir that holds sync slots (a crash left it), their state
  and ``pg_logical`` are stashed beside it, tagged with the branch id;
- after a rebuild, the stash (newer than any image) is put back, slots of other branches (a child
  inherits its parent's image) are removed — a sync belongs to one branch —, and the archived WAL
  from the oldest ``restart_lsn`` on is copied into ``pg_wal`` (every timeline's: Postgres' logical
  decoding follows the timeline history across the promotion the rebuild ends with).

The slot then resumes at or before the last position the syncer confirmed; whatever it re-sends,
the syncer drops by the LSN its Delta tables record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

from storage.postgres import ServiceUser

PREFIX = "lakelet_sync_"
STASH = "logical-slots"
# The settings of a compute that serves a lakehouse sync (its branch has one enabled, or its data
# dir holds a sync slot). wal_level is restart-only. max_slot_wal_keep_size bounds the WAL a slot
# nobody reads (a sync in error, a crashed worker) can hold on the compute's disk: past it Postgres
# invalidates the slot, and the syncer, finding it lost, takes a fresh snapshot and says why.
SETTINGS = {"wal_level": "logical", "max_slot_wal_keep_size": "2GB"}
# ReplicationSlotOnDisk: magic, checksum, version, length (4 bytes each), then
# ReplicationSlotPersistentData: name (64), database, persistency, xmin, catalog_xmin (4 each),
# restart_lsn (8).
_RESTART_LSN_OFFSET = 16 + 64 + 4 * 4
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")


def _own_slots(datadir: Path, branch_id: int | None = None) -> list[Path]:
    root = datadir / "pg_replslot"
    if not root.is_dir():
        return []
    prefix = PREFIX if branch_id is None else f"{PREFIX}{branch_id}_"
    return sorted(p for p in root.iterdir() if p.name.startswith(prefix) and (p / "state").exists())


def restart_lsn(slot_dir: Path) -> int:
    with open(slot_dir / "state", "rb") as f:
        data = f.read(_RESTART_LSN_OFFSET + 8)
    return struct.unpack_from("<Q", data, _RESTART_LSN_OFFSET)[0]


def stash(datadir: Path, home: Path, branch_id: int) -> None:
    """Keep the sync slots of the data dir about to be replaced (nothing to keep: no stash)."""
    slots = _own_slots(datadir, branch_id)
    if not slots:
        return
    dest = home / STASH
    tmp = home / f".{STASH}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pg_replslot").mkdir(parents=True)
    for slot in slots:
        shutil.copytree(slot, tmp / "pg_replslot" / slot.name)
    if (datadir / "pg_logical").is_dir():
        shutil.copytree(datadir / "pg_logical", tmp / "pg_logical")
    (tmp / "branch.json").write_text(json.dumps({"branch_id": branch_id}))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def restore(datadir: Path, home: Path, branch_id: int, *, wal_dirs: list[Path], seg_size: int,
            user: ServiceUser, rebuilt: bool, enabled: bool = True) -> tuple[list[str], list[str]]:
    """Put this branch's sync slots back into a rebuilt data dir and seed the WAL they need.
    ``enabled``: the branch has a sync enabled; if not, its slots are orphans (the backup branch
    a restore leaves, a sync disabled while the compute was away) and are removed, so that no
    one's slot holds WAL on a compute no syncer reads. Returns (slots kept, slots removed)."""
    root = datadir / "pg_replslot"
    removed = []
    for slot in _own_slots(datadir):
        if not enabled or not slot.name.startswith(f"{PREFIX}{branch_id}_"):
            shutil.rmtree(slot)  # inherited from a parent's image, or no sync of this branch now
            removed.append(slot.name)
    if not enabled:
        shutil.rmtree(home / STASH, ignore_errors=True)
        return [], removed
    src = home / STASH
    try:
        stashed = json.loads((src / "branch.json").read_text()).get("branch_id") == branch_id
    except (OSError, ValueError):
        stashed = False
    if rebuilt and stashed:
        for slot in (src / "pg_replslot").iterdir():
            shutil.rmtree(root / slot.name, ignore_errors=True)
            shutil.copytree(slot, root / slot.name)
        if (src / "pg_logical").is_dir():
            shutil.copytree(src / "pg_logical", datadir / "pg_logical", dirs_exist_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    slots = _own_slots(datadir, branch_id)
    if rebuilt and slots:
        _seed_wal(datadir, min(restart_lsn(s) for s in slots), wal_dirs, seg_size)
    user.own_tree(datadir / "pg_replslot")
    user.own_tree(datadir / "pg_logical")
    user.own_tree(datadir / "pg_wal")
    return [s.name for s in slots], removed


def _seed_wal(datadir: Path, start_lsn: int, wal_dirs: list[Path], seg_size: int) -> None:
    per_id = 0x100000000 // seg_size
    first = start_lsn // seg_size
    pg_wal = datadir / "pg_wal"
    for wal_dir in wal_dirs:
        if not wal_dir.is_dir():
            continue
        for entry in sorted(os.listdir(wal_dir)):
            m = _SEGMENT.match(entry)
            if m is None:
                continue
            segno = int(m.group(2), 16) * per_id + int(m.group(3), 16)
            name = entry.removesuffix(".partial")
            if segno < first or (pg_wal / name).exists():
                continue
            if m.group(4) and (wal_dir / name).exists():
                continue  # the completed segment is there too
            tmp = pg_wal / f".{name}.tmp"
            shutil.copyfile(wal_dir / entry, tmp)
            os.replace(tmp, pg_wal / name)


def copy_live(src: Path, dest: Path, user: ServiceUser) -> list[str]:
    """Add the sync slots of the running data dir ``src`` to ``dest``, a base backup of it
    (``pg_basebackup`` leaves ``pg_replslot`` empty), so an online image carries them like a clean
    one. Postgres replaces a slot's ``state`` file by rename, so each copy is one whole version,
    at most as new as the backup (a position at or before the one confirmed then: replayed
    changes are dropped by the Delta versions). ``pg_logical`` is in the backup already."""
    names = []
    for slot in _own_slots(src):
        target = dest / "pg_replslot" / slot.name
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / ".state.tmp"
        try:
            shutil.copyfile(slot / "state", tmp)
        except FileNotFoundError:  # dropped meanwhile
            shutil.rmtree(target, ignore_errors=True)
            continue
        os.replace(tmp, target / "state")
        names.append(slot.name)
    if names:
        user.own_tree(dest / "pg_replslot")
    return names
