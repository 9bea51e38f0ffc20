"""The store in a bucket (moto's S3 server on loopback): the bucket alone is the whole project.

A project written through one store is brought back by another store on an empty directory —
every branch, role and row, point in time included — with a pack cache far smaller than the
packs; a second store on the same bucket refuses while the first holds the lease, and one whose
lease was taken stops writing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.bucket import open_store
from storage.commits import _UNREAD
from storage.lease import LeaseLost, StoreInUse
from storage.postgres import PgBinaries, ServiceUser
from storage.s3objects import S3ObjectStore
from tests.conftest import poll_until, scratch_dir
from tests.s3server import S3Server
from tests.storage.conftest import branch_at_head, close_lake, open_lake, rows, sql, suspend_all


def finished(wal_dir: Path) -> set[str]:
    """Finished (not .partial) segments in a branch's local WAL directory."""
    return {p.name for p in wal_dir.iterdir() if len(p.name) == 24} if wal_dir.is_dir() else set()


async def test_bucket_alone_brings_back_the_project(s3_server: S3Server, service_user: ServiceUser,
                                                     pg: PgBinaries) -> None:
    uri = f"s3://{s3_server.new_bucket()}/project"
    with scratch_dir("lakelet-s3-a-") as first_root, scratch_dir("lakelet-s3-b-") as second_root:
        lake = await open_lake(first_root, service_user, pg, uri, upload_interval=0.2)
        try:
            await sql(lake, "main", "CREATE TABLE t (n int PRIMARY KEY)")
            for first in range(1, 51, 10):  # commits spread over several finished segments
                await sql(lake, "main", "INSERT INTO t SELECT generate_series($1::int, $1::int + 9)", first)
                await sql(lake, "main", "SELECT pg_switch_wal()")
            await asyncio.sleep(1.2)
            moment = datetime.now(UTC).isoformat()
            await asyncio.sleep(1.2)
            await sql(lake, "main", "INSERT INTO t SELECT generate_series(51, 100)")
            await sql(lake, "main", "SELECT pg_switch_wal()")
            await sql(lake, "main", "SELECT pg_switch_wal()")

            # Local disk keeps only the tail: once uploaded, every finished segment but the newest
            # is in the bucket alone.
            main_id = lake.store.get_branch("main").id
            main_wal = first_root / "store" / "wal" / str(main_id)
            await poll_until(lambda: len(finished(main_wal)) == 1 and len(lake.store._offloaded(main_id)) >= 5,
                             "finished segments leaving local disk", timeout=60, every=0.2)
            offloaded = lake.store._offloaded(main_id)
            in_bucket = {k.rsplit("/", 1)[1] for k, _ in lake.store.objects.client.list(f"wal/{main_id}/")}
            assert set(offloaded) <= in_bucket and not set(offloaded) & finished(main_wal)
            # A branch at a moment whose WAL is only in the bucket: the commit index and the
            # replay read it from there.
            await asyncio.to_thread(lake.store.create_branch, "early", "main", at=moment)
            assert await rows(lake, "early", "t") == list(range(1, 51))
            learned = {k for k in lake.store.commits._earliest if k.startswith(f"{main_id}/")}
            assert learned  # the commit index read main's segments (from the bucket)
            assert not (first_root / "computes" / "early" / "staged-wal").exists()
            await branch_at_head(lake, "child", "main")
            await sql(lake, "child", "INSERT INTO t VALUES (1000)")
            await sql(lake, "main", "CREATE ROLE alice LOGIN PASSWORD 'wonderland'")
            node = lake.endpoints.active_node("main")
            assert node is not None
            await node.sync_roles()
        finally:
            await close_lake(lake)

        keys = [k["Key"] for k in s3_server.client().list_objects_v2(
            Bucket=uri.split("/")[2], Prefix="project/").get("Contents", [])]
        assert any(k.startswith("project/objects/packs/") for k in keys)
        assert any(k.startswith("project/objects/images/") for k in keys)
        assert any(k.startswith("project/wal/") for k in keys)
        assert "project/state.json" in keys

        # A fresh machine: an empty directory, a pack cache smaller than one pack.
        cache_size = 256 << 10
        lake = await open_lake(second_root, service_user, pg, uri, upload_interval=0.2, cache_size=cache_size)
        try:
            assert sorted(lake.store.branch_names()) == ["child", "early", "main"]
            # Restored with only the tail of each branch's WAL locally.
            assert len(finished(second_root / "store" / "wal" / str(main_id))) == 1
            assert set(lake.store._offloaded(main_id)) >= set(offloaded)
            # The commit index came back with it and still answers for those segments: a point in
            # time after a restore does not read the WAL again.
            commits = lake.store.commits
            known = {f"{main_id}/{n}" for n, p in lake.store.wal_files(main_id).items()
                     if commits._known(p) is not _UNREAD}
            assert learned <= known
            assert "alice" in lake.store.roles("main")
            assert str(lake.store.roles("main")["alice"]).startswith("SCRAM-SHA-256$")
            assert await rows(lake, "main", "t") == list(range(1, 101))
            assert await rows(lake, "child", "t") == [*range(1, 101), 1000]
            await asyncio.to_thread(lake.store.create_branch, "past", "main", at=moment)
            assert await rows(lake, "past", "t") == list(range(1, 51))
            objects = lake.store.objects
            assert isinstance(objects, S3ObjectStore)
            largest = max(size for _, size in objects.client.list("objects/"))
            cached = sum(p.stat().st_size for p in (second_root / "store" / "cache").rglob("*") if p.is_file())
            assert cached <= cache_size + largest

            # Deleting a branch and collecting garbage empties the bucket of it, once the catalog
            # snapshot without it is published.
            child_id = lake.store.get_branch("child").id
            await suspend_all(lake)

            def child_left() -> list[str]:
                return [k for k, _ in objects.client.list("") if k.startswith(
                    (f"objects/images/{child_id}/", f"wal/{child_id}/"))]

            assert any(k.startswith("objects/images/") for k in child_left())
            assert any(k.startswith("wal/") for k in child_left())
            await asyncio.to_thread(lake.store.delete_branch, "child")
            await asyncio.to_thread(lake.store.gc)
            await poll_until(lambda: not child_left(), "the deleted branch leaving the bucket", timeout=60, every=0.2)
            assert await rows(lake, "main", "t") == list(range(1, 101))
        finally:
            await close_lake(lake)

        # The same data dir again (a restart, not a rebuild: the sentinel survives): the segments
        # only in the bucket are known from its listing, and point in time still reads them.
        sentinel = second_root / "store" / "not-rebuilt"
        sentinel.touch()
        lake = await open_lake(second_root, service_user, pg, uri, upload_interval=0.2)
        try:
            assert sentinel.exists()
            assert set(lake.store._offloaded(main_id)) >= set(offloaded)
            await asyncio.to_thread(lake.store.create_branch, "past-again", "main", at=moment)
            assert await rows(lake, "past-again", "t") == list(range(1, 51))
        finally:
            await close_lake(lake)


def test_second_store_on_the_bucket_refuses(s3_server: S3Server, service_user: ServiceUser, pg: PgBinaries,
                                            workdir: Path) -> None:
    uri = f"s3://{s3_server.new_bucket()}"
    first = open_store(uri, workdir / "a" / "store", user=service_user, pg=pg, upload_interval=0.2)
    try:
        with pytest.raises(StoreInUse) as refused:
            open_store(uri, workdir / "b" / "store", user=service_user, pg=pg)
        line = str(refused.value)
        assert "\n" not in line and f"pid {os.getpid()}" in line and "lease" in line
    finally:
        first.close()
    # Released on close: the next one takes it at once.
    second = open_store(uri, workdir / "b" / "store", user=service_user, pg=pg, upload_interval=0.2)
    second.close()


async def test_store_whose_lease_was_taken_stops_writing(s3_server: S3Server, service_user: ServiceUser,
                                                         pg: PgBinaries, workdir: Path) -> None:
    bucket = s3_server.new_bucket()
    lost: list[str] = []
    store = open_store(f"s3://{bucket}", workdir / "store", user=service_user, pg=pg, upload_interval=0.2,
                       lease_ttl=3, on_lease_lost=lost.append)
    try:
        # Another holder takes the bucket over (as a newer lakelet up would after the lease expired).
        client = s3_server.client()
        lease = json.loads(client.get_object(Bucket=bucket, Key="lease.json")["Body"].read())
        lease.update(token=lease["token"] + 1, holder={"host": "elsewhere", "pid": 1}, renewed_at=time.time())
        client.put_object(Bucket=bucket, Key="lease.json", Body=json.dumps(lease).encode())
        await poll_until(lambda: lost, "losing the lease", timeout=30, every=0.1)
        assert "taken by another lakelet up" in lost[0]
        with pytest.raises(LeaseLost):
            store.objects.put("packs/late.pack", b"x")
        assert "objects/packs/late.pack" not in [
            k["Key"] for k in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        store.close()


def bucket_state(server: S3Server, bucket: str) -> dict[str, str]:
    """Every object but the lease, with its ETag."""
    listed = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed if not o["Key"].endswith("lease.json")}


async def test_store_whose_lease_was_stolen_writes_nothing_after(s3_server: S3Server, service_user: ServiceUser,
                                                                 pg: PgBinaries, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """Two stores on one bucket: B takes the lease while A still believes it holds it (B's clock
    runs an hour ahead, so A's lease looks expired to it; A renews only every 150 s). A goes on
    writing — WAL of new commits, a pack, a new branch in its catalog — and none of it reaches the
    bucket: the write path confirms the fencing token with a conditional PUT first. The project
    restored afterwards is exactly B's."""
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/p"
    lost: list[str] = []
    with scratch_dir("lakelet-s3-a-") as a_root, scratch_dir("lakelet-s3-b-") as b_root, \
            scratch_dir("lakelet-s3-c-") as c_root:
        a = await open_lake(a_root, service_user, pg, uri, upload_interval=0.2, lease_ttl=600,
                            on_lease_lost=lost.append)
        b = None
        try:
            await sql(a, "main", "CREATE TABLE t (n int PRIMARY KEY)")
            await sql(a, "main", "INSERT INTO t SELECT generate_series(1, 20)")
            uploader = a.store.objects.uploader  # type: ignore[attr-defined]
            await poll_until(lambda: uploader.pending()[0] == 0, "A's WAL in the bucket", timeout=60, every=0.1)

            import storage.lease as lease_module
            monkeypatch.setattr(lease_module, "_wall", lambda: time.time() + 3600)
            b = await open_lake(b_root, service_user, pg, uri, upload_interval=0.2, lease_ttl=600)
            monkeypatch.undo()
            await sql(b, "main", "INSERT INTO t SELECT generate_series(21, 30)")
            await suspend_all(b)
            b_uploader = b.store.objects.uploader  # type: ignore[attr-defined]
            await poll_until(lambda: b_uploader.pending()[0] == 0, "B's WAL in the bucket", timeout=60, every=0.1)
            b_uploader.round()  # anything B had left is published: B is idle from here on
            before = bucket_state(s3_server, bucket)
            assert not lost

            # A, stale, goes on writing.
            await sql(a, "main", "INSERT INTO t SELECT generate_series(1000, 1009)")
            await asyncio.to_thread(a.store.create_branch, "a-only", "main")
            await poll_until(lambda: lost, "A noticing the stolen lease", timeout=60, every=0.1)
            assert "taken by another lakelet up" in lost[0]
            with pytest.raises(LeaseLost):
                await asyncio.to_thread(a.store.objects.put, "packs/late.pack", b"x")
            assert bucket_state(s3_server, bucket) == before
        finally:
            await close_lake(a)
            if b is not None:
                await close_lake(b)

        c = await open_lake(c_root, service_user, pg, uri, upload_interval=0.2)
        try:
            assert sorted(c.store.branch_names()) == ["main"]
            assert await rows(c, "main", "t") == list(range(1, 31))
        finally:
            await close_lake(c)
