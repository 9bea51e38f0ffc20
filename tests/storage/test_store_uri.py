"""Choosing the store from ``store_uri``: the forms accepted, and one clear line for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from lakelet import config
from storage import Store
from storage.bucket import local_root, open_store, parse_size
from storage.errors import StorageError
from storage.objectstore import LocalObjectStore
from storage.postgres import PgBinaries, ServiceUser
from storage.s3 import S3Error, parse_s3_uri


def test_file_uri_and_the_default_open_a_local_store(workdir: Path, service_user: ServiceUser,
                                                     pg: PgBinaries) -> None:
    default = workdir / "data" / "store"
    assert local_root(None, default) == default and local_root("", default) == default
    store = open_store(f"file://{workdir}/elsewhere", default, user=service_user, pg=pg)
    try:
        assert isinstance(store, Store) and isinstance(store.objects, LocalObjectStore)
        assert store.root == workdir / "elsewhere" and (workdir / "elsewhere" / "catalog.db").exists()
        assert not default.exists()
    finally:
        store.close()


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3:/bucket", "s3://bucket/../x", "s3://bucket/p?versionId=1"])
def test_bad_store_uris_are_one_line(uri: str) -> None:
    with pytest.raises(StorageError) as err:
        local_root(uri, Path("/tmp/x")) if not uri.startswith("s3") else parse_s3_uri(uri)
    assert "\n" not in str(err.value) and uri in str(err.value)


def test_s3_uri_parts() -> None:
    assert parse_s3_uri("s3://bkt").prefix == ""
    loc = parse_s3_uri("s3://bkt/a/b/")
    assert (loc.bucket, loc.prefix, loc.uri) == ("bkt", "a/b/", "s3://bkt/a/b/")
    with pytest.raises(S3Error):
        parse_s3_uri("s3://")


def test_cache_size_and_config() -> None:
    assert parse_size("10GB") == 10 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("4096") == 4096
    assert parse_size("1.5k") == 1536
    with pytest.raises(ValueError, match="cache_size"):
        parse_size("lots")
    env = {"LAKELET_STORE_URI": "s3://bkt/lake", "LAKELET_WAL_UPLOAD_INTERVAL": "0.5", "LAKELET_CACHE_SIZE": "2G"}
    conf = config.load(None, {"store_uri": None}, env=env)
    assert (conf.store_uri, conf.wal_upload_interval, conf.cache_size) == ("s3://bkt/lake", 0.5, "2G")
    assert config.load(None, {"store_uri": "file:///srv/lake"}, env=env).store_uri == "file:///srv/lake"
    for bad in ({"LAKELET_STORE_URI": "/srv/lake"}, {"LAKELET_CACHE_SIZE": "lots"},
                {"LAKELET_WAL_UPLOAD_INTERVAL": "0"}):
        with pytest.raises(config.ConfigError) as err:
            config.load(None, {}, env=bad)
        assert "\n" not in str(err.value)
