"""The compute room's one public face: ``Endpoints``.

The proxy asks it for a ready compute (``ensure_ready``), for a role's SCRAM verifier (without
waking anything), and for the per-branch ``LoadSignals`` object it keeps up to date. The shell
uses it for status, suspend and role management. A tick loop drives scale-to-zero and the
autoscaler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from compute.actuator import CgroupLimits
from compute.endpoint import ComputeConfigError, Context, Endpoint, EndpointConfig, WakeError
from compute.metrics import ComputeMetrics
from compute.node import ComputeNode
from compute.signals import LoadSignals
from storage import BranchNotFound, Store
from storage.postgres import PgBinaries, ServiceUser

log = logging.getLogger("lakelet.compute")

TICK_SECONDS = 1.0


class UnknownBranch(Exception):
    """No branch by that name."""


@dataclass(frozen=True)
class ComputeAddress:
    socket_dir: str
    port: int
    pid: int


@dataclass
class EndpointStatus:
    branch: str
    state: str
    cu: float
    pid: int | None
    host: str | None
    port: int | None
    connections: int
    reason: str | None


class Endpoints:
    def __init__(self, store: Store, *, computes_dir: Path, user: ServiceUser, pg: PgBinaries,
                 config: EndpointConfig | None = None, registry: CollectorRegistry | None = None,
                 cgroups: bool = True) -> None:
        self.store = store
        self.config = config or EndpointConfig()
        self.ctx = Context(store, computes_dir, user, pg, ComputeMetrics(registry),
                           CgroupLimits() if cgroups else None)
        self._endpoints: dict[str, Endpoint] = {}
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.ctx.computes_dir.mkdir(parents=True, exist_ok=True)
        for name in await asyncio.to_thread(self.store.branch_names):
            self._endpoint(name)
        self._ticker = asyncio.create_task(self._tick_loop(), name="compute-ticker")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await asyncio.gather(*(e.suspend() for e in self._endpoints.values()), return_exceptions=True)
        # Jobs of computes that died meanwhile: they must not outlive the store they write to.
        await asyncio.gather(*(e.image_job_done() for e in self._endpoints.values()))
        for task in list(self.ctx.tasks):
            task.cancel()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            active = [e for e in self._endpoints.values() if e.state == "active"]
            results = await asyncio.gather(*(e.tick() for e in active), return_exceptions=True)
            for endpoint, result in zip(active, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("tick failed", extra={"branch": endpoint.branch, "error": repr(result)})

    # -- lookups ----------------------------------------------------------------------------------

    def _endpoint(self, branch: str) -> Endpoint:
        endpoint = self._endpoints.get(branch)
        if endpoint is None:
            endpoint = self._endpoints[branch] = Endpoint(self.ctx, branch, self.config)
        return endpoint

    def _known(self, branch: str) -> Endpoint:
        if branch not in self._endpoints and not self.has_branch(branch):
            raise UnknownBranch(f"branch {branch!r} does not exist")
        return self._endpoint(branch)

    def has_branch(self, branch: str) -> bool:
        try:
            self.store.get_branch(branch)
        except BranchNotFound:
            return False
        return True

    def role_verifier(self, branch: str, role: str) -> str | None:
        try:
            return self.store.roles(branch).get(role)
        except BranchNotFound:
            return None

    def configure(self, branch: str, config: EndpointConfig) -> None:
        """Per-branch limits (suspend timeout, CU range); the size range applies from the next tick,
        the durability mode from the next start."""
        self._known(branch).config = config

    def on_before_stop(self, hook: Callable[[str, ComputeNode], Awaitable[None]]) -> None:
        """Run ``hook(branch, node)`` before any compute stops cleanly (lakehouse sync drains there)."""
        self.ctx.before_stop.append(hook)

    def signals(self, branch: str) -> LoadSignals:
        return self._endpoint(branch).signals

    # -- actions ----------------------------------------------------------------------------------

    async def ensure_ready(self, branch: str) -> ComputeAddress:
        node = await self.node(branch)
        assert node.pid is not None
        return ComputeAddress(str(node.socket_dir), node.port, node.pid)

    async def node(self, branch: str) -> ComputeNode:
        return await self._known(branch).ensure_ready()

    def active_node(self, branch: str) -> ComputeNode | None:
        endpoint = self._endpoints.get(branch)
        if endpoint is None or endpoint.state != "active":
            return None
        return endpoint.node

    async def suspend(self, branch: str) -> None:
        await self._known(branch).suspend()

    def forget(self, branch: str) -> None:
        """Stop tracking a deleted or renamed branch (the caller suspended it first)."""
        if self._endpoints.pop(branch, None) is not None:
            self.ctx.metrics.forget(branch)

    def status(self) -> list[EndpointStatus]:
        names = self.store.branch_names()
        for name in names:
            self._endpoint(name)
        out = []
        for name in names:
            e = self._endpoints[name]
            node = e.node if e.state in ("active", "suspending") else None
            out.append(EndpointStatus(
                branch=name, state=e.state, cu=e.cu if node else 0.0, pid=node.pid if node else None,
                host=str(node.socket_dir) if node else None, port=node.port if node else None,
                connections=e.signals.sessions, reason=e.reason))
        return out

    def endpoint(self, branch: str) -> Endpoint:
        """The endpoint object itself (for tests and benchmarks that watch its state)."""
        return self._known(branch)


__all__ = [
    "ComputeAddress", "ComputeConfigError", "EndpointConfig", "EndpointStatus", "Endpoints", "UnknownBranch",
    "WakeError",
]
