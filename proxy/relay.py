"""The session relay in native code: a session's bytes, once it is open, move off the event loop.

After the handshake a session-mode session needs nothing from the proxy but its bytes moved, and
moving them through Python callbacks cost more CPU per transaction than PgBouncer spends. So
``relay.c`` — a thread with its own epoll, no Python API, loaded here with ctypes — borrows the
two sockets (their transports paused: nothing else reads or writes them meanwhile) and copies
bytes between them until one side leaves, then hands them back open for what comes after: the
kernel's byte counts, the closing words, and a backend kept warm. No socket is closed while lent
(a cancelled session waits for the thread to let go first), so a descriptor number is never
reused under the thread.

Everything with a policy stays here and in ``server.py``: which sessions go native (plain TCP or
Unix sockets, nothing buffered on either side: TLS sessions stay in Python, where the TLS is), what
an ending means (the client left → the backend may be kept warm; the backend left → the client is
closed), and stopping a session when the proxy shuts down.

``scripts/setup.sh`` builds ``relay.c`` into ``proxy/_relay/relay-<digest>.so`` — the digest of the
source is in the name, so an edited source is never served by an old build; a missing build or
compiler, or ``LAKELET_INTERPRETED=1``, means the Python relay (``pipe.Side.relay_to``), which does
the same thing slower.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from proxy.pipe import Side

log = logging.getLogger("lakelet.proxy")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "relay.c"
NATIVE = HERE / "_relay"  # not _native: the pooler's build replaces that directory whole

# Why a relayed session ended (relay.c's END_*).
END_CLIENT, END_SERVER, END_STOPPED, END_TERMINATE = 0, 1, 2, 3
_BATCH = 64


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return NATIVE / f"relay-{digest}.so"


def build() -> Path:
    """Compile ``relay.c`` (``scripts/setup.sh`` calls this); older builds are removed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH: install gcc to build the native relay")
    target = library_path()
    NATIVE.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=NATIVE, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-pthread",
                        "-o", tmp, str(SOURCE)], check=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in NATIVE.glob("relay-*.so"):
        if old != target:
            old.unlink()
    return target


_loaded: dict[Path, ctypes.CDLL] = {}


def library() -> ctypes.CDLL | None:
    """The built relay, or None (no build for this source, or ``LAKELET_INTERPRETED`` set)."""
    if os.environ.get("LAKELET_INTERPRETED"):
        return None
    path = library_path()
    if path in _loaded:
        return _loaded[path]
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    lib.lr_open.restype = vp
    lib.lr_open.argtypes = []
    lib.lr_donefd.restype = c_int
    lib.lr_donefd.argtypes = [vp]
    lib.lr_add.restype = vp
    lib.lr_add.argtypes = [vp, c_int, c_int, c_int]
    lib.lr_stop.restype = None
    lib.lr_stop.argtypes = [vp, vp]
    lib.lr_done.restype = c_int
    lib.lr_done.argtypes = [vp, ctypes.POINTER(vp), ctypes.POINTER(c_int), c_int]
    lib.lr_live.restype = ctypes.c_long
    lib.lr_live.argtypes = [vp]
    lib.lr_buffered.restype = ctypes.c_long
    lib.lr_buffered.argtypes = [vp]
    lib.lr_close.restype = None
    lib.lr_close.argtypes = [vp]
    _loaded[path] = lib
    return lib


def _fileno(side: Side) -> int | None:
    transport = side.transport
    if transport is None or transport.is_closing() or side.closed:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None  # the TLS is in Python: so are its bytes
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


class Relay:
    """One relay thread for one proxy (and its event loop)."""

    def __init__(self, lib: ctypes.CDLL, loop: asyncio.AbstractEventLoop) -> None:
        handle = lib.lr_open()
        if not handle:
            raise OSError("the native relay could not start its thread")
        self._lib = lib
        self._h = handle
        self._loop = loop
        self._fd = lib.lr_donefd(handle)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._handles = (ctypes.c_void_p * _BATCH)()
        self._reasons = (ctypes.c_int * _BATCH)()
        loop.add_reader(self._fd, self._collect)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop) -> Relay | None:
        """A relay when the native build is there (and can start), else None."""
        lib = library()
        if lib is None:
            why = ("LAKELET_INTERPRETED is set" if os.environ.get("LAKELET_INTERPRETED")
                   else f"no build of {SOURCE.name} (scripts/setup.sh makes one where cc exists)")
            log.info("sessions are relayed in Python", extra={"reason": why})
            return None
        try:
            return cls(lib, loop)
        except OSError as e:
            log.warning("the native relay is unavailable: sessions are relayed in Python",
                        extra={"error": str(e)})
            return None

    @property
    def live(self) -> int:
        """Sessions handed over and not yet reported back."""
        return int(self._lib.lr_live(self._h))

    @property
    def buffered(self) -> int:
        """Bytes held for readers slower than their writers, over all sessions."""
        return int(self._lib.lr_buffered(self._h))

    def _collect(self) -> None:
        n = self._lib.lr_done(self._h, self._handles, self._reasons, _BATCH)
        for k in range(n):
            future = self._waiting.pop(self._handles[k], None)  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(self._reasons[k])

    def takes(self, client: Side, server: Side) -> tuple[int, int] | None:
        """The two sockets when this session can be relayed natively: both ends plain sockets
        with nothing read ahead or waiting to be written (so no byte can overtake another)."""
        if client.buf or server.buf:
            return None
        cfd, sfd = _fileno(client), _fileno(server)
        if cfd is None or sfd is None:
            return None
        assert client.transport is not None and server.transport is not None
        if client.transport.get_write_buffer_size() or server.transport.get_write_buffer_size():
            return None
        return cfd, sfd

    async def run(self, client: Side, server: Side, fds: tuple[int, int], *, track: bool) -> Side:
        """Relay until one side leaves; the side that left first. With ``track``, the client's
        Terminate ends the session without reaching the backend (which may then be kept warm).
        Cancelled, the relay lets go of both sockets before the cancellation goes on."""
        assert client.transport is not None and server.transport is not None
        client.transport.pause_reading()
        server.transport.pause_reading()
        handle = self._lib.lr_add(self._h, fds[0], fds[1], int(track))
        if not handle:
            raise OSError("the native relay could not take the session (out of memory)")
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiting[handle] = future
        try:
            reason = await asyncio.shield(future)  # a cancellation must not lose the report
        except asyncio.CancelledError:
            # The sockets are lent: they may be closed only once the thread has let go of them.
            self._lib.lr_stop(self._h, handle)
            while not future.done():  # the thread answers within microseconds
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
            raise
        if reason == END_SERVER:
            return server
        if reason == END_STOPPED:  # the thread could not watch the sockets (cancellation raised above)
            raise ConnectionResetError("the native relay could not take the session's sockets")
        return client

    def close(self) -> None:
        """Stop the thread; every session must have ended (the proxy awaits them first)."""
        for handle in list(self._waiting):
            self._lib.lr_stop(self._h, handle)
        self._loop.remove_reader(self._fd)
        self._lib.lr_close(self._h)
        self._waiting.clear()
