"""Fixtures every suite shares: the PostgreSQL binaries, the OS user computes run as, and a
scratch directory that user can reach (pytest's own tmp dirs live under a 0700 root folder)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from storage.postgres import PgBinaries, ServiceUser, find_binaries, resolve_service_user


@pytest.fixture(scope="session")
def pg() -> PgBinaries:
    return find_binaries()


@pytest.fixture(scope="session")
def service_user() -> ServiceUser:
    return resolve_service_user(os.environ.get("LAKELET_COMPUTE_USER"))


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block, each variable put back as it was after
    (for clients that read the standard AWS settings from the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """An empty directory under /tmp that the service user can traverse; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(service_user: ServiceUser) -> Iterator[Path]:
    with scratch_dir("lakelet-test-") as path:
        yield path


@pytest.fixture(scope="module")
def root(request: pytest.FixtureRequest, service_user: ServiceUser) -> Iterator[Path]:
    """One scratch directory per test module (stores and computes are slow to set up)."""
    with scratch_dir(f"lakelet-{request.module.__name__.rsplit('.', 1)[-1]}-") as path:
        yield path


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def poll_until(predicate: Callable[[], object], what: str, *, timeout: float, every: float) -> None:
    """Poll ``predicate`` every ``every`` seconds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"{what} did not happen in {timeout:.0f}s")
