"""The proxy: accept, then run each session through its stages —
handshake → auth → wake → connect → passthrough — each failing with its own error.

Sockets are accepted by hand so the first byte can be peeked: a TLS ClientHello there means a
PG17 client using direct TLS (``sslnegotiation=direct``), which is wrapped in TLS before the
protocol handler sees a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from compute import ComputeAddress, LoadSignals, UnknownBranch, WakeError
from proxy import codec, tls
from proxy.admission import PreAuthGate
from proxy.auth import FailureThrottle, authenticate
from proxy.backend import ComputeProvider
from proxy.cancel import CancelMap
from proxy.connect import ServerSession, open_session
from proxy.errors import (
    HandshakeError,
    InvalidStartupPacket,
    RoutingError,
    SessionError,
    TooManyConnections,
    WakeTimeout,
)
from proxy.handshake import Cancel, negotiate, route
from proxy.metrics import ProxyMetrics
from proxy.pipe import Side, tcp_bytes
from proxy.pooled_client import PooledClient
from proxy.pooler import PoolConfig, Pooler, select_mode
from proxy.relay import Relay
from proxy.warm import PoolKey, WarmBackend, WarmPool, pool_key

log = logging.getLogger("lakelet.proxy")

TLS_HANDSHAKE_BYTE = 0x16
OUT_OF_SLOTS_RETRIES = 5  # a closed backend frees its slot when its process exits: milliseconds


@dataclass
class ProxyConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5432
    tls_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    auth_timeout: float = 60.0
    wake_timeout: float = 30.0
    max_client_connections: int = 10000
    max_unauthenticated_per_address: int = 100
    warm_backends: int = 32  # idle, reset backends kept per branch (keyed by startup parameters); 0: none
    default_branch: str = "main"
    pool: PoolConfig = field(default_factory=PoolConfig)  # transaction pooling (proxy/pooler.py)


@dataclass(slots=True)
class _Session:
    """What a session's bookkeeping needs when it ends, however it ends."""

    branch: str = "-"
    outcome: str = "error"
    key: tuple[int, int] | None = None
    signals: LoadSignals | None = None
    address: str | None = None  # set while counted as not yet authenticated from this address
    admitted: bool = False  # counted against max_client_connections
    warm: WarmBackend | None = None  # the backend, kept warm after the client leaves if it proves clean
    pool_key: PoolKey | None = None
    client: Side | None = None  # the client's protocol, once its transport is made


class Proxy:
    def __init__(self, provider: ComputeProvider, config: ProxyConfig,
                 registry: CollectorRegistry | None = None) -> None:
        self.provider = provider
        self.config = config
        self.cancels = CancelMap()
        self.warm = WarmPool(config.warm_backends)
        self.throttle = FailureThrottle()
        self._branches: dict[str, LoadSignals] = {}
        self._relaying: dict[Side, str] = {}  # client side → branch, while relayed
        self.metrics = ProxyMetrics(registry, lambda: self._branches, self._live_bytes, self._relay_state)
        self.pooler = Pooler(config.pool, wake=self._wake, signals=self._signals, registry=registry)
        self.pooler.session_branches = self._branches
        self.material = tls.load(config.tls_dir, config.tls_cert, config.tls_key)
        self._ssl = self._direct_ssl = None
        if self.material is not None:
            self._ssl = tls.server_context(self.material)
            self._direct_ssl = tls.server_context(self.material, direct=True)
            for ctx in (self._ssl, self._direct_ssl):
                ctx.sni_callback = _remember_sni
        self.ca_file = self.material.ca_file if self.material else None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.relay: Relay | None = None  # the native relay, when built (else sessions relay in Python)
        self._sockets = 0
        self._authenticated = 0
        self.gate = PreAuthGate(config.max_unauthenticated_per_address)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def open_clients(self) -> int:
        """Client connections the proxy holds now, in any stage."""
        return self._sockets

    def unauthenticated(self, address: str) -> int:
        """Sockets from ``address`` that have not authenticated yet."""
        return self.gate.active(address)

    @property
    def authenticated_clients(self) -> int:
        """Sessions past authentication: what max_client_connections limits."""
        return self._authenticated

    def _live_bytes(self) -> dict[str, tuple[int, int]]:
        """Bytes (in, out) per branch on the connections of sessions still relayed (a session adds
        its own to the branch's signals when it ends), read from the kernel at scrape time."""
        live: dict[str, tuple[int, int]] = {}
        for client, branch in list(self._relaying.items()):
            received, sent = tcp_bytes(client.transport)
            was = live.get(branch, (0, 0))
            live[branch] = (was[0] + received, was[1] + sent)
        return live

    def _relay_state(self) -> tuple[int, int] | None:
        relay = self.relay
        return (relay.live, relay.buffered) if relay is not None else None

    def connections(self, branch: str) -> int:
        s = self._branches.get(branch)
        return s.sessions if s else 0

    # -- accept ---------------------------------------------------------------------------------

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.listen_host, self.config.listen_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                          f"{e.strerror}; choose another --listen") from None
        sock.listen(4096)
        sock.setblocking(False)
        self._sock = sock
        self.relay = Relay.open(asyncio.get_running_loop())
        self._accepting = asyncio.create_task(self._accept_loop(), name="proxy-accept")

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        await self.warm.close()
        await self.pooler.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                accepted = [await loop.sock_accept(self._sock)]
                # Whatever else is already queued is taken now, without re-arming the listener
                # for each connection (a burst of clients costs one wait, not one per client).
                while len(accepted) < 64:
                    try:
                        conn, addr = self._sock.accept()
                    except OSError:  # nothing more queued (or EMFILE: the next wait reports it)
                        break
                    conn.setblocking(False)
                    accepted.append((conn, addr))
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed", extra={"error": str(e)})
                await asyncio.sleep(0.1)
                continue
            for conn, addr in accepted:
                task = asyncio.create_task(self._session(conn, addr))
                self._sessions.add(task)
                task.add_done_callback(self._sessions.discard)

    # -- a session --------------------------------------------------------------------------------

    async def _session(self, conn: socket.socket, addr: tuple) -> None:
        loop = asyncio.get_running_loop()
        # One deadline for everything before authentication: first byte, TLS, startup, SCRAM.
        deadline = loop.time() + self.config.auth_timeout
        address = str(addr[0])
        s = _Session()
        self.gate.per_address = self.config.max_unauthenticated_per_address  # the config may change live
        admitted = self.gate.admit(address)
        if admitted is False:
            self._refuse(conn, address)
            return
        self._sockets += 1
        try:
            if admitted is not True:  # in line behind this address's other handshakes
                try:
                    async with asyncio.timeout_at(deadline):
                        await admitted
                except BaseException:
                    self.gate.give_up(address, admitted)
                    raise
            s.address = address
            opened = await self._open(conn, loop, s, deadline)
            if opened is not None:
                assert s.client is not None
                s.outcome = "ok"
                if isinstance(opened, PooledClient):
                    await opened.run()
                else:
                    await self._passthrough(s.client, *opened, loop, s)
        except InvalidStartupPacket as e:
            s.outcome = e.outcome
            self.metrics.invalid_startup_packets.inc()
            log.info("closed a connection without a startup packet",
                     extra={"client": address, "error": str(e)})
        except SessionError as e:
            s.outcome = e.outcome
            if isinstance(e, HandshakeError):
                self.metrics.protocol_errors.inc()
            if s.client is not None:
                s.client.write(codec.fatal(e.sqlstate, str(e), hint=e.hint))
        except TimeoutError:
            s.outcome = "timeout"
            if s.client is not None:
                s.client.write(codec.fatal("08006", "authentication timed out: the handshake took longer than "
                                                  f"auth_timeout ({self.config.auth_timeout:g}s)"))
        except (ConnectionError, ssl.SSLError, OSError) as e:
            s.outcome = "disconnected"
            log.debug("client connection failed", extra={"error": str(e)})
        except asyncio.CancelledError:
            s.outcome = "shutdown"
            if s.client is not None:
                s.client.write(codec.fatal("57P01", "terminating connection because the proxy is shutting down"))
        finally:
            self._sockets -= 1
            self._leave_unauthenticated(s)
            if s.admitted:
                self._authenticated -= 1
            self.cancels.drop(s.key)
            if s.signals is not None:
                s.signals.sessions -= 1
                s.signals.last_activity = time.monotonic()
            if s.client is not None:
                s.client.close()
            else:
                conn.close()
            self.metrics.connection_ended(s.branch, s.outcome)

    def _refuse(self, conn: socket.socket, address: str) -> None:
        """Over the per-address cap of sockets not yet authenticated: one FATAL, written without
        waiting (a client that does not read it loses nothing), and the socket closes now."""
        with contextlib.suppress(OSError):
            conn.send(codec.fatal("53300", f"too many connections waiting to authenticate from {address}",
                                  hint="finish authenticating the connections already open, or raise "
                                       "max_unauthenticated_per_address"))
        conn.close()
        self.metrics.connection_ended("-", "too_many_unauthenticated")

    def _leave_unauthenticated(self, s: _Session) -> None:
        if s.address is not None:
            self.gate.release(s.address)
            s.address = None

    def _admit(self, s: _Session) -> None:
        """Authenticated: the socket leaves its address's pre-auth count and takes a session slot —
        only these count against max_client_connections."""
        self._leave_unauthenticated(s)
        if self._authenticated >= self.config.max_client_connections:
            raise TooManyConnections("sorry, too many clients already")
        self._authenticated += 1
        s.admitted = True

    async def _open(self, conn: socket.socket, loop: asyncio.AbstractEventLoop,
                    s: _Session, deadline: float) -> tuple[Side, LoadSignals] | PooledClient | None:
        """Handshake, auth, wake and connect: the compute's side of a session ready to relay and
        its branch's signals, or None for a cancel request. The startup packet, the greeting and
        the rest end with this call, so an idle session keeps only its two protocols.

        One deadline (one timer) covers everything before authentication: first byte, TLS,
        startup, SCRAM."""
        address = s.address or "-"
        # Small messages both ways (a query, its answer) must not wait for Nagle's timer (uvloop
        # sets this itself; asyncio's loop skips accepted sockets, whose proto reads 0).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout_at(deadline):
            # A first byte of 0x16 is a TLS ClientHello (direct TLS): only looked for when TLS is on.
            direct = self._direct_ssl is not None and await self._peek_direct_tls(conn)
            _, client = await loop.connect_accepted_socket(
                lambda: Side("client"), conn, ssl=self._direct_ssl if direct else None)
            s.client = client
            if direct and client.transport is not None:
                obj = client.transport.get_extra_info("ssl_object")
                if obj is None or obj.selected_alpn_protocol() != tls.ALPN:
                    raise HandshakeError("direct TLS connections must use ALPN protocol postgresql")
            startup = await negotiate(client, self._ssl, direct_tls=direct, require_tls=self.config.require_tls)
            if isinstance(startup, Cancel):
                s.outcome = "cancel"
                if not await self.cancels.forward(startup.pid, startup.secret):
                    await self.pooler.cancel(startup.pid, startup.secret)
                return None
            mode, startup.sni = select_mode(startup.params, startup.sni, self.config.pool.mode)
            s.branch = branch = route(startup, self.provider.has_branch, self.config.default_branch)
            role = startup.params["user"]
            startup.params.setdefault("database", role)
            cert_hash = self.material.cert_hash if (self.material and startup.tls) else None
            if startup.minor > 0 or startup.unknown_options:  # before authentication, as Postgres does
                client.write(codec.negotiate_protocol_version(0, startup.unknown_options))
            accepted = await authenticate(
                client, role=role, verifier_text=self.provider.role_verifier(branch, role), cert_hash=cert_hash,
                throttle=self.throttle, address=address, on_failure=self.metrics.auth_failures.inc)
        self._admit(s)
        if mode == "transaction":
            return await self.pooler.connect(client, branch, startup.params, accepted)
        compute = await self._wake(branch)
        s.pool_key = pool_key(branch, startup.params)
        warm = await self.warm.take_or_wait(s.pool_key, compute.pid)
        if warm is not None:
            server = ServerSession(warm.side, warm.key, warm.greeting, codec.ready_for_query(b"I"))
        else:
            server = await self._open_backend(compute, startup.params, branch)
            warm = WarmBackend(server.side, server.key, server.greeting, compute.pid)
        s.warm = warm
        s.key = self.cancels.issue(server.key)
        client.write(accepted + server.greeting + codec.backend_key_data(*s.key) + server.ready)
        signals = self._signals(branch)
        signals.sessions += 1
        signals.sessions_opened += 1
        signals.last_activity = time.monotonic()
        s.signals = signals  # from here on, the session's end undoes the count
        return server.side, signals

    async def _open_backend(self, compute: ComputeAddress, params: dict[str, str], branch: str) -> ServerSession:
        """A new backend; when the compute has no slot left (53300) and idle warm backends hold
        some, they are closed and the open retried while their processes exit."""
        for attempt in range(OUT_OF_SLOTS_RETRIES + 1):
            try:
                return await open_session(compute, params, branch)
            except SessionError as e:
                if e.sqlstate != "53300" or attempt == OUT_OF_SLOTS_RETRIES:
                    raise
                if not self.warm.drop_idle(branch) and attempt == 0:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _peek_direct_tls(self, conn: socket.socket) -> bool:
        """Look at the first byte without consuming it; 0x16 starts a TLS ClientHello. It has
        usually arrived by the time the socket is accepted, so only wait when it has not."""
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
            try:
                await ready  # bounded by the caller's auth_timeout deadline
            finally:
                loop.remove_reader(conn.fileno())
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return False
        if not first:
            raise ConnectionError("client closed before sending anything")
        return first[0] == TLS_HANDSHAKE_BYTE and self._direct_ssl is not None

    def _signals(self, branch: str) -> LoadSignals:
        s = self._branches.get(branch)
        if s is None:
            s = self._branches[branch] = self.provider.signals(branch)
        return s

    async def _wake(self, branch: str):  # noqa: ANN202 - ComputeAddress
        address = self.provider.ready(branch)
        if address is not None:  # the usual case: running, nothing to wait for (and no timer to arm)
            self.metrics.wake_wait.observe(0.0)
            return address
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.wake_timeout):
                return await self.provider.ensure_ready(branch)
        except TimeoutError:
            raise WakeTimeout(f'the compute for branch "{branch}" did not wake within '
                              f"{self.config.wake_timeout:g}s; try again shortly") from None
        except UnknownBranch as e:
            raise RoutingError(str(e)) from None
        except WakeError as e:
            raise WakeTimeout(str(e)) from None
        finally:
            self.metrics.wake_wait.observe(time.monotonic() - started)

    async def _passthrough(self, client: Side, server: Side, signals: LoadSignals,
                           loop: asyncio.AbstractEventLoop, s: _Session) -> None:
        """Relay until either side closes. When the client left first, the backend goes to the
        warm pool (which keeps it only if a reset proves it clean); otherwise both close."""
        track = self.warm.per_key > 0
        fds = self.relay.takes(client, server) if self.relay is not None else None
        self._relaying[client] = s.branch
        first: Side | None = None
        try:
            if fds is not None:
                assert self.relay is not None
                first = await self.relay.run(client, server, fds, track=track)
            else:  # TLS, or no native build: the same relay in Python
                ended: asyncio.Future[Side] = loop.create_future()
                client.track = track
                client.relay_to(server, ended=ended)
                server.relay_to(client, ended=ended)
                first = await ended
        finally:
            del self._relaying[client]
            received, sent = client.take_final_bytes()  # the kernel's counts, before the socket closes
            signals.bytes_in += received
            signals.bytes_out += sent
            client.close()
            if (first is client and not server.closed and s.warm is not None and s.pool_key is not None
                    and not self.cancels.was_cancelled(s.key)):
                self.warm.park(s.pool_key, s.warm)
            else:
                server.close()


def _remember_sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
    if name:
        obj.lakelet_sni = name  # type: ignore[union-attr]
