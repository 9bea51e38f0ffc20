"""Fixtures every suite shares: the PostgreSQL binaries, the OS user computes run as, and a
scratch directory that user can reach (pytest's own tmp dirs live under a 0700 root folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user


@pytest.fixture(scope="session")
def pg() -> PgBinaries:
    return find_binaries()


@pytest.fixture(scope="session")
def service_user() -> ServiceUser:
    return resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))


@pytest.fixture
def workdir(service_user: ServiceUser) -> Iterator[Path]:
    """An empty directory under /tmp that the service user can traverse; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="lakelet-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
