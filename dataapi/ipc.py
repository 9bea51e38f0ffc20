"""The link between ``lakelet up`` and its Data API workers: framed JSON messages over a Unix
socket pair, both directions.

Codec (sans-I/O, h11's way): ``encode(message)`` gives the bytes of one frame — a 4-byte
big-endian length, then the message as UTF-8 JSON; a ``Decoder`` is fed whatever the socket
delivered and returns the whole messages it now holds. No frame is bigger than ``MAX_FRAME``;
a longer one means the peer is broken, and the link drops.

Connection (``Link``): an ``asyncio.Protocol`` over the codec. ``send`` is fire and forget;
``request`` adds an ``id`` and waits for the reply carrying the same ``id``. Anything else that
arrives goes to the handler, which may answer with ``reply``. Nothing here knows what the
messages mean (``worker.py`` and ``workers.py`` do).

Messages (``op``), worker → main: ``ready``, ``wake`` (request: branch → address or error),
``load`` (a branch's in-flight count, bytes and activity since the last one). Main → worker:
``start`` (the configuration, first message), ``forget`` (a branch's compute stopped, restarted
or moved: drop its address), ``metrics`` (request: the worker's Prometheus samples).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

MAX_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")

Message = dict[str, Any]


class FrameError(ValueError):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Bytes in, messages out; keeps a partial frame until the rest arrives."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= 4:
            (size,) = _LENGTH.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes announced; the limit is {MAX_FRAME}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            try:
                message = json.loads(body)
            except ValueError as e:
                raise FrameError(f"frame is not JSON: {e}") from None
            if not isinstance(message, dict):
                raise FrameError("frame is not a JSON object")
            out.append(message)
        return out


class LinkClosed(ConnectionError):
    """The other side went away (its process exited, or the link was closed here)."""


class Link(asyncio.Protocol):
    """One end of the socket pair. ``handler(link, message)`` gets every message that is not a
    reply; ``on_close(link)`` runs once when the link is gone."""

    def __init__(self, handler: Callable[[Link, Message], None],
                 on_close: Callable[[Link], None] | None = None) -> None:
        self._handler = handler
        self._on_close = on_close
        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, sock: Any, handler: Callable[[Link, Message], None],
                   on_close: Callable[[Link], None] | None = None) -> Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: cls(handler, on_close), sock=sock)
        return link

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except FrameError:
            self.close()
            return
        for message in messages:
            waiter = self._waiting.pop(message.get("re", -1), None) if "re" in message else None
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(message)
            elif "re" not in message:
                self._handler(self, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkClosed("the other end of the link went away"))
        self._waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)
            if self._on_close is not None:
                self._on_close(self)

    # -- API ------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, message: Message) -> None:
        if self._transport is None or self._transport.is_closing():
            raise LinkClosed("the link is closed")
        self._transport.write(encode(message))

    def reply(self, to: Message, message: Message) -> None:
        with contextlib.suppress(LinkClosed):
            self.send({**message, "re": to["id"]})

    async def request(self, message: Message, timeout: float | None = None) -> Message:
        self._next_id += 1
        ident = self._next_id
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        try:
            self.send({**message, "id": ident})
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiting.pop(ident, None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


__all__ = ["Decoder", "FrameError", "Link", "LinkClosed", "Message", "encode"]
