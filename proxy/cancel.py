"""Cancel keys. A client's BackendKeyData holds its compute backend's real process id (so
``pg_backend_pid()``, NOTIFY's sender pid and ``pg_stat_activity`` agree with what the client was
told) and a secret the proxy issues. The secret is unique across every compute the proxy serves,
so a CancelRequest is found by (pid, secret) and forwarded with the backend's own key; a forged,
stale or mixed-up key cancels nothing, as in Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass

from proxy.codec import encode_cancel

log = logging.getLogger("lakelet.proxy")
CANCEL_TIMEOUT = 5.0  # seconds for the compute to take a CancelRequest


@dataclass(frozen=True, slots=True)
class BackendKey:
    socket_path: str
    pid: int
    secret: int


class CancelMap:
    def __init__(self) -> None:
        self._by_secret: dict[int, BackendKey] = {}
        # Sessions whose client sent a cancel: an interrupted client, whose backend is not kept
        # warm when it leaves (on Postgres that backend ends with its client; tools watch for it).
        self._cancelled: set[int] = set()

    def issue(self, backend: BackendKey) -> tuple[int, int]:
        """The key a client is given for ``backend``: its real pid and a fresh secret."""
        while True:
            secret = secrets.randbits(32) - (1 << 31)
            if secret not in self._by_secret:
                self._by_secret[secret] = backend
                return backend.pid, secret

    def drop(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            backend = self._by_secret.get(key[1])
            if backend is not None and backend.pid == key[0]:
                del self._by_secret[key[1]]
                self._cancelled.discard(key[1])

    def was_cancelled(self, key: tuple[int, int] | None) -> bool:
        return key is not None and key[1] in self._cancelled and self.find(*key) is not None

    def __len__(self) -> int:
        return len(self._by_secret)

    def find(self, pid: int, secret: int) -> BackendKey | None:
        backend = self._by_secret.get(secret)
        return backend if backend is not None and backend.pid == pid else None

    async def forward(self, pid: int, secret: int) -> bool:
        backend = self.find(pid, secret)
        if backend is None:
            return False
        self._cancelled.add(secret)
        return await cancel_backend(backend)


async def cancel_backend(backend: BackendKey) -> bool:
    """Send the compute a CancelRequest with the backend's own key, and return only once the
    compute has closed that connection: Postgres signals the backend before it closes, and
    clients (libpq, asyncpg) wait for the close before their next query — closing earlier would
    let the signal land on that next query."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CANCEL_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(backend.socket_path)
            try:
                writer.write(encode_cancel(backend.pid, backend.secret))
                await reader.read()
            finally:
                writer.close()
            return True
    log.info("cancel could not reach the compute", extra={"socket": os.path.basename(backend.socket_path)})
    return False
