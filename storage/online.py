"""Online images: a copy of a running compute's data files, taken without stopping it.

Why ``pg_basebackup`` against the running compute, and not a second Postgres that replays the
branch's archive in a scratch directory up to a recovery target and shuts down there:

- It is Postgres' own, supported way to copy a live cluster. The copy carries a ``backup_label``
  and its manifest names the exact WAL range it needs: replay starts at the backup's start (its
  redo point) and the copy is consistent once replay has passed the backup's end. Nothing has to
  be inferred from a "shut down in recovery" control file.
- It costs one fast checkpoint and a sequential read of the data files on the running compute. A
  replaying second server would redo all WAL since the previous image on a second cluster (on a
  small machine, next to the computes it is meant to relieve) and needs a recovery target that is
  the start of a record the archive holds, or Postgres refuses to finish recovery.
- The result is restored by the one materialize mechanism unchanged: ``backup_label`` +
  ``recovery.signal`` + ``restore_command`` is exactly how Postgres restores a base backup.

The copy is taken with ``-X none``: the compute's WAL receiver streams that WAL into the archive
anyway, and the store keeps a copy of the backup's WAL range beside the image (see
``Store.take_online_image``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from storage import lsn as lsnmod
from storage.errors import StorageError
from storage.postgres import PgBinaries, ServiceUser, last_error_line, run

MANIFEST = "backup_manifest"


class OnlineImageError(StorageError):
    """The running compute could not be copied (it stopped, or refused the connection)."""


@dataclass(frozen=True)
class BaseBackup:
    datadir: Path
    start_lsn: int  # redo point of the backup's checkpoint: replay starts here
    end_lsn: int  # end of the backup-end record: the copy is consistent from here on
    tli: int


def base_backup(pg: PgBinaries, user: ServiceUser, *, host: str, port: int, role: str, datadir: Path) -> BaseBackup:
    """Copy the cluster at ``host``/``port`` into ``datadir`` (which must not exist yet)."""
    proc = run([pg["pg_basebackup"], "-h", host, "-p", str(port), "-U", role, "-D", str(datadir),
                "-X", "none", "--checkpoint=fast", "--no-sync", "--manifest-checksums=NONE",
                "--label=lakelet online image"], user, check=False)
    if proc.returncode != 0:
        raise OnlineImageError(f"pg_basebackup failed: {last_error_line(proc.stderr + proc.stdout)}")
    manifest_path = datadir / MANIFEST
    ranges = json.loads(manifest_path.read_text())["WAL-Ranges"]
    # The manifest describes this copy only; an image is the data files (and backup_label).
    manifest_path.unlink()
    if len(ranges) != 1:
        raise OnlineImageError(f"pg_basebackup reported {len(ranges)} WAL ranges: expected one timeline")
    (wal_range,) = ranges
    return BaseBackup(datadir, lsnmod.parse(wal_range["Start-LSN"]), lsnmod.parse(wal_range["End-LSN"]),
                      int(wal_range["Timeline"]))


def segment_names(tli: int, start: int, end: int, seg_size: int) -> list[str]:
    """Names of the segments on ``tli`` holding the WAL from ``start`` up to (not including) ``end``."""
    first = start - start % seg_size
    return [lsnmod.segment_name(tli, lsn, seg_size) for lsn in range(first, max(end, start + 1), seg_size)]
