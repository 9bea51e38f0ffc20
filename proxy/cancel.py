"""Cancel keys: clients get proxy-issued BackendKeyData; a CancelRequest carrying one is
forwarded to the compute backend it stands for. Unknown keys are ignored, as Postgres does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass

from proxy.codec import encode_cancel

log = logging.getLogger("lakelet.proxy")


@dataclass(frozen=True)
class BackendKey:
    socket_path: str
    pid: int
    secret: int


class CancelMap:
    def __init__(self) -> None:
        self._keys: dict[tuple[int, int], BackendKey] = {}

    def issue(self, backend: BackendKey) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(31) - (1 << 30))
            if key not in self._keys:
                self._keys[key] = backend
                return key

    def drop(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)

    async def forward(self, pid: int, secret: int) -> bool:
        backend = self._keys.get((pid, secret))
        if backend is None:
            return False
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(backend.socket_path), 5)
            writer.write(encode_cancel(backend.pid, backend.secret))
            await writer.drain()
            writer.close()
            return True
        log.info("cancel could not reach the compute", extra={"socket": os.path.basename(backend.socket_path)})
        return False
