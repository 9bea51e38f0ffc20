"""Admission before authentication: how many handshakes one client address may run at once.

A socket that has not authenticated costs the proxy a descriptor and a task and, before this
gate, counted like a session: 800 trickling sockets from one address once made every real
client's connection fail. Now each address runs at most ``per_address`` handshakes (first byte,
TLS, startup, SCRAM) at a time; further sockets from it wait in line, within their own
``auth_timeout``, so a burst of real clients from one application server is served in turn
rather than refused; only past ``QUEUE_FACTOR`` × ``per_address`` waiting are new sockets from
that address refused at once (53300). Other addresses never wait behind it, and only
authenticated sessions count against ``max_client_connections``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

QUEUE_FACTOR = 10


@dataclass(slots=True)
class _Address:
    active: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class PreAuthGate:
    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._addresses: dict[str, _Address] = {}

    def active(self, address: str) -> int:
        a = self._addresses.get(address)
        return a.active if a is not None else 0

    def waiting(self, address: str) -> int:
        a = self._addresses.get(address)
        return len(a.waiting) if a is not None else 0

    def admit(self, address: str) -> asyncio.Future[None] | bool:
        """True: a handshake slot is taken now; a future: wait for it (a slot is held once it
        completes; cancel it to give up); False: refuse, the line is full."""
        a = self._addresses.get(address)
        if a is None:
            a = self._addresses[address] = _Address()
        if a.active < self.per_address:
            a.active += 1
            return True
        if len(a.waiting) >= QUEUE_FACTOR * self.per_address:
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        a.waiting.append(turn)
        return turn

    def give_up(self, address: str, turn: asyncio.Future[None]) -> None:
        """A waiter that stops waiting (its deadline, or the proxy closing); if its turn had come
        already, the slot it got goes on."""
        a = self._addresses.get(address)
        if a is None:
            return
        if turn.done() and not turn.cancelled():
            self.release(address)
            return
        turn.cancel()
        try:
            a.waiting.remove(turn)
        except ValueError:
            pass
        self._forget_if_idle(address, a)

    def release(self, address: str) -> None:
        """A handshake ended (authenticated, failed or closed): its slot goes to the next in line."""
        a = self._addresses.get(address)
        if a is None:
            return
        while a.waiting:
            turn = a.waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: active stays as it is
                return
        a.active -= 1
        self._forget_if_idle(address, a)

    def _forget_if_idle(self, address: str, a: _Address) -> None:
        if a.active <= 0 and not a.waiting:
            del self._addresses[address]
