"""One branch's endpoint: the state machine around its compute.

    suspended → starting → active → suspending → suspended        (failed: a start gave up)

The states are ``EndpointState`` and the legal moves are ``TRANSITIONS``: ``_set_state`` refuses
any other, so a move the design did not intend fails at once instead of leaving a wrong state.

``ensure_ready`` is single flight: however many sessions ask at once, one start runs and every
caller gets its result. A compute that dies is noticed at once (we wait on its process) and the
endpoint falls back to ``suspended``; the next session wakes a fresh compute from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from compute import logical_slots, sizes
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
# With nothing to decide (the size is pinned), CPU and memory only feed the metrics: read this often
# (seconds). The CPU total is cumulative, so the counter loses nothing between readings.
METRICS_EVERY = 15.0
IMAGE_CHECK_EVERY = 30.0
BEFORE_STOP_TIMEOUT = 30.0


class EndpointState(StrEnum):
    SUSPENDED = "suspended"
    STARTING = "starting"
    ACTIVE = "active"
    SUSPENDING = "suspending"
    FAILED = "failed"  # the last start gave up after its attempts; the next wake tries again


S = EndpointState
TRANSITIONS: dict[EndpointState, frozenset[EndpointState]] = {
    S.SUSPENDED: frozenset({S.STARTING}),
    S.FAILED: frozenset({S.STARTING}),
    # ready; gave up; the branch was deleted under the start
    S.STARTING: frozenset({S.ACTIVE, S.FAILED, S.SUSPENDED}),
    # a clean stop begins; the compute died (crash watch)
    S.ACTIVE: frozenset({S.SUSPENDING, S.SUSPENDED}),
    S.SUSPENDING: frozenset({S.SUSPENDED}),
}


class IllegalTransition(RuntimeError):
    """A state change the endpoint's table does not allow (a bug, never a user error)."""


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
    # How often (seconds) an active compute's branch is checked for enough WAL since its last
    # image to take a background one (the amount is the store's ``image_wal_threshold``).
    image_check_every: float = IMAGE_CHECK_EVERY

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
        if self.image_check_every <= 0:
            raise ComputeConfigError(f"image_check_every = {self.image_check_every}: must be above 0 seconds")

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
    # Called (branch, node) before a compute is stopped cleanly, e.g. so lakehouse sync drains
    # the compute's WAL first; each bounded by BEFORE_STOP_TIMEOUT, failures only logged.
    before_stop: list[Callable[[str, ComputeNode], Awaitable[None]]] = field(default_factory=list)
    # Branches whose computes start with wal_level = logical (a lakehouse sync is enabled there).
    logical_branches: set[str] = field(default_factory=set)
    # Called (branch, new state) on every state change, synchronously: rooms that cache a
    # compute's address (the Data API's workers) drop it the moment it stops being the live one.
    state_changed: list[Callable[[str, EndpointState], None]] = field(default_factory=list)


class Endpoint:
    def __init__(self, ctx: Context, branch: str, config: EndpointConfig, signals: LoadSignals | None = None) -> None:
        self.ctx = ctx
        self.branch = branch
        self.config = config
        self.state = EndpointState.SUSPENDED
        self.reason: str | None = None
        self.node: ComputeNode | None = None
        self.cu = config.min_cu
        # Owned by the control plane when it made this endpoint: they outlive it.
        self.signals = signals if signals is not None else LoadSignals()
        self.last_sample: Sample | None = None
        self._policy = PolicyState(self.cu)
        self._sampler = ComputeSampler()
        self._wake: asyncio.Task[ComputeNode] | None = None
        self._suspending: asyncio.Task[None] | None = None
        self._active_since = 0.0
        self._roles_synced = 0.0
        self._next_start_cu = config.min_cu
        self._image_job: asyncio.Task[None] | None = None
        self._image_checked = 0.0
        self._metrics_at = 0.0
        ctx.metrics.set_state(branch, self.state)
        ctx.metrics.cu.labels(branch).set(0)

    def _set_state(self, state: EndpointState, reason: str | None = None) -> None:
        if state not in TRANSITIONS.get(self.state, frozenset()):
            raise IllegalTransition(f"endpoint {self.branch!r}: {self.state} → {state} is not a legal move")
        self.state = state
        self.reason = reason
        self.ctx.metrics.set_state(self.branch, state)
        for listener in self.ctx.state_changed:
            try:
                listener(self.branch, state)
            except Exception:
                log.exception("a state-change listener failed", extra={"branch": self.branch})

    # -- wake -----------------------------------------------------------------------------------

    async def ensure_ready(self) -> ComputeNode:
        while True:
            node = self.node
            if self.state == S.ACTIVE and node is not None:
                if node.alive():
                    return node
                await self._lost(node, await node.wait_exit())  # exited: returns at once
                continue
            suspending = self._suspending
            if suspending is not None:
                # A session arriving mid-suspend waits for the clean stop, then wakes a fresh compute.
                with contextlib.suppress(Exception):
                    await asyncio.shield(suspending)
                # Awaiting a finished task does not yield: its done callback may not have run yet,
                # and looping on it would spin the event loop forever.
                if self._suspending is suspending:
                    self._suspending = None
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
        self._set_state(S.STARTING)
        # After an idle suspend the next session starts small; after a crash it starts at the size
        # the load had reached (so the restart-only settings of that size finally apply).
        self.cu = max(self.config.min_cu, min(self.config.max_cu, self._next_start_cu))
        self._policy = PolicyState(self.cu)
        self._sampler = ComputeSampler()
        delay = 0.5
        last_error = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            settings = sizes.settings_for(self.cu)
            if self.branch in self.ctx.logical_branches:
                settings.update(logical_slots.SETTINGS)
            node = ComputeNode(self.ctx.store, self.branch, computes_dir=self.ctx.computes_dir, user=self.ctx.user,
                               pg=self.ctx.pg, settings=settings,
                               durability=self.config.durability)
            try:
                await node.start()
            except BranchNotFound as e:
                await node.kill()
                self._set_state(S.SUSPENDED, str(e))
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
            self._image_checked = self._active_since
            self.signals.last_activity = time.monotonic()
            self._set_state(S.ACTIVE)
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
        self._set_state(S.FAILED, message)
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
        if self.node is not node or self.state != S.ACTIVE:
            return
        self.node = None
        self._next_start_cu = self.cu
        reason = f"compute exited unexpectedly (exit code {code})"
        log.warning(f"{reason}; the next session wakes a fresh one from the store",
                    extra={"branch": self.branch, "exit_code": code})
        self.ctx.metrics.cu.labels(self.branch).set(0)
        self._set_state(S.SUSPENDED, reason)
        await node.kill()

    # -- suspend --------------------------------------------------------------------------------

    async def suspend(self) -> None:
        """Scale to zero now: clean shutdown (sessions get FATAL 57P01) and an image in the store."""
        if self._wake is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._wake)
        if self._suspending is None:
            if self.state != S.ACTIVE or self.node is None:
                return
            # "suspending" from this instant: a session arriving now must wait, not get this node.
            self._set_state(S.SUSPENDING)
            self._suspending = asyncio.create_task(self._suspend(self.node), name=f"suspend-{self.branch}")
            self._suspending.add_done_callback(self._suspend_done)
        await asyncio.shield(self._suspending)

    def _suspend_done(self, task: asyncio.Task[None]) -> None:
        if self._suspending is task:
            self._suspending = None
        if not task.cancelled():
            task.exception()

    async def _suspend(self, node: ComputeNode) -> None:
        try:
            with contextlib.suppress(Exception):
                await node.sync_roles()
            # A background image in flight finishes first: the copy must not race the shutdown,
            # and the clean image must be the branch's newest.
            await self.image_job_done()
            for hook in self.ctx.before_stop:
                try:
                    await asyncio.wait_for(hook(self.branch, node), BEFORE_STOP_TIMEOUT)
                except Exception as e:
                    log.warning("before-stop hook failed", extra={"branch": self.branch, "error": repr(e)})
            await node.stop()
            log.info("compute suspended", extra={"branch": self.branch})
        except Exception as e:
            log.warning("clean suspend failed; the store recovers from WAL", extra={"branch": self.branch,
                                                                                    "error": str(e)})
            await node.kill()
        finally:
            self.node = None
            self._next_start_cu = self.config.min_cu
            self.ctx.metrics.cu.labels(self.branch).set(0)
            self._set_state(S.SUSPENDED)

    # -- background images ----------------------------------------------------------------------

    def maybe_background_image(self, now: float) -> None:
        """Every ``image_check_every`` seconds while active, start a background job that images the
        branch if it streamed enough WAL since its last image: otherwise a compute that runs for
        days leaves all of it for GC to keep and for a crash recovery to replay. One job per
        branch at a time; the compute serves on meanwhile."""
        node = self.node
        if self.state != S.ACTIVE or node is None or self._image_job is not None:
            return
        if now - self._image_checked < self.config.image_check_every:
            return
        self._image_checked = now
        self._image_job = asyncio.create_task(self._background_image(node), name=f"image-{self.branch}")
        self._image_job.add_done_callback(self._image_job_finished)

    def _image_job_finished(self, task: asyncio.Task[None]) -> None:
        self._image_job = None
        if not task.cancelled():
            task.exception()  # _background_image handles its own errors; this only marks it seen

    async def image_job_done(self) -> None:
        """Wait for the background image job in flight, if any (whatever its outcome)."""
        job = self._image_job
        if job is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(job)

    async def _background_image(self, node: ComputeNode) -> None:
        store = self.ctx.store
        try:
            if not await asyncio.to_thread(store.needs_image, self.branch):
                return
            if self.state != S.ACTIVE or self.node is not node or node.stopping:
                return  # suspending: the clean image at shutdown covers it
            started = time.monotonic()
            image = await asyncio.to_thread(store.take_online_image, self.branch, host=str(node.socket_dir),
                                            port=node.port, add_files=functools.partial(
                                                logical_slots.copy_live, node.datadir, user=self.ctx.user))
        except Exception as e:
            self.ctx.metrics.background_images.labels(self.branch, "error").inc()
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            log.warning(f"background image failed: {reason}", extra={"branch": self.branch})
            return
        self.ctx.metrics.background_images.labels(self.branch, "ok").inc()
        log.info("background image stored", extra={"branch": self.branch, "image_id": image.id,
                                                   "seconds": round(time.monotonic() - started, 3)})

    # -- tick -----------------------------------------------------------------------------------

    def idle_for(self, now: float) -> float:
        if self.signals.sessions > 0:
            return 0.0
        return now - max(self.signals.last_activity, self._active_since)

    async def tick(self) -> None:
        """Once a second while active: scale to zero when idle, else sample and maybe resize.

        A tick reads only what a decision needs now: CPU and active backends when the size can
        change (1 s samples, as the policy counts them); with the size pinned, active backends
        only while no proxied session holds the compute (direct clients keep it awake, and only
        then could it be idle), and CPU and memory every ``METRICS_EVERY`` seconds for the metrics.
        """
        node = self.node
        if self.state != S.ACTIVE or node is None or not node.alive() or node.pid is None:
            return
        now = time.monotonic()
        policy = self.config.policy()
        decides = policy.min_cu < policy.max_cu or not policy.min_cu <= self.cu <= policy.max_cu
        metrics_due = now - self._metrics_at >= METRICS_EVERY
        read_cpu = decides or metrics_due
        read_pg = decides or metrics_due or self.signals.sessions == 0
        if read_cpu:
            self._metrics_at = now
        sample = await self._sampler.sample(node.pid, node.counts, self.signals.sessions, self.signals.waiting,
                                            cpu=read_cpu, pg=read_pg)
        if self.state != S.ACTIVE or self.node is not node:
            return  # suspended or lost while we were reading it
        self.last_sample = sample
        now = time.monotonic()
        if read_pg and sample.active_backends > 0:
            # Queries from clients that bypass the proxy (the control plane, direct tools) count too.
            self.signals.last_activity = now
        if self.idle_for(now) >= self.config.suspend_timeout and self.state == S.ACTIVE:
            log.info("idle; scaling to zero", extra={"branch": self.branch,
                                                     "idle_seconds": round(self.idle_for(now), 1)})
            self._spawn(self.suspend())
            return
        if read_cpu:
            self.ctx.metrics.cpu.labels(self.branch).inc(self._sampler.last_cpu_seconds)
            self.ctx.metrics.memory.labels(self.branch).set(sample.memory_bytes)
        if decides:
            decision = decide(self._policy, sample, policy)
            self._policy = decision.state
            if decision.direction != "hold":
                await self._resize(node, decision)
        self.maybe_background_image(now)
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
