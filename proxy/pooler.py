"""Transaction pooling: many clients of a branch over a few backends, PgBouncer's transaction mode.

A connection chooses its mode with ``options=endpoint=NAME pool=transaction`` or a ``-pooler``
suffix on the first label of the TLS server name (``main-pooler.example.com``, as Neon does);
``pool_mode`` in the config sets the default, and session mode stays the default of the defaults.

Pools are per (branch, role, database). Each holds at most ``pool_size`` backends — by default half
of what the compute's ``max_connections`` leaves after ``RESERVED`` slots (superuser, the control
plane's sampler), so session-mode clients keep the other half. A client holds a backend from its
first message that needs one until ReadyForQuery ``I`` with nothing outstanding; clients beyond
the pool wait in line, and after ``pool_timeout`` get FATAL 53300, never a hang.

The compute counts only pooled clients holding or waiting for a backend as sessions (scale to zero
and the autoscaler read ``LoadSignals``), so idle pooled clients let it suspend: its backends go
with it, the clients stay connected, and their next transaction wakes it (one start, however many
ask). Idle backends also close after ``server_idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from time import monotonic
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from compute import ComputeAddress, LoadSignals
from proxy import codec
from proxy.cancel import cancel_backend
from proxy.connect import open_session
from proxy.errors import ConnectError, HandshakeError, PoolTimeout, SessionError
from proxy.pipe import Side
from proxy.pooled_client import PooledClient
from proxy.pooled_server import PooledServer, Waiter, taken
from proxy.statements import Settings, StatementNames, apply_sql, parse_options, startup_settings

log = logging.getLogger("lakelet.proxy")

MODES = ("session", "transaction")
RESERVED = 10  # connections left to superusers and the control plane on every compute
DEFAULT_MAX_CONNECTIONS = 100  # until the compute has told us its own
JANITOR_EVERY = 0.25  # pool_timeout is kept to within this
GREETINGS_PER_POOL = 64
INTERNED = 1024  # distinct settings per pool kept as one object each (Pool.intern)


@dataclass
class PoolConfig:
    mode: str = "session"  # for connections that do not choose
    size: int = 0  # backends per (branch, role, database); 0: from the compute's max_connections
    branch_size: int = 0  # backends per branch, all its pools together; 0: from the compute's max_connections
    timeout: float = 30.0  # pool_timeout: how long a client waits for a backend
    max_prepared: int = 200  # prepared statements kept per backend (LRU)
    server_idle_timeout: float = 60.0  # an idle backend closes after this
    idle_transaction_timeout: float = 0.0  # >0: Postgres ends a transaction left idle this long

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pool_mode = {self.mode!r}: use 'session' or 'transaction'")
        if self.size < 0 or self.branch_size < 0 or self.timeout <= 0:
            raise ValueError("pool_size and pool_branch_size must be 0 (from the compute size) or more, "
                             "pool_timeout above 0")


# -- mode selection ---------------------------------------------------------------------------------------


def _take_pool_option(options: str) -> tuple[str | None, str]:
    """``pool=MODE`` (also ``--pool=MODE``, ``-c pool=MODE``) out of ``options``: it and the rest."""
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError:
        words = options.split()
    found = None
    keep: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-c", "--c") and i + 1 < len(words) and words[i + 1].startswith("pool="):
            found = words[i + 1][5:]
            i += 2
            continue
        for prefix in ("pool=", "--pool=", "-cpool="):
            if w.startswith(prefix):
                found = w[len(prefix):]
                break
        else:
            keep.append(w.replace("\x00", "\\ "))
        i += 1
    return found, " ".join(keep)


def select_mode(params: dict[str, str], sni: str | None, default: str) -> tuple[str, str | None]:
    """The session's pooling mode and the server name to route by: ``pool=`` in options wins,
    then a ``-pooler`` suffix on the server name's first label (taken off it), then ``default``.
    ``pool=`` is taken out of ``params`` (Postgres does not know it)."""
    mode = default
    if sni:
        label, dot, rest = sni.partition(".")
        if dot and label.endswith("-pooler") and len(label) > 7:
            sni = label[:-7] + "." + rest
            mode = "transaction"
    options = params.get("options")
    if options and "pool" in options:
        found, rest = _take_pool_option(options)
        if found is not None:
            if found not in MODES:
                raise HandshakeError(f"pool={found} is not a pooling mode", "22023",
                                     hint="use pool=transaction or pool=session in options")
            mode = found
            if rest:
                params["options"] = rest
            else:
                del params["options"]
    return mode, sni


# -- who waits for a backend ----------------------------------------------------------------------------


class _FutureWaiter(Waiter):
    """The pooler waiting for a backend itself (a new client's greeting)."""

    __slots__ = ("future", "pool")

    def __init__(self, settings: Settings, future: asyncio.Future[PooledServer], pool: Pool) -> None:
        super().__init__(settings)
        self.future = future
        self.pool = pool

    def granted(self, server: PooledServer) -> None:
        if self.closed:
            self.pool.release(server)
        else:
            self.future.set_result(server)

    def refused(self, error: SessionError) -> None:
        if not self.closed:
            self.future.set_exception(error)

    def give_up(self) -> None:
        self.closed = True
        if self.queued:
            self.pool.left_line(self)
        if self.future.done() and not self.future.cancelled() and self.future.exception() is None:
            self.pool.release(self.future.result())


class Line:
    """The waiters of a pool in arrival order: a list read from ``head`` (as ``Expect``), so that
    joining and leaving are list primitives when compiled. A waiter that left stays in it, with
    ``queued`` False, and is skipped when its turn comes."""

    __slots__ = ("items", "head")

    def __init__(self) -> None:
        self.items: list[Waiter] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def __bool__(self) -> bool:
        return self.head < len(self.items)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self.items[self.head:])

    def first(self) -> Waiter:
        return self.items[self.head]

    def append(self, w: Waiter) -> None:
        self.items.append(w)

    def popleft(self) -> Waiter:
        items = self.items
        head = self.head
        if head >= len(items):
            raise IndexError("pop from an empty Line")
        w = items[head]
        self.head = taken(items, head)
        return w


# -- one pool --------------------------------------------------------------------------------------------

_IDLE: Final = 0  # where a backend is (PooledServer.where)
_IN_USE: Final = 1
_GONE: Final = 2


class Pool:
    """The backends of one (branch, role, database), and the clients waiting for them."""

    def __init__(self, pooler: Pooler, branch: str, role: str, database: str) -> None:
        self.pooler = pooler
        self.branch = branch
        self.role = role
        self.database = database
        self.idle: list[PooledServer] = []
        self.opened = 0  # open or opening
        self.in_use = 0
        self.waiters = Line()
        self.greetings: dict[Settings, bytes] = {}
        self._interned: dict[Settings, Settings] = {}
        self._greeting: dict[Settings, asyncio.Future[bytes]] = {}
        # A running query of a client that disconnected stops within a second, as it would for
        # a client of Postgres itself (the backend checks its socket while it works).
        self.params = {"user": role, "database": database, "client_connection_check_interval": "1000"}
        timeout = pooler.config.idle_transaction_timeout
        if timeout > 0:
            self.params["idle_in_transaction_session_timeout"] = str(int(timeout * 1000))
        self.signals = pooler.signals(branch)
        self.clients = 0  # connected
        self.active = 0  # holding or waiting for a backend
        self.waiting = 0
        # What of ``active`` and ``waiting`` is in the branch's LoadSignals (``report``).
        self.counted_active = 0
        self.counted_waiting = 0
        self.servers: set[PooledServer] = set()  # open ones; each knows its state (``where``)
        self.wait_seconds = WaitTimes()

    @property
    def size(self) -> int:
        return self.pooler.size_for(self.branch)

    def intern(self, settings: Settings) -> Settings:
        """One object for equal settings, so that matching a client to a backend is mostly an
        identity check: comparing two equal tuples element by element, of clients whose objects
        are cold in the cache, cost ~0.4 µs per transaction under load (at most ``INTERNED``
        kept; past that, new ones compare by value, as before)."""
        found = self._interned.get(settings)
        if found is not None:
            return found
        if len(self._interned) < INTERNED:
            self._interned[settings] = settings
        return settings

    # -- counts the compute sees -------------------------------------------------------------------

    # A pooled client is a session of the compute while it holds or waits for a backend, and a
    # waiting one is load the compute cannot serve yet. Under load both change twice per
    # transaction, so the branch's LoadSignals get them when it matters and not on every change:
    # at once when the pool goes from none to some and back (scale to zero never sees an idle
    # compute while one is counted here, and its idle time starts when the last one ends), else
    # within ``JANITOR_EVERY`` (the autoscaler samples once a second).

    def activate(self) -> None:
        self.active += 1
        if self.active == 1:
            self.report()

    def deactivate(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.report()

    def report(self) -> None:
        """Bring the branch's LoadSignals up to date with this pool's counts."""
        s = self.signals
        if self.counted_active != self.active:
            s.sessions += self.active - self.counted_active
            self.counted_active = self.active
            if self.active == 0:
                s.last_activity = time.monotonic()
        if self.counted_waiting != self.waiting:
            s.waiting += self.waiting - self.counted_waiting
            self.counted_waiting = self.waiting

    def client_left(self, client: PooledClient) -> None:
        self.clients -= 1
        self.pooler.forget_client(client)

    # -- lending ------------------------------------------------------------------------------------

    def take_idle(self, settings: Settings) -> PooledServer | None:
        """The most recently used idle backend that already has ``settings``, if one is near the top."""
        idle = self.idle
        if idle:
            server = idle[-1]
            applied = server.applied
            if (applied is settings or applied == settings) and not server.closed and not server.buf:  # usually
                idle.pop()
                server.where = _IN_USE
                self.in_use += 1
                return server
        i = len(idle) - 1
        stop = max(-1, i - 8)
        while i > stop:
            server = idle[i]
            applied = server.applied
            if (applied is settings or applied == settings) and not server.closed and not server.buf:
                del idle[i]
                server.where = _IN_USE
                self.in_use += 1
                return server
            i -= 1
        return None

    def _take_any(self) -> PooledServer | None:
        while self.idle:
            server = self.idle.pop()
            if server.buf:  # it spoke while idle (a FATAL as its compute stops): not lent
                server.where = _IN_USE
                self.in_use += 1
                server.close()
                continue
            if not server.closed:
                server.where = _IN_USE
                self.in_use += 1
                return server
        return None

    def request(self, w: Waiter) -> None:
        """``w`` needs a backend and no idle one has its settings: adapt an idle one or open a new
        one (in a task), else wait in line; ``w.granted(server)`` or ``w.refused(error)`` follows."""
        if self.idle:
            self.pooler.spawn(self._provide(w))
            return
        if self._may_open():
            self._count_open(1)
            self.pooler.spawn(self._provide(w, reserved=True))
            return
        w.queued = True
        w.wait_since = monotonic()
        self.waiting += 1
        if self.waiting == 1:
            self.report()
        self.waiters.append(w)

    def left_line(self, w: Waiter) -> None:
        """``w`` is out of the line (served, refused or gone); a gone one stays in the line, skipped."""
        w.queued = False
        self.waiting -= 1
        if self.waiting == 0:
            self.report()

    async def _provide(self, w: Waiter, reserved: bool = False) -> None:
        """An idle backend for ``w``, or a new one (``reserved``: its room is already counted)."""
        server = None if reserved else self._take_any()
        if server is None:
            if not reserved:
                if not self._may_open():  # others took the room meanwhile
                    self.request(w)
                    return
                self._count_open(1)
            try:
                server = await self._open()
            except asyncio.CancelledError:
                self._count_open(-1)
                raise
            except SessionError as e:
                self._count_open(-1)
                self.pooler.room_freed(self.branch)
                w.refused(e)
                return
            except (ConnectionError, OSError) as e:
                self._count_open(-1)
                self.pooler.room_freed(self.branch)
                w.refused(ConnectError(f"could not open a backend for the pool: {e}"))
                return
            server.where = _IN_USE
            self.servers.add(server)
            self.in_use += 1
        await self._adapt(server, w)

    async def _adapt(self, server: PooledServer, w: Waiter) -> None:
        """Give ``server`` to ``w``, with ``w``'s settings applied first if it had others."""
        if server.applied != w.settings:
            try:
                error = await server.run_hidden(apply_sql(w.settings))
            except ConnectionError:  # it closed meanwhile (lost() did the counts): start over
                self.request(w)
                return
            if error is not None:
                server.applied = None
                self.release(server)
                w.refused(SessionError(error.message, error.code, hint=error.hint))
                return
            server.applied = w.settings
        if w.closed:
            self.release(server)
        else:
            w.granted(server)

    async def acquire(self, settings: Settings) -> PooledServer:
        """A backend with ``settings``, for the pooler's own use (a new client's greeting)."""
        server = self.take_idle(settings)
        if server is not None:
            return server
        w = _FutureWaiter(settings, asyncio.get_running_loop().create_future(), self)
        self.request(w)
        try:
            return await asyncio.shield(w.future)
        except asyncio.CancelledError:
            w.give_up()
            raise

    def expire(self, now: float) -> None:
        """Refuse those who waited past pool_timeout (the line is in arrival order)."""
        limit = now - self.pooler.config.timeout
        waiters = self.waiters
        while waiters and (not waiters.first().queued or waiters.first().wait_since < limit):
            w = waiters.popleft()
            if not w.queued:
                continue
            self.left_line(w)
            self.wait_seconds.observe(now - w.wait_since)
            w.refused(PoolTimeout(
                f'no backend of branch "{self.branch}" became free within pool_timeout '
                f"({self.pooler.config.timeout:g}s): all {self.size} are in transactions",
                hint="make transactions shorter, raise pool_size or pool_timeout, or connect fewer clients"))

    def _next_in_line(self) -> Waiter | None:
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if w.queued:
                self.left_line(w)
                self.wait_seconds.observe(monotonic() - w.wait_since)
                return w
        return None

    def _count_open(self, n: int) -> None:
        self.opened += n
        self.pooler.branch_opened[self.branch] += n

    def _may_open(self) -> bool:
        """Room for one more backend: in this pool, and in the branch's cap across its pools (made
        by closing an idle backend of another pool of the branch if need be)."""
        if self.opened >= self.size:
            return False
        pooler = self.pooler
        cap = pooler.branch_cap(self.branch)
        while pooler.branch_opened[self.branch] >= cap:
            if not pooler.evict_idle(self):
                return False
        return True

    def starved(self) -> bool:
        """Clients wait here, and only the branch's cap keeps it from opening a backend for them."""
        return self.waiting > 0 and self.opened < self.size

    def open_for_next(self) -> bool:
        """Room came free in the branch: the next in line here opens a backend (False: none waits)."""
        if self.waiters and self.opened < self.size:
            w = self._next_in_line()
            if w is not None:
                self._count_open(1)
                self.pooler.spawn(self._provide(w, reserved=True))
                return True
        return False

    def evict(self, server: PooledServer) -> None:
        """Close an idle backend to give its room to another pool of the branch: counted out now,
        so the room is there at once (Postgres frees the slot as the backend exits)."""
        with contextlib.suppress(ValueError):
            self.idle.remove(server)
        server.where = _GONE
        self.servers.discard(server)
        self._count_open(-1)
        server.close()

    def release(self, server: PooledServer) -> None:
        """Back from a client at the end of a transaction: to the next in line, or idle."""
        if server.where != _IN_USE:
            return
        if server.cancelling:
            server.held = True  # a cancel for its last client is in flight: not lent before it lands
            return
        if server.closed or server.broken or server.expect or server.transport.is_closing():
            server.close()
            return
        server.client = None
        if self.waiters:
            w = self._next_in_line()
            if w is not None:
                applied, wanted = server.applied, w.settings
                if applied is wanted or applied == wanted:  # interned: identity, mostly
                    w.granted(server)
                else:
                    self.pooler.spawn(self._adapt(server, w))
                return
        server.where = _IDLE
        self.in_use -= 1
        pooler = self.pooler
        if pooler.branch_opened[self.branch] >= pooler.branch_cap(self.branch) and pooler.starved(self.branch):
            self.evict(server)  # another pool of the branch waits for room: it is theirs
            pooler.room_freed(self.branch)
            return
        server.idle_since = time.monotonic()
        self.idle.append(server)

    def abandon(self, server: PooledServer) -> None:
        """Its client left mid-transaction or mid-query: the backend closes, as when a client of
        Postgres disconnects — an open transaction rolls back, and a running query stops at its
        next check of the connection (``client_connection_check_interval``). Never lent on.
        Aborted, not closed: what is still buffered for it (the rest of a COPY) is not wanted, and
        a backend blocked in ``COPY … FROM STDIN`` ends at once on the reset."""
        if not server.closed:
            server.transport.abort()

    def lost(self, server: PooledServer) -> None:
        """A backend's connection closed (by us, its compute stopping, or an error)."""
        where = server.where
        server.where = _GONE
        self.servers.discard(server)
        if where == _IDLE:
            with contextlib.suppress(ValueError):
                self.idle.remove(server)
        elif where == _IN_USE:
            self.in_use -= 1
        if where != _GONE:
            self._count_open(-1)
            self.pooler.room_freed(self.branch)

    async def _open(self) -> PooledServer:
        compute = await self.pooler.wake(self.branch)
        session = await open_session(compute, self.params, self.branch)
        transport = session.side.transport
        assert transport is not None
        server = PooledServer(self, transport, session.key, session.greeting, compute.pid,
                              self.pooler.config.max_prepared)
        transport.set_protocol(server)  # type: ignore[arg-type]  # a protocol by its methods
        if session.side.buf:
            server.buf += session.side.buf
        transport.resume_reading()
        self.pooler.compute_pid[self.branch] = compute.pid
        if compute.pid not in self.pooler.max_connections:
            error = await server.run_hidden(b"SHOW max_connections")
            if error is None and server.last_rows:
                row = server.last_rows[0]
                self.pooler.max_connections[compute.pid] = int(row[6:])
        return server

    async def greeting(self, settings: Settings) -> bytes:
        """ParameterStatus for a client with ``settings``, as its own backend would have greeted it:
        from a backend of the pool after applying them once (an error there is the client's
        FATAL, as a bad startup parameter is on Postgres); then cached."""
        found = self.greetings.get(settings)
        if found is not None:
            return found
        pending = self._greeting.get(settings)
        if pending is not None:  # a burst of new clients: one backend asked, all greeted
            return await asyncio.shield(pending)
        pending = self._greeting[settings] = asyncio.get_running_loop().create_future()
        try:
            server = await self.acquire(settings)
            greeting = server.greeting()
            self.release(server)
        except BaseException as e:
            pending.set_exception(e if isinstance(e, Exception) else ConnectionResetError("proxy closing"))
            pending.exception()  # retrieved: the waiters (if any) raise it
            raise
        finally:
            del self._greeting[settings]
        if len(self.greetings) >= GREETINGS_PER_POOL:
            self.greetings.clear()
        self.greetings[settings] = greeting
        pending.set_result(greeting)
        return greeting

    def close_idle(self, older_than: float) -> None:
        for server in [s for s in self.idle if s.idle_since < older_than]:
            server.close()

    def close(self) -> None:
        for server in list(self.servers):
            server.close()
        while self.waiters:
            w = self.waiters.popleft()
            if w.queued:
                self.left_line(w)
                w.refused(SessionError("terminating connection because the proxy is shutting down", "57P01"))


# -- all pools ------------------------------------------------------------------------------------------


# Variable-length in its type: compiled, a fixed-length tuple of floats would be rebuilt at every use.
WAIT_BUCKETS: Final[tuple[float, ...]] = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0)


class WaitTimes:
    """A histogram of waits for a backend, kept as plain numbers (observed on every wait in line,
    so cheaper than a Prometheus child) and exported by the collector."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(WAIT_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        bounds = WAIT_BUCKETS
        n = len(bounds)
        i = 0
        while i < n and bounds[i] < seconds:  # bisect_left, in a few compares
            i += 1
        self.counts[i] += 1
        self.total += seconds


class _PoolCollector(Collector):
    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        size = GaugeMetricFamily("lakelet_proxy_pool_size", "Backends a pool may open",
                                 labels=["branch", "mode"])
        backends = GaugeMetricFamily("lakelet_proxy_pool_backends", "Pooled backends by state",
                                     labels=["branch", "mode", "state"])
        clients = GaugeMetricFamily("lakelet_proxy_pool_clients", "Pooled clients by state",
                                    labels=["branch", "mode", "state"])
        by_branch: dict[str, list[int]] = {}
        for pool in self.pooler.pools.values():
            b = by_branch.setdefault(pool.branch, [0, 0, 0, 0, 0, 0])
            b[0] = max(b[0], pool.size)
            b[1] += len(pool.idle)
            b[2] += pool.in_use
            b[3] += pool.waiting
            b[4] += pool.active - pool.waiting
            b[5] += pool.clients - pool.active
        for branch, signals in sorted(self.pooler.session_branches.items()):
            # Session mode has no pool: each session holds its own backend from log-in to log-out.
            # Its sessions are the branch's sessions less the pooled clients counted among them.
            sessions = signals.sessions - sum(p.counted_active for p in self.pooler.by_branch.get(branch, ()))
            backends.add_metric([branch, "session", "in_use"], sessions)
            clients.add_metric([branch, "session", "active"], sessions)
        for branch, (sz, idle, in_use, waiting, active, idle_clients) in sorted(by_branch.items()):
            size.add_metric([branch, "transaction"], sz)
            backends.add_metric([branch, "transaction", "idle"], idle)
            backends.add_metric([branch, "transaction", "in_use"], in_use)
            clients.add_metric([branch, "transaction", "waiting"], waiting)
            clients.add_metric([branch, "transaction", "active"], active)
            clients.add_metric([branch, "transaction", "idle"], idle_clients)
        yield size
        yield backends
        yield clients
        waits = HistogramMetricFamily("lakelet_proxy_pool_wait_seconds", "Time pooled clients waited for a backend",
                                      labels=["branch", "mode"])
        merged: dict[str, WaitTimes] = {}
        for pool in self.pooler.pools.values():
            m = merged.setdefault(pool.branch, WaitTimes())
            m.counts = [a + b for a, b in zip(m.counts, pool.wait_seconds.counts, strict=True)]
            m.total += pool.wait_seconds.total
        for branch, m in sorted(merged.items()):
            cumulative, running = [], 0
            for bound, count in zip((*WAIT_BUCKETS, float("inf")), m.counts, strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            waits.add_metric([branch, "transaction"], cumulative, m.total)
        yield waits


class Pooler:
    """Every pool of the proxy, the pooled clients' cancel keys, and the janitor."""

    def __init__(self, config: PoolConfig, *, wake: Callable[[str], Awaitable[ComputeAddress]],
                 signals: Callable[[str], LoadSignals], registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.wake = wake
        self.signals = signals
        self.pools: dict[tuple[str, str, str], Pool] = {}
        self.by_branch: dict[str, list[Pool]] = {}
        # The proxy's branches and their load signals (session-mode rows of the metrics), set by it.
        self.session_branches: dict[str, LoadSignals] = {}
        self.branch_opened: dict[str, int] = {}  # backends open or opening per branch, all pools
        self.names = StatementNames()
        self.max_connections: dict[int, int] = {}  # compute pid → its max_connections
        self.compute_pid: dict[str, int] = {}  # branch → the compute last opened on
        self._clients: dict[int, PooledClient] = {}  # cancel secret → client
        self._tasks: set[asyncio.Task[object]] = set()
        self._janitor: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(_PoolCollector(self))

    def size_for(self, branch: str) -> int:
        """Backends one pool of ``branch`` may hold (asked on every request that finds no idle one)."""
        size = self.config.size
        return size if size else self.branch_cap(branch)

    def branch_cap(self, branch: str) -> int:
        """Backends all pools of ``branch`` may hold together: half of what the compute's
        max_connections leaves after the reserved slots, so however many (role, database) pools
        a branch has, session-mode clients and the control plane keep their room."""
        if self.config.branch_size:
            return self.config.branch_size
        pid = self.compute_pid.get(branch)
        max_conn = self.max_connections.get(pid, DEFAULT_MAX_CONNECTIONS) if pid else DEFAULT_MAX_CONNECTIONS
        return max(1, (max_conn - RESERVED) // 2)

    def evict_idle(self, pool: Pool) -> bool:
        """Make room in ``pool``'s branch by closing an idle backend of another of its pools."""
        for other in self.by_branch[pool.branch]:
            if other is not pool and other.idle:
                other.evict(other.idle[0])  # the least recently used
                return True
        return False

    def starved(self, branch: str) -> bool:
        return any(p.starved() for p in self.by_branch[branch])

    def room_freed(self, branch: str) -> None:
        """A backend of ``branch`` closed or failed to open: pools waiting for room open one each
        while the cap allows (the pool whose client waited longest first)."""
        cap = self.branch_cap(branch)
        while self.branch_opened[branch] < cap:
            waiting = [p for p in self.by_branch[branch] if p.starved()]
            if not waiting:
                return
            oldest = min(waiting, key=lambda p: next((w.wait_since for w in p.waiters if w.queued), 0.0))
            if not oldest.open_for_next():
                return

    def pool(self, branch: str, role: str, database: str) -> Pool:
        key = (branch, role, database)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, branch, role, database)
            self.by_branch.setdefault(branch, []).append(pool)
            self.branch_opened.setdefault(branch, 0)
            if self._janitor is None:
                self._janitor = asyncio.create_task(self._sweep(), name="pool-janitor")
        return pool

    async def connect(self, side: Side, branch: str, params: dict[str, str], accepted: bytes) -> PooledClient:
        """A pooled session for an authenticated client: its greeting (written with ``accepted``,
        the end of authentication) and the protocol that serves it from now on."""
        if "replication" in params:
            raise SessionError("replication connections cannot be pooled", "0A000",
                               hint="connect without pool=transaction (session mode) for replication")
        options = parse_options(params.get("options", ""))
        if options is None:
            raise SessionError(f"options {params['options']!r} cannot be used with transaction pooling", "0A000",
                               hint="use only -c name=value options, or session mode")
        pool = self.pool(branch, params["user"], params.get("database", params["user"]))
        settings = pool.intern(startup_settings(params, options))
        greeting = await pool.greeting(settings)
        if side.closed or side.transport is None:
            raise ConnectionResetError("client closed during the greeting")
        pid, secret = self._issue()
        transport = side.transport
        client = PooledClient(pool, transport, settings, pid, secret)
        self._clients[secret] = client
        pool.clients += 1
        transport.set_protocol(client)  # type: ignore[arg-type]  # a protocol by its methods
        transport.write(accepted + greeting + codec.backend_key_data(pid, secret) + codec.ready_for_query(b"I"))
        transport.resume_reading()
        if side.buf:
            client.data_received(bytes(side.buf))
            side.buf.clear()
        return client

    def _issue(self) -> tuple[int, int]:
        """A key for a pooled client: a pid above any real one (Linux's pid_max is at most 2^22),
        so it cannot name a session-mode backend, and a fresh secret."""
        while True:
            secret = secrets.randbits(32) - (1 << 31)
            if secret not in self._clients:
                return (1 << 22) + 1 + secrets.randbelow((1 << 31) - (1 << 22) - 2), secret

    def forget_client(self, client: PooledClient) -> None:
        if self._clients.get(client.secret) is client:
            del self._clients[client.secret]

    async def cancel(self, pid: int, secret: int) -> bool:
        """A CancelRequest for a pooled client: cancel the query of the backend it holds now, and
        keep that backend from being lent to anyone else until the cancel has landed."""
        client = self._clients.get(secret)
        if client is None or client.pid != pid:
            return False
        server = client.server
        if server is None or not server.expect:
            client.cancel_waiting()  # in line: its query fails as cancelled; idle: nothing, as on Postgres
            return True
        server.cancelling += 1
        try:
            await cancel_backend(server.key)
        finally:
            server.cancelling -= 1
            if not server.cancelling and server.held:
                server.held = False
                server.pool.release(server)
        return True

    def spawn(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_EVERY)
            now = time.monotonic()
            older = now - self.config.server_idle_timeout
            for pool in list(self.pools.values()):
                pool.close_idle(older)
                pool.expire(now)
                pool.report()
            for branch in self.by_branch:
                self.room_freed(branch)

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for pool in self.pools.values():
            pool.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
