"""The control plane: branch workflows and per-branch state, in one place.

Everything that creates, wakes, suspends, resets, restores or deletes a branch calls this one
service — the HTTP API, the CLI (through the API), the proxy, the Data API, lakehouse sync,
tests and benches — so no workflow lives in a handler, and every caller gets the same order of
steps (suspend → store → forget).

It keeps what a session's path needs in memory, so routing and authentication never query the
catalog on the event loop: the branch set and every branch's role verifiers (one snapshot, swapped
whole whenever the store reports a change — by our own workflows, the periodic role sync, or anyone
else who changes the store), and each branch's ``LoadSignals``, which outlive the endpoint objects
(a reset or restore re-creates the endpoint, the proxy keeps counting into the same signals).

Endpoint states (``compute.endpoint``) and cold starts are per branch: nothing here serializes
starts of different branches (timeline IDs come from the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from compute.actuator import CgroupLimits
from compute.endpoint import (
    ComputeConfigError,
    Context,
    Endpoint,
    EndpointConfig,
    EndpointState,
    WakeError,
)
from compute.metrics import ComputeMetrics
from compute.node import ComputeNode
from compute.orphans import stop_orphans
from compute.signals import LoadSignals
from storage import Branch, BranchInfo, BranchNotFound, InvalidName, InvalidTarget, ProtectedBranch, Store
from storage.postgres import PgBinaries, ServiceUser

log = logging.getLogger("lakelet.compute")

TICK_SECONDS = 1.0
ROOT_BRANCH = "main"


class UnknownBranch(BranchNotFound):
    """No branch by that name (the control plane's answer from memory; a ``BranchNotFound``)."""


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
    # Why commits on this branch cannot become durable right now (its WAL receiver keeps failing),
    # or None when they can.
    durability_stalled: str | None = None


Roles = dict[str, str | None]


def _text(value: object, what: str, error: type[Exception]) -> str:
    """A request field that must be a string (JSON can carry anything)."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    return value


class ControlPlane:
    def __init__(self, store: Store, *, computes_dir: Path, user: ServiceUser, pg: PgBinaries,
                 config: EndpointConfig | None = None, registry: CollectorRegistry | None = None,
                 cgroups: bool = True) -> None:
        self.store = store
        self.config = config or EndpointConfig()
        self.ctx = Context(store, computes_dir, user, pg, ComputeMetrics(registry),
                           CgroupLimits() if cgroups else None)
        self._endpoints: dict[str, Endpoint] = {}
        self._signals: dict[str, LoadSignals] = {}
        self._addresses: dict[str, tuple[ComputeNode, ComputeAddress]] = {}  # per node, made once
        # branch → role → verifier; replaced whole (never mutated) so readers need no lock.
        self._roles: dict[str, Roles] = {}
        self._reload_lock = threading.Lock()
        # Workflows change the catalog and stop computes: one at a time (never on a session's path).
        self._workflows = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        store.subscribe(self._store_changed)
        self._reload(None)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Stop what a previous ``lakelet up`` that died left running, then start ticking."""
        self.ctx.computes_dir.mkdir(parents=True, exist_ok=True)
        self.ctx.user.share_dir(self.ctx.computes_dir)
        await stop_orphans(self.ctx.computes_dir, set(self._roles))
        for name in self._roles:
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
            active = [e for e in self._endpoints.values() if e.state == EndpointState.ACTIVE]
            results = await asyncio.gather(*(e.tick() for e in active), return_exceptions=True)
            for endpoint, result in zip(active, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("tick failed", extra={"branch": endpoint.branch, "error": repr(result)})

    # -- memory: the branch set and role verifiers ----------------------------------------------

    def _store_changed(self, branch: str | None) -> None:
        """The store's change callback (any thread): reload one branch's roles, or everything
        when the branch set changed."""
        self._reload(branch)

    def _reload(self, branch: str | None) -> None:
        with self._reload_lock:
            if branch is None:
                names = self.store.branch_names()
                self._roles = {name: self.store.roles(name) for name in names}
            elif branch in self._roles:
                self._roles = {**self._roles, branch: self.store.roles(branch)}

    def has_branch(self, branch: str) -> bool:
        return branch in self._roles

    def branch_names(self) -> list[str]:
        return list(self._roles)

    def role_verifier(self, branch: str, role: str) -> str | None:
        return self._roles.get(branch, {}).get(role)

    def roles(self, branch: str) -> Roles:
        self._require(branch)
        return dict(self._roles[branch])

    def _require(self, branch: str) -> None:
        if branch not in self._roles:
            known = ", ".join(self._roles) or "none"
            raise UnknownBranch(f"branch {branch!r} does not exist (branches: {known})")

    # -- endpoints --------------------------------------------------------------------------------

    def _endpoint(self, branch: str) -> Endpoint:
        endpoint = self._endpoints.get(branch)
        if endpoint is None:
            endpoint = self._endpoints[branch] = Endpoint(self.ctx, branch, self.config, self.signals(branch))
        return endpoint

    def _known(self, branch: str) -> Endpoint:
        self._require(branch)
        return self._endpoint(branch)

    def configure(self, branch: str, config: EndpointConfig) -> None:
        """Per-branch limits (suspend timeout, CU range); the size range applies from the next tick,
        the durability mode from the next start."""
        self._known(branch).config = config

    def on_before_stop(self, hook: Callable[[str, ComputeNode], Awaitable[None]]) -> None:
        """Run ``hook(branch, node)`` before any compute stops cleanly (lakehouse sync drains there)."""
        self.ctx.before_stop.append(hook)

    def on_state_change(self, listener: Callable[[str, EndpointState], None]) -> None:
        """Call ``listener(branch, state)`` on every endpoint state change, synchronously (it must
        not block): every compute change passes through a state that is not ``active``."""
        self.ctx.state_changed.append(listener)

    def require_logical(self, branch: str, on: bool = True) -> None:
        """Start the branch's computes with ``wal_level = logical`` (restart-only: from its next start)."""
        if on:
            self.ctx.logical_branches.add(branch)
        else:
            self.ctx.logical_branches.discard(branch)

    def signals(self, branch: str) -> LoadSignals:
        """The branch's load signals: one object for the branch's whole life, whatever happens to
        its endpoint, so the proxy may keep it."""
        s = self._signals.get(branch)
        if s is None:
            s = self._signals[branch] = LoadSignals()
        return s

    async def ensure_ready(self, branch: str) -> ComputeAddress:
        node = await self.node(branch)
        assert node.pid is not None
        return self._address(branch, node)

    def ready(self, branch: str) -> ComputeAddress | None:
        """The branch's compute when it is active with its postmaster alive, else None — without
        waiting: a session's common case, taken with no coroutine and no timer."""
        endpoint = self._endpoints.get(branch)
        if endpoint is None or endpoint.state != EndpointState.ACTIVE:
            return None
        node = endpoint.node
        if node is None or node.pid is None or not node.alive():
            return None
        return self._address(branch, node)

    def _address(self, branch: str, node: ComputeNode) -> ComputeAddress:
        kept = self._addresses.get(branch)
        if kept is not None and kept[0] is node and kept[1].pid == node.pid:
            return kept[1]
        assert node.pid is not None
        address = ComputeAddress(str(node.socket_dir), node.port, node.pid)
        self._addresses[branch] = (node, address)
        return address

    async def node(self, branch: str) -> ComputeNode:
        return await self._known(branch).ensure_ready()

    def active_node(self, branch: str) -> ComputeNode | None:
        endpoint = self._endpoints.get(branch)
        if endpoint is None or endpoint.state != EndpointState.ACTIVE:
            return None
        return endpoint.node

    async def suspend(self, branch: str) -> None:
        await self._known(branch).suspend()

    def status(self) -> list[EndpointStatus]:
        out = []
        for name in self._roles:
            e = self._endpoint(name)
            node = e.node if e.state in (EndpointState.ACTIVE, EndpointState.SUSPENDING) else None
            out.append(EndpointStatus(
                branch=name, state=e.state.value, cu=e.cu if node else 0.0, pid=node.pid if node else None,
                host=str(node.socket_dir) if node else None, port=node.port if node else None,
                connections=e.signals.sessions, reason=e.reason,
                durability_stalled=node.durability_stalled() if node else None))
        return out

    def stalled(self) -> dict[str, str]:
        """Branches whose commits cannot become durable now, with why (for /healthz)."""
        return {s.branch: s.durability_stalled for s in self.status() if s.durability_stalled}

    def endpoint(self, branch: str) -> Endpoint:
        """The endpoint object itself (for tests and benchmarks that watch its state)."""
        return self._known(branch)

    def forget(self, branch: str) -> None:
        """Drop the endpoint of a branch changed through the store directly (suspended first): a
        fresh one is made on next use; a deleted branch's signals and metrics go too."""
        self._forget(branch, keep_signals=self.has_branch(branch))

    def _forget(self, branch: str, *, keep_signals: bool) -> None:
        """Drop a branch's endpoint (suspended by the caller); a kept branch name gets a fresh one
        over the same signals, a deleted one loses its signals and metrics too."""
        self._endpoints.pop(branch, None)
        self._addresses.pop(branch, None)
        if not keep_signals:
            self._signals.pop(branch, None)
            self.ctx.metrics.forget(branch)

    # -- workflows --------------------------------------------------------------------------------

    async def _head_lsn(self, branch: str) -> str | None:
        """The parent's durable head when its compute runs (a restore point made durable in the
        store); None lets the store use the end of what it already holds."""
        node = self.active_node(branch)
        return await node.branch_point() if node is not None else None

    async def create_branch(self, name: object, parent: object = ROOT_BRANCH, *, at: object = None) -> Branch:
        """A new branch of ``parent`` at its head, or at ``at`` (ISO-8601 timestamp or LSN)."""
        name = _text(name, "the branch name", InvalidName)
        parent = _text(parent, "the parent branch", InvalidName)
        at = None if at in (None, "") else _text(at, "the point in time (at)", InvalidTarget)
        async with self._workflows:
            self._require(parent)
            head = None if at else await self._head_lsn(parent)
            branch = await asyncio.to_thread(self.store.create_branch, name, parent, at=at, head_lsn=head)
        log.info("branch created", extra={"branch": name, "parent": parent, "at": at or "head"})
        return branch

    async def delete_branch(self, name: str, *, force: bool = False) -> list[str]:
        """Delete ``name`` (and, with ``force``, its descendants): computes stopped, store rows and
        files gone, local compute dirs removed. Returns the deleted names."""
        async with self._workflows:
            self._require(name)
            doomed = await asyncio.to_thread(self.store.subtree, name) if force else [name]
            if name == ROOT_BRANCH:
                raise ProtectedBranch(f"branch {name!r} is the root branch and cannot be deleted")
            await asyncio.gather(*(self._known(b).suspend() for b in doomed))
            await asyncio.to_thread(self.store.delete_branch, name, force=force)
            for b in doomed:
                self._forget(b, keep_signals=False)
                await asyncio.to_thread(shutil.rmtree, self.ctx.computes_dir / b, True)
        log.info("branch deleted", extra={"branch": name, "with": doomed[1:]})
        return doomed

    async def reset_branch(self, name: str) -> Branch:
        """Re-point ``name`` at its parent's current head, dropping its own changes."""
        async with self._workflows:
            self._require(name)
            branch = await asyncio.to_thread(self.store.get_branch, name)
            if branch.parent is None:
                raise ProtectedBranch(f"branch {name!r} has no parent to reset to")
            head = await self._head_lsn(branch.parent)
            await self._known(name).suspend()
            self._forget(name, keep_signals=True)
            branch = await asyncio.to_thread(self.store.reset_branch, name, head_lsn=head)
        log.info("branch reset", extra={"branch": name, "parent_lsn": branch.parent_lsn})
        return branch

    async def restore_branch(self, name: str, at: object) -> tuple[Branch, str]:
        """``name`` as it was at ``at``; its current state stays as a backup branch (returned)."""
        if at in (None, ""):
            raise InvalidTarget("restore needs a point in time: pass --at TIMESTAMP|LSN")
        at = _text(at, "the point in time (at)", InvalidTarget)
        async with self._workflows:
            self._require(name)
            await self._known(name).suspend()
            self._forget(name, keep_signals=True)
            branch, backup = await asyncio.to_thread(self.store.restore_branch, name, at)
        log.info("branch restored", extra={"branch": name, "at": at, "backup": backup})
        return branch, backup

    async def list_branches(self) -> tuple[list[BranchInfo], int]:
        """Every branch with its sizes, and the store's bytes on disk (reads the store: not for a
        session's path)."""
        infos = await asyncio.to_thread(self.store.list_branches)
        physical = await asyncio.to_thread(self.store.physical_bytes)
        return infos, physical


# The name the rooms above have called it by; the same object.
Endpoints = ControlPlane

__all__ = [
    "ComputeAddress", "ComputeConfigError", "ControlPlane", "EndpointConfig", "EndpointStatus", "Endpoints",
    "UnknownBranch", "WakeError",
]
