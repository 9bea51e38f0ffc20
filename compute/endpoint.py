"""One branch's endpoint: the state machine around its compute.

    suspended → starting → active → suspending → suspended        (failed: a start gave up)

``ensure_ready`` is single flight: however many sessions ask at once, one start runs and every
caller gets its result. A compute that dies is noticed at once (we wait on its process) and the
endpoint falls back to ``suspended``; the next session wakes a fresh compute from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from compute import sizes
from compute.actuator import CgroupLimits, apply_size
from compute.autoscaler import Decision, PolicyConfig, PolicyState, Sample, decide
from compute.metrics import ComputeMetrics
from compute.node import ComputeNode
from compute.signals import ComputeSampler, LoadSignals
from storage import BranchNotFound, Store
from storage.postgres import PgBinaries, ServiceUser

log = logging.getLogger("lakelet.compute")
scale_log = logging.getLogger("lakelet.autoscaler")

START_ATTEMPTS = 3
ROLE_SYNC_EVERY = 5.0


class WakeError(Exception):
    """The branch's compute could not be started; the message says why (Postgres' own words)."""


class ComputeConfigError(ValueError):
    """An endpoint setting out of range; the message names it and the allowed values."""


@dataclass
class EndpointConfig:
    suspend_timeout: float = 300.0
    min_cu: float = 0.25
    max_cu: float = 2.0
    durability: str = "store"
    up_after: int = 3
    down_after: int = 30

    def __post_init__(self) -> None:
        if self.suspend_timeout < 1:
            raise ComputeConfigError(f"suspend_timeout = {self.suspend_timeout}: must be at least 1 second")
        for name in ("min_cu", "max_cu"):
            try:
                setattr(self, name, sizes.validate_cu(getattr(self, name)))
            except sizes.SizeError as e:
                raise ComputeConfigError(f"{name}: {e}") from None
        if self.min_cu > self.max_cu:
            raise ComputeConfigError(f"min_cu = {self.min_cu} is above max_cu = {self.max_cu}: "
                                     "lower min_cu or raise max_cu")
        if self.durability not in ("store", "local"):
            raise ComputeConfigError(f"durability = {self.durability!r}: use 'store' or 'local'")
        if self.up_after < 1 or self.down_after < 1:
            raise ComputeConfigError("up_after and down_after count samples: use whole numbers of at least 1")

    def policy(self) -> PolicyConfig:
        return PolicyConfig(min_cu=self.min_cu, max_cu=self.max_cu, up_after=self.up_after,
                            down_after=self.down_after)


@dataclass
class Context:
    """What every endpoint shares: the store, where computes live, and who runs them."""

    store: Store
    computes_dir: Path
    user: ServiceUser
    pg: PgBinaries
    metrics: ComputeMetrics
    cgroups: CgroupLimits | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Endpoint:
    def __init__(self, ctx: Context, branch: str, config: EndpointConfig) -> None:
        self.ctx = ctx
        self.branch = branch
        self.config = config
        self.state = "suspended"
        self.reason: str | None = None
        self.node: ComputeNode | None = None
        self.cu = config.min_cu
        self.signals = LoadSignals()
        self.last_sample: Sample | None = None
        self._policy = PolicyState(self.cu)
        self._sampler = ComputeSampler()
        self._wake: asyncio.Task[ComputeNode] | None = None
        self._suspending: asyncio.Task[None] | None = None
        self._active_since = 0.0
        self._roles_synced = 0.0
        self._set_state("suspended")
        ctx.metrics.cu.labels(branch).set(0)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state = state
        self.reason = reason
        self.ctx.metrics.set_state(self.branch, state)

    # -- wake -----------------------------------------------------------------------------------

    async def ensure_ready(self) -> ComputeNode:
        while True:
            node = self.node
            if self.state == "active" and node is not None:
                if node.alive():
                    return node
                await self._lost(node, await node.wait_exit())  # exited: returns at once
                continue
            if self._suspending is not None:
                # A session arriving mid-suspend waits for the clean stop, then wakes a fresh compute.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._suspending)
                continue
            if self._wake is None:
                self._wake = asyncio.create_task(self._start(), name=f"wake-{self.branch}")
                self._wake.add_done_callback(self._wake_done)
            return await asyncio.shield(self._wake)

    def _wake_done(self, task: asyncio.Task[ComputeNode]) -> None:
        self._wake = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already

    async def _start(self) -> ComputeNode:
        started = time.monotonic()
        self._set_state("starting")
        self.cu = self.config.min_cu
        self._policy = PolicyState(self.cu)
        delay = 0.5
        last_error = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            node = ComputeNode(self.ctx.store, self.branch, computes_dir=self.ctx.computes_dir, user=self.ctx.user,
                               pg=self.ctx.pg, settings=sizes.settings_for(self.cu),
                               durability=self.config.durability)
            try:
                await node.start()
            except BranchNotFound as e:
                await node.kill()
                self._set_state("suspended", str(e))
                raise WakeError(f"branch {self.branch!r} no longer exists: {e}") from None
            except Exception as e:
                last_error = str(e)
                log.warning("compute start failed", extra={"branch": self.branch, "attempt": attempt,
                                                           "error": last_error})
                await node.kill()
                if attempt < START_ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            self.node = node
            self._active_since = time.monotonic()
            self.signals.last_activity = time.monotonic()
            self._set_state("active")
            self.ctx.metrics.starts.labels(self.branch).inc()
            self.ctx.metrics.start_seconds.observe(time.monotonic() - started)
            self.ctx.metrics.cu.labels(self.branch).set(self.cu)
            self._spawn(self._watch(node))
            if self.ctx.cgroups is not None:
                self.ctx.cgroups.apply(self.branch, self.cu, node.process_ids())
            # Off the wake path: the proxy already knows every role that existed at suspend time.
            self._roles_synced = time.monotonic()
            self._spawn(self._sync_roles(node))
            return node
        message = f"could not start the compute for branch {self.branch!r} ({START_ATTEMPTS} attempts): {last_error}"
        self._set_state("failed", message)
        raise WakeError(message)

    async def _sync_roles(self, node: ComputeNode) -> None:
        try:
            await node.sync_roles()
        except Exception as e:
            if node.alive():
                log.warning("role sync failed", extra={"branch": self.branch, "error": str(e)})

    def _spawn(self, coro: object) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self.ctx.tasks.add(task)
        task.add_done_callback(self.ctx.tasks.discard)

    async def _watch(self, node: ComputeNode) -> None:
        """Crash detection: the postmaster is our child, so its exit is seen the moment it happens."""
        code = await node.wait_exit()
        await self._lost(node, code)

    async def _lost(self, node: ComputeNode, code: int | None) -> None:
        """The postmaster died outside a suspend (kill -9, OOM): clean up what is left of it (its WAL
        receiver) and go back to ``suspended``; acknowledged commits are in the store already."""
        if self.node is not node or self.state != "active":
            return
        self.node = None
        reason = f"compute exited unexpectedly (exit code {code})"
        log.warning(f"{reason}; the next session wakes a fresh one from the store",
                    extra={"branch": self.branch, "exit_code": code})
        self.ctx.metrics.cu.labels(self.branch).set(0)
        self._set_state("suspended", reason)
        await node.kill()
        await self._sampler.close()

    # -- suspend --------------------------------------------------------------------------------

    async def suspend(self) -> None:
        """Scale to zero now: clean shutdown (sessions get FATAL 57P01) and an image in the store."""
        if self._wake is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._wake)
        if self._suspending is None:
            if self.state != "active" or self.node is None:
                return
            # "suspending" from this instant: a session arriving now must wait, not get this node.
            self._set_state("suspending")
            self._suspending = asyncio.create_task(self._suspend(self.node), name=f"suspend-{self.branch}")
            self._suspending.add_done_callback(self._suspend_done)
        await asyncio.shield(self._suspending)

    def _suspend_done(self, task: asyncio.Task[None]) -> None:
        self._suspending = None
        if not task.cancelled():
            task.exception()

    async def _suspend(self, node: ComputeNode) -> None:
        try:
            with contextlib.suppress(Exception):
                await node.sync_roles()
            await self._sampler.close()
            await node.stop()
            log.info("compute suspended", extra={"branch": self.branch})
        except Exception as e:
            log.warning("clean suspend failed; the store recovers from WAL", extra={"branch": self.branch,
                                                                                    "error": str(e)})
            await node.kill()
        finally:
            self.node = None
            self.ctx.metrics.cu.labels(self.branch).set(0)
            self._set_state("suspended")

    # -- tick -----------------------------------------------------------------------------------

    def idle_for(self, now: float) -> float:
        if self.signals.sessions > 0:
            return 0.0
        return now - max(self.signals.last_activity, self._active_since)

    async def tick(self) -> None:
        """Once a second while active: scale to zero when idle, else sample and maybe resize."""
        node = self.node
        if self.state != "active" or node is None or not node.alive():
            return
        sample = await self._sampler.sample(node.process_ids(), node.connect, self.signals.sessions)
        self.last_sample = sample
        now = time.monotonic()
        if sample.active_backends > 0:
            # Queries from clients that bypass the proxy (the control plane, direct tools) count too.
            self.signals.last_activity = now
        if self.idle_for(now) >= self.config.suspend_timeout and self.state == "active":
            log.info("idle; scaling to zero", extra={"branch": self.branch,
                                                     "idle_seconds": round(self.idle_for(now), 1)})
            self._spawn(self.suspend())
            return
        self.ctx.metrics.cpu.labels(self.branch).inc(self._sampler.last_cpu_seconds)
        self.ctx.metrics.memory.labels(self.branch).set(sample.memory_bytes)
        decision = decide(self._policy, sample, self.config.policy())
        self._policy = decision.state
        if decision.direction != "hold":
            await self._resize(node, decision)
        if now - self._roles_synced >= ROLE_SYNC_EVERY:
            self._roles_synced = now
            await self._sync_roles(node)

    async def _resize(self, node: ComputeNode, decision: Decision) -> None:
        scale_log.info(f"scale {decision.direction} {self.cu} → {decision.cu} CU: {decision.reason}",
                       extra={"branch": self.branch})
        try:
            await apply_size(node, decision.cu, self.ctx.cgroups)
        except Exception as e:
            scale_log.warning("could not apply size", extra={"branch": self.branch, "error": str(e)})
            self._policy = PolicyState(self.cu)
            return
        self.cu = decision.cu
        self.ctx.metrics.cu.labels(self.branch).set(self.cu)
        self.ctx.metrics.decisions.labels(self.branch, decision.direction).inc()
