"""The WAL archive: one directory per branch that the branch's compute streams into, plus one
global directory of timeline history files.

Timeline IDs are unique across the whole store: at promotion Postgres probes ``restore_command``
for the history files of TLI+1, TLI+2, … and takes the first free one, and ``restore_command``
serves every branch's history files. So a segment's file name (which embeds its TLI) never clashes
between branches, and the WAL a branch needs is simply what its ancestry's directories hold.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from storage import lsn as lsnmod
from storage.errors import StorageError
from storage.postgres import PgBinaries, ServiceUser, last_error_line

SEGMENT = re.compile(r"^([0-9A-F]{24})(\.partial)?$")
HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
WALDUMP_LINE = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F]+/[0-9A-F]+, desc: (\w+)(?: (.*))?")
COMMIT_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) ?(UTC|[+-]\d\d)?")


def restore_command(dirs: Iterable[Path], history_dir: Path, fillers: Path | None = None) -> str:
    """A ``restore_command`` serving segments from ``dirs`` (in order; a zero-padded ``.partial``
    stands in for the full segment) and history files from ``history_dir`` (then ``fillers``)."""
    search = " ".join(shlex.quote(str(d)) for d in [*dirs, history_dir, *([fillers] if fillers else [])])
    script = (
        f'for d in {search}; do '
        'if [ -f "$d/%f" ]; then exec cp "$d/%f" "%p"; fi; '
        'if [ -f "$d/%f.partial" ]; then exec cp "$d/%f.partial" "%p"; fi; '
        'done; exit 1'
    )
    return "sh -c " + shlex.quote(script)


def segments(wal_dir: Path) -> dict[str, Path]:
    """Canonical segment name → file (a full segment wins over its ``.partial``)."""
    out: dict[str, Path] = {}
    if not wal_dir.is_dir():
        return out
    for entry in sorted(os.listdir(wal_dir)):
        m = SEGMENT.match(entry)
        if m and (m.group(2) is None or m.group(1) not in out):
            out[m.group(1)] = wal_dir / entry
    return out


def copy_history(src_dir: Path, history_dir: Path) -> list[int]:
    """Copy every ``*.history`` in ``src_dir`` into the global history dir; returns their TLIs."""
    tlis = []
    for entry in os.listdir(src_dir):
        m = HISTORY.match(entry)
        if not m:
            continue
        tlis.append(int(m.group(1), 16))
        dest = history_dir / entry
        if not dest.exists():
            tmp = history_dir / f".{entry}.tmp"
            shutil.copyfile(src_dir / entry, tmp)
            os.replace(tmp, dest)
    return sorted(tlis)


def history_tlis(history_dir: Path) -> list[int]:
    """The timelines with a history file in ``history_dir``, ascending."""
    if not history_dir.is_dir():
        return []
    return sorted(int(m.group(1), 16) for m in map(HISTORY.match, os.listdir(history_dir)) if m)


def history_switch_lsn(history_file: Path) -> int:
    """The LSN where the timeline in ``history_file`` began (its last line's switch point)."""
    lines = [ln.split() for ln in history_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lsnmod.parse(lines[-1][1]) if lines else 0


@dataclass(frozen=True)
class WalRecord:
    lsn: int
    kind: str
    commit_time: datetime | None


def contiguous_runs(names: list[str], seg_size: int) -> list[list[str]]:
    """Split sorted segment names of one timeline into runs without gaps (GC or a receiver that
    started late can leave holes, and pg_waldump stops at the first missing file)."""
    runs: list[list[str]] = []
    for name in names:
        start = lsnmod.segment_start(name, seg_size)[1]
        if runs and start == lsnmod.segment_start(runs[-1][-1], seg_size)[1] + seg_size:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def scan(pg: PgBinaries, user: ServiceUser, files: dict[str, Path], tli: int, seg_size: int, *,
         transactions_only: bool = False) -> list[WalRecord]:
    """Every record on timeline ``tli`` in ``files`` (canonical name → file), via pg_waldump;
    with ``transactions_only``, only commits and aborts (what a point in time needs: pg_waldump
    then skips the rest itself, and there are far fewer lines to parse)."""
    names = sorted(n for n in files if int(n[:8], 16) == tli)
    out: list[WalRecord] = []
    for run in contiguous_runs(names, seg_size):
        out += _dump(pg, files, run, tli, transactions_only)
    return out


# What pg_waldump says when a file it was given is not there (rather than at the end of the WAL).
MISSING_FILE = ("could not locate WAL file", "could not open file", "could not find file")


def _now_at(path: Path) -> Path:
    """Where a streamed segment is now: the receiver renames ``X.partial`` to ``X`` when the
    segment is finished, possibly between listing the directory and reading it."""
    if path.name.endswith(".partial") and not path.exists():
        done = path.with_name(path.name[:-len(".partial")])
        if done.exists():
            return done
    return path


def _dump(pg: PgBinaries, files: dict[str, Path], names: list[str], tli: int,
          transactions_only: bool) -> list[WalRecord]:
    only = ["--rmgr=Transaction"] if transactions_only else []
    for _ in range(3):  # a segment finished (and renamed) under pg_waldump: look again
        with tempfile.TemporaryDirectory(prefix="lakelet-waldump-") as tmp:
            os.chmod(tmp, 0o755)
            for n in names:
                os.symlink(_now_at(files[n]), os.path.join(tmp, n))
            # Both ends: given only a start segment, pg_waldump stops at the end of that one segment.
            proc = subprocess.run(
                [pg["pg_waldump"], "--path", tmp, "--timeline", str(tli), *only, names[0], names[-1]],
                capture_output=True, text=True,
                # Commit times in UTC whatever this machine's zone is (the parser reads whole hours only).
                env={"LC_ALL": "C", "TZ": "UTC", "PATH": os.environ.get("PATH", "")},
            )
        # pg_waldump also exits non-zero at the end of the WAL written so far: only a file it could
        # not open means the read is incomplete.
        if not any(m in proc.stderr for m in MISSING_FILE):
            break
    else:
        raise StorageError(f"pg_waldump could not read the archived WAL: {last_error_line(proc.stderr)}")
    out: list[WalRecord] = []
    for line in proc.stdout.splitlines():
        m = WALDUMP_LINE.search(line)
        if not m:
            continue
        when = None
        if m.group(2) in ("COMMIT", "COMMIT_PREPARED") and m.group(3):
            t = COMMIT_TIME.match(m.group(3))
            if t:
                when = datetime.fromisoformat(t.group(1) + ("+00" if t.group(2) in (None, "UTC") else t.group(2)))
        out.append(WalRecord(lsnmod.parse(m.group(1)), m.group(2), when))
    return out
