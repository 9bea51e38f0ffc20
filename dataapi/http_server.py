"""The Data API's HTTP/1.1 server: httptools (llhttp, the parser Node.js uses) reads requests,
this module frames responses, one ``asyncio.Protocol`` per connection.

Why not aiohttp here: the Data API routes every path itself and answers from memory, so it needs
none of aiohttp's router, middlewares, streaming payloads or response objects. Measured under
``bench/data_api.py``, a worker spent 97–104 µs of CPU per single-row request on aiohttp's
low-level server and 64–83 µs on this one (the rest of the worker unchanged). What is kept of
HTTP/1.1:

- keep-alive (HTTP/1.1 by default, HTTP/1.0 on ``Connection: keep-alive``), ``Connection: close``,
  pipelined requests answered in order, one at a time per connection;
- request bodies by ``Content-Length`` or chunked (llhttp decodes them); a body over
  ``max_body`` is not kept — ``Request.read`` raises ``BodyTooLarge`` (the handler answers 413);
- a request line over ``max_url`` or a header block over ``max_headers`` bytes, or a request
  llhttp cannot parse: 400 (431 for headers) with a one-line text body, then the connection closes;
- responses always carry ``Content-Length`` (bodies are whole in memory), except for HEAD with no
  body, 204 and 304; a header value holding CR or LF is refused (500), so a function's
  ``response.headers`` cannot split the response;
- write flow control (a client that does not read pauses its connection, not the worker), idle
  connections closed after ``keepalive_timeout`` seconds, and a graceful ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from yarl import URL

log = logging.getLogger("lakelet.dataapi")

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection is kept (aiohttp's default)
PIPELINE_DEPTH = 16       # requests queued on one connection before it stops reading
_PLAIN = frozenset(b"%+#")


class BodyTooLarge(Exception):
    """The request body was over the server's ``max_body``; it was read and dropped."""


def media_type(content_type: str) -> str:
    """``type/subtype`` of a ``Content-Type`` value, lower-cased, parameters dropped; anything
    without a ``/`` is ``application/octet-stream`` (as aiohttp reads it)."""
    mtype = content_type.split(";", 1)[0].strip().lower()
    return mtype if "/" in mtype else "application/octet-stream"


class Request:
    """One parsed request, with the attributes the Data API reads (named as aiohttp names them)."""

    __slots__ = ("method", "version", "path", "query_string", "raw_headers", "headers", "keep_alive", "branch",
                 "_body", "_too_large", "_query", "_target")

    def __init__(self, method: str, version: str, target: bytes, raw_headers: tuple[tuple[bytes, bytes], ...],
                 body: bytes, too_large: bool, keep_alive: bool) -> None:
        self.method = method
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(
            (k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in raw_headers))
        self.keep_alive = keep_alive
        self.branch = ""  # the metrics label, set by the handler once the branch exists
        self._body = body
        self._too_large = too_large
        self._query: MultiDictProxy[str] | None = None
        self._target: URL | None = None
        if _PLAIN.isdisjoint(target) and target.startswith(b"/"):
            # Nothing to decode (no %-escape, no "+", no fragment): the common case, split as is.
            path, _, query = target.decode("ascii", "surrogateescape").partition("?")
            self.path = path
            self.query_string = query
        else:
            try:
                url = httptools.parse_url(target)
                self._target = URL.build(path=(url.path or b"").decode("utf-8", "surrogateescape"),
                                         query_string=(url.query or b"").decode("utf-8", "surrogateescape"),
                                         encoded=True)
            except (httptools.HttpParserInvalidURLError, ValueError):  # "*", or nothing a URL can be
                self._target = URL.build(path="/", encoded=True)
                self.path = target.decode("latin-1")  # routes nowhere: the handler's 404
                self.query_string = ""
            else:
                self.path = self._target.path
                self.query_string = self._target.query_string

    @property
    def query(self) -> MultiDictProxy[str]:
        """The query string's parameters, decoded (``+`` as a space), in order, repeats kept."""
        if self._query is None:
            if self._target is not None:
                self._query = self._target.query
            else:
                pairs: MultiDict[str] = MultiDict()
                for part in self.query_string.split("&"):
                    if part:
                        k, _, v = part.partition("=")
                        pairs.add(k, v)
                self._query = MultiDictProxy(pairs)
        return self._query

    @property
    def content_type(self) -> str:
        """The media type of ``Content-Type`` without parameters (``application/octet-stream`` when
        none came, as HTTP says a recipient may assume)."""
        return media_type(self.headers.get("Content-Type", ""))

    @property
    def cookies(self) -> dict[str, str]:
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            jar.load(self.headers.get("Cookie", ""))
        return {name: morsel.value for name, morsel in jar.items()}

    def origin(self) -> URL:
        """``http://<Host>``: the server's address as the client named it."""
        try:
            return URL.build(scheme="http", authority=self.headers.get("Host") or "localhost")
        except ValueError:
            return URL("http://localhost")

    async def read(self) -> bytes:
        if self._too_large:
            raise BodyTooLarge
        return self._body


class Response:
    """Status, headers (a plain dict, written in order) and the whole body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes | None = None,
                 content_type: str | None = None, charset: str | None = None) -> None:
        self.status = status
        self.headers = {} if headers is None else headers
        self.body = body
        if content_type is not None:
            self.headers["Content-Type"] = content_type + (f"; charset={charset}" if charset else "")

    @property
    def content_length(self) -> int:
        return 0 if self.body is None else len(self.body)


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[tuple[str, int], str] = {}


def _status_line(version: str, status: int) -> str:
    line = _STATUS_LINES.get((version, status))
    if line is None:
        line = _STATUS_LINES[(version, status)] = f"HTTP/{version} {status} {_REASONS.get(status, 'Unknown')}\r\n"
    return line


class _Date:
    """The ``Date`` header's value, formatted once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.text = formatdate(second, usegmt=True)
        return self.text


_date = _Date()


def encode_response(response: Response, method: str, version: str, keep_alive: bool) -> bytes:
    """The response as bytes; ``ValueError`` when a header name or value holds CR or LF."""
    headers = response.headers
    body = response.body
    status = response.status
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
        raise ValueError("a response header holds CR or LF")
    head = [_status_line(version, status), lines]
    if body is not None:
        head.append(f"Content-Length: {len(body)}\r\n")
        if "Content-Type" not in headers and not any(k.lower() == "content-type" for k in headers):
            head.append("Content-Type: application/octet-stream\r\n")
    elif method != "HEAD" and status not in (204, 304) and status >= 200:
        head.append("Content-Length: 0\r\n")
    if "Date" not in headers:
        head.append(f"Date: {_date.now()}\r\n")
    if not keep_alive:
        head.append("Connection: close\r\n\r\n" if version == "1.1" else "\r\n")
    else:
        head.append("\r\n" if version == "1.1" else "Connection: keep-alive\r\n\r\n")
    data = "".join(head).encode("utf-8", "surrogateescape")
    if body is not None and method != "HEAD":
        return data + body
    return data


def _plain(status: int, text: str, version: str = "1.1") -> bytes:
    body = (text + "\n").encode()
    return encode_response(Response(status, {"Content-Type": "text/plain; charset=utf-8"}, body), "GET",
                           version, False)


class _ParseLimit(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text


class HttpProtocol(asyncio.Protocol):
    """One client connection: the parser's callbacks build ``Request``s; one task at a time runs
    the handler over the queued requests and writes their responses in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_active = 0.0
        self.reading = True
        self.closing = False  # close once the queued requests are answered
        self._drained: asyncio.Future[None] | None = None
        self._write_paused = False
        self._refusal: bytes | None = None  # the 400 owed to a request that could not be parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._continue = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_active = self.server.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()
        self.server.connections.discard(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def eof_received(self) -> bool | None:
        """The client will send nothing more: answer what it asked, then close."""
        self.closing = True
        return None if self.idle() else True

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # ``Upgrade: h2c`` and the like: answered as plain HTTP/1.1 (the Data API upgrades to
            # nothing), then closed, since the parser reads nothing after an upgrade.
            self.closing = True
            if self.idle() and self.transport is not None:
                self.transport.close()
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _ParseLimit):
                self._refuse(cause.status, cause.text)
            else:
                log.error("data API request could not be read", exc_info=cause)
                self._refuse(400, "Bad request: it could not be read; send an HTTP/1.1 request")
        except httptools.HttpParserError as e:
            self._refuse(400, f"Bad request: {e}; send an HTTP/1.1 request")

    def _refuse(self, status: int, text: str) -> None:
        """A request that cannot be parsed: answer after the ones already queued, then close."""
        if self.transport is None:
            return
        self.transport.pause_reading()
        self.reading = False
        self.closing = True
        if self.task is None and not self.queue:
            self.transport.write(_plain(status, text))
            self.transport.close()
        else:
            self._refusal = _plain(status, text)
            if self.task is None:  # requests parsed from this same chunk are still to answer
                self.task = self.server.loop.create_task(self._serve())

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_url:
            raise _ParseLimit(400, f"Request line too long: send at most {self.server.max_url} bytes of URL")

    def on_header(self, name: bytes, value: bytes | None) -> None:
        value = value or b""
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.server.max_headers:
            raise _ParseLimit(431, f"Request headers too large: send at most {self.server.max_headers} bytes")
        self._headers.append((name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._continue = True

    def on_headers_complete(self) -> None:
        if self._continue:  # the client waits for this before it sends the body
            self._continue = False
            # Not while an earlier request is unanswered: interim responses come in order too.
            if self.transport is not None and self.task is None and self.parser.get_http_version() == "1.1":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size <= self.server.max_body:
            self._body.append(body)
        elif self._body:
            self._body = []  # over the limit: dropped, and remembered as too large

    def on_message_complete(self) -> None:
        p = self.parser
        too_large = self._body_size > self.server.max_body
        body = b"".join(self._body) if self._body else b""
        request = Request(p.get_method().decode("ascii", "replace"), p.get_http_version(), self._url,
                          tuple(self._headers), body, too_large, p.should_keep_alive())
        self._body = []
        self.queue.append(request)
        if self.task is None:
            self.task = self.server.loop.create_task(self._serve())
        elif len(self.queue) >= PIPELINE_DEPTH and self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    # -- answering ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        server = self.server
        try:
            while self.queue:
                request = self.queue.popleft()
                last = not request.keep_alive or (self.closing and not self.queue)
                try:
                    response = await server.handler(request)
                    last = last or (self.closing and not self.queue)  # close() came meanwhile
                    data = encode_response(response, request.method, request.version,
                                           not last or self._refusal is not None)
                except Exception:
                    log.exception("data API request failed", extra={"path": request.path})
                    data = encode_response(server.internal_error(), request.method, request.version, False)
                    request.keep_alive, last = False, True
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                transport.write(data)
                self.last_active = server.loop.time()
                if last:
                    if self._refusal is not None and request.keep_alive:
                        transport.write(self._refusal)
                    transport.close()
                    return
                if self._write_paused:
                    self._drained = server.loop.create_future()
                    await self._drained
                    self._drained = None
                if not self.reading and not self.closing and len(self.queue) < PIPELINE_DEPTH // 2:
                    self.reading = True
                    transport.resume_reading()
        finally:
            self.task = None

    def idle(self) -> bool:
        return self.task is None and not self.queue


class HttpServer:
    """Accepts on a listening socket (its own, or one inherited) and serves every request with
    ``handler``; ``internal_error`` is the response when the handler itself fails."""

    def __init__(self, handler: Handler, internal_error: Callable[[], Response], *, max_url: int,
                 max_headers: int, max_body: int, keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.handler = handler
        self.internal_error = internal_error
        self.max_url = max_url
        self.max_headers = max_headers
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HttpProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> None:
        factory = lambda: HttpProtocol(self)  # noqa: E731
        if sock is not None:
            self._server = await self.loop.create_server(factory, sock=sock)
        else:
            self._server = await self.loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
        sockets = self._server.sockets or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        self._sweeper = self.loop.create_task(self._sweep(), name="data-api-idle-connections")

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for ``keepalive_timeout`` (one timer for all of them,
        not one per request)."""
        every = max(0.5, min(10.0, self.keepalive_timeout / 4))
        while True:
            await asyncio.sleep(every)
            cutoff = self.loop.time() - self.keepalive_timeout
            for conn in list(self.connections):
                if conn.idle() and conn.last_active < cutoff and conn.transport is not None:
                    conn.transport.close()

    async def close(self, grace: float = 8.0) -> None:  # under workers.STOP_TIMEOUT: pools close too
        """Stop accepting, close idle connections, let requests in flight finish (``grace``
        seconds at most), then close what is left."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.closing = True
            if conn.idle() and conn.transport is not None:
                conn.transport.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
