"""A data directory stored as pages: write one from a cleanly shut down cluster, restore it.

The manifest (compressed JSON: directories, and per file its mode, size and page digests) is
written last, so an image exists only once every page it names is durable.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from storage.objectstore import ObjectStore
from storage.pagestore import PAGE_SIZE, PageStore

DIGEST_SIZE = 20
# WAL lives in the WAL archive; the rest is per-run state Postgres recreates.
SKIP_CONTENTS = {"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify", "pg_snapshots"}
SKIP_FILES = {"postmaster.pid", "postmaster.opts", "standby.signal", "recovery.signal"}
# ...except the slots of lakehouse sync, which must outlive the data dir (compute/logical_slots.py).
KEEP_SLOTS_PREFIX = "pg_replslot/lakelet_sync_"


class ImageError(RuntimeError):
    """A data directory that cannot be imaged (say, one with tablespaces)."""


@dataclass(frozen=True)
class ImageStats:
    files: int
    logical_bytes: int
    new_bytes: int
    manifest_key: str


def _walk(datadir: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    for dirpath, dirnames, filenames in os.walk(datadir):
        rel = os.path.relpath(dirpath, datadir)
        rel = "" if rel == "." else rel
        if rel == "pg_replslot":
            dirnames[:] = [d for d in dirnames if f"{rel}/{d}".startswith(KEEP_SLOTS_PREFIX)]
            yield rel, dirnames, filenames
            continue
        if rel.split("/")[0] in SKIP_CONTENTS and rel and not rel.startswith(KEEP_SLOTS_PREFIX):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith("pgsql_tmp")]
        yield rel, dirnames, filenames


def _pages(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(PAGE_SIZE * 128):
            for i in range(0, len(chunk), PAGE_SIZE):
                yield chunk[i:i + PAGE_SIZE]


def write_image(pages: PageStore, objects: ObjectStore, datadir: Path, manifest_key: str) -> ImageStats:
    dirs: list[str] = []
    found: list[tuple[str, Path, os.stat_result]] = []
    for rel, dirnames, filenames in _walk(datadir):
        for d in dirnames:
            full = datadir / rel / d
            if full.is_symlink():
                raise ImageError(f"{full} is a symbolic link: tablespaces are not supported, move the data back")
            dirs.append(os.path.join(rel, d))
        if rel.split("/")[0] in SKIP_CONTENTS and not rel.startswith(KEEP_SLOTS_PREFIX):
            continue
        for name in filenames:
            if (not rel and name in SKIP_FILES) or name.startswith("pgsql_tmp"):
                continue
            full = datadir / rel / name
            if full.is_symlink():
                raise ImageError(f"{full} is a symbolic link: tablespaces are not supported, move the data back")
            found.append((os.path.join(rel, name), full, full.stat()))
    # One stream of pages for all files, so packs fill up across them: a cluster has hundreds of
    # small files, and a pack per file would mean a request per file for a store in a bucket.
    counts: list[int] = []

    def stream() -> Iterator[bytes]:
        for _, full, _ in found:
            counts.append(0)
            for page in _pages(full):
                counts[-1] += 1
                yield page

    digests, new = pages.put_pages(stream())
    files: list[dict[str, object]] = []
    logical = at = 0
    for (rel_path, _, st), count in zip(found, counts, strict=True):
        logical += st.st_size
        files.append({"p": rel_path, "m": st.st_mode & 0o7777, "s": st.st_size,
                      "d": base64.b64encode(b"".join(digests[at:at + count])).decode()})
        at += count
    manifest = {"version": 1, "dirs": sorted(dirs), "files": files, "logical_bytes": logical}
    body = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 6)
    objects.put(manifest_key, body)
    return ImageStats(len(files), logical, new + len(body), manifest_key)


def read_manifest(objects: ObjectStore, manifest_key: str) -> dict[str, object]:
    return json.loads(zlib.decompress(objects.get(manifest_key)))


def _digests(entry: dict[str, object]) -> list[bytes]:
    raw = base64.b64decode(str(entry["d"]))
    return [raw[i:i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def restore_image(pages: PageStore, objects: ObjectStore, manifest_key: str, target: Path) -> None:
    manifest = read_manifest(objects, manifest_key)
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    for d in manifest["dirs"]:  # type: ignore[attr-defined]
        (target / d).mkdir(mode=0o700, parents=True, exist_ok=True)
    pages.prefetch([d for entry in manifest["files"] for d in _digests(entry)])  # type: ignore[attr-defined]
    # Writing into the page cache and decompressing the next batch both run without the GIL:
    # one writer thread overlaps them.
    with ThreadPoolExecutor(1, thread_name_prefix="lakelet-restore") as writer:
        for entry in manifest["files"]:  # type: ignore[attr-defined]
            path = target / entry["p"]
            digests = _digests(entry)
            with open(path, "wb") as f:
                pending: Future[int] | None = None
                for i in range(0, len(digests), 1024):
                    data = b"".join(pages.get_pages(digests[i:i + 1024]))
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(f.write, data)
                if pending is not None:
                    pending.result()
            os.chmod(path, entry["m"])


def image_digests(objects: ObjectStore, manifest_key: str) -> set[bytes]:
    manifest = read_manifest(objects, manifest_key)
    out: set[bytes] = set()
    for entry in manifest["files"]:  # type: ignore[attr-defined]
        out.update(_digests(entry))
    return out


def image_logical_bytes(objects: ObjectStore, manifest_key: str) -> int:
    return int(read_manifest(objects, manifest_key)["logical_bytes"])  # type: ignore[arg-type]
