"""Log sequence numbers: Postgres writes them as ``X/Y`` (hex), we store them as integers."""

from __future__ import annotations

import re

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse(text: str) -> int:
    m = _LSN.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an LSN like 0/16B3748")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def looks_like(text: str) -> bool:
    return bool(_LSN.match(text.strip()))


def fmt(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_name(tli: int, lsn: int, seg_size: int) -> str:
    segno = lsn // seg_size
    per_xlogid = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def segment_start(name: str, seg_size: int) -> tuple[int, int]:
    """(timeline, first LSN) of a WAL segment file name."""
    tli, hi, lo = int(name[0:8], 16), int(name[8:16], 16), int(name[16:24], 16)
    return tli, (hi * (0x100000000 // seg_size) + lo) * seg_size
