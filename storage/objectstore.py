"""The object-store interface everything durable goes through, and its local-directory backend.

The interface is the S3 API's shape (put / get / ranged get / list / delete) so a bucket backend
can replace the local directory without any change above it. Writes are atomic: a reader sees the
old object or the new one, never a partial one, even across kill -9 or power loss.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TEMP_MARK = ".tmp-"


class ObjectNotFound(KeyError):
    """No object under that key."""


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def get_to_file(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def total_bytes(self, prefix: str = "") -> int: ...
    def prefetch(self, keys: Iterable[str]) -> None: ...
    def cleanup_temp(self) -> int: ...
    def close(self) -> None: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or TEMP_MARK in key:
        raise ValueError(f"object key {key!r} is not a relative path of plain names")
    return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore:
    """Objects as files under ``root``; temp file + fsync + rename + fsync(dir) per write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{TEMP_MARK}{os.getpid()}-{path.name}")

    def _commit(self, tmp: Path, path: Path) -> None:
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def put(self, key: str, data: bytes) -> None:
        self.put_chunks(key, (data,))

    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> None:
        """One object from a stream of pieces (a multipart upload, in S3 terms), written next to
        its final name so a crash leaves only a temp file that ``cleanup_temp`` removes."""
        path = self._path(key)
        tmp = self._temp_for(path)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._commit(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_to_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith(TEMP_MARK):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def total_bytes(self, prefix: str = "") -> int:
        return sum(self.size(k) for k in self.list(prefix))

    def prefetch(self, keys: Iterable[str]) -> None:
        """Nothing to do: every object is already on this disk (a bucket backend fetches here)."""

    def close(self) -> None:
        pass

    def cleanup_temp(self) -> int:
        """Remove temp files a crash left behind; returns how many."""
        removed = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(TEMP_MARK):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
        return removed
