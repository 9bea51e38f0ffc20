"""One store operation in a process of its own, optionally killed (SIGKILL, by itself) after a
given number of executed lines of storage code: the crash tests use it to stop an operation at
chosen points with no hook inside the operation.

    python -m tests.storage.crash_child STORE_ROOT KILL_AFTER_LINES OPERATION [ARGS...]

KILL_AFTER_LINES 0 runs to the end. Operations: create NAME PARENT | image BRANCH DATADIR |
delete NAME | gc (with a retention of 0, so GC has the most to drop).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import storage
from storage import BranchExists, BranchNotFound, Store
from storage.postgres import find_binaries, resolve_service_user

STORAGE_DIR = str(Path(storage.__file__).parent)


def kill_after(lines: int) -> None:
    """Trace storage code line by line; SIGKILL this process at line number ``lines``."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count == lines:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(STORAGE_DIR) else None

    if lines > 0:
        sys.settrace(calls)


def main(argv: list[str]) -> None:
    root, lines, operation, *args = argv
    store = Store.open(Path(root), user=resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER")),
                       pg=find_binaries(), retention_days=0)
    kill_after(int(lines))
    try:
        run(store, operation, args)
    except (BranchExists, BranchNotFound):
        pass  # a killed run got as far as its commit: the operation is done already
    sys.settrace(None)
    store.close()


def run(store: Store, operation: str, args: list[str]) -> None:
    if operation == "create":
        store.create_branch(args[0], args[1])
    elif operation == "image":
        store.take_image(args[0], Path(args[1]))
    elif operation == "delete":
        store.delete_branch(args[0], force=True)
    elif operation == "gc":
        store.gc()
    else:
        raise SystemExit(f"unknown operation {operation!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
