"""One synced-table run in a process of its own, optionally killed (SIGKILL, by itself) after a
given number of executed lines of ``lakehouse/synced`` code, in any thread: the exactly-once
tests stop a run at chosen points with no hook inside the applier.

    python -m tests.lakehouse.synced_child SOCKET_DIR PORT SPEC_JSON KILL_AFTER_LINES

KILL_AFTER_LINES 0 runs to the end and prints the number of lines it executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

import lakehouse.synced
from lakehouse.synced.applier import sync_once
from lakehouse.synced.spec import SyncedTableSpec

SYNCED_DIR = str(Path(lakehouse.synced.__file__).parent)
count = 0
lock = threading.Lock()


def trace(kill_at: int) -> None:
    def local(frame: FrameType, event: str, arg: Any) -> Any:
        global count
        if event == "line":
            with lock:
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(SYNCED_DIR) else None

    sys.settrace(calls)
    threading.settrace(calls)


async def main(socket_dir: str, port: int, spec: SyncedTableSpec) -> None:
    conn = await asyncpg.connect(host=socket_dir, port=port, user="lakelet_admin", database=spec.database)
    try:
        await sync_once(conn, spec)
    finally:
        await conn.close()


if __name__ == "__main__":
    socket_dir, port, spec_json, kill_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    trace(kill_at)
    asyncio.run(main(socket_dir, port, SyncedTableSpec.from_json(json.loads(spec_json))))
    print(count)
