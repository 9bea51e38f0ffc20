"""The Data API's HTTP/1.1 server (``dataapi/http_server.py``) over real sockets: keep-alive,
pipelining, chunked and oversized bodies, HEAD, unparsable requests, header injection, idle
connections, graceful close — and its reading of request targets equals aiohttp's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from aiohttp.helpers import parse_content_type
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from dataapi.http_server import BodyTooLarge, HttpServer, Request, Response, media_type

MAX_BODY = 1000


async def handler(request: Request) -> Response:
    """Echoes what it read; a few paths behave specially."""
    if request.path == "/slow":
        await asyncio.sleep(0.3)
    if request.path == "/boom":
        raise RuntimeError("handler failed")
    if request.path == "/inject":
        return Response(200, {"X-Evil": "a\r\nSet-Cookie: owned=1"}, b"{}")
    if request.path == "/empty":
        return Response(204 if request.method != "HEAD" else 200, {"X-Empty": "1"})
    try:
        body = await request.read()
    except BodyTooLarge:
        return Response(413, {"Content-Type": "application/json"}, b'{"code":"PGRST102"}')
    echo = {"method": request.method, "path": request.path, "query": list(request.query.items()),
            "body": body.decode(), "ctype": request.content_type, "prefer": request.headers.getall("Prefer", []),
            "cookies": request.cookies}
    return Response(200, {"Content-Type": "application/json"}, json.dumps(echo).encode())


def internal_error() -> Response:
    return Response(500, {"Content-Type": "application/json"}, b'{"code":"PGRSTX00"}')


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = HttpServer(handler, internal_error, max_url=2048, max_headers=4096, max_body=MAX_BODY,
                     keepalive_timeout=1.0)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line, "the server closed the connection"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, headers, body


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


async def test_keep_alive_and_http10(server: HttpServer) -> None:
    reader, writer = await connect(server)
    for n in range(3):  # one connection, three requests
        writer.write(f"GET /t?id=eq.{n}&x=a+b%20c HTTP/1.1\r\nHost: h\r\nPrefer: count=exact\r\n\r\n".encode())
        status, headers, body = await read_response(reader)
        assert status == 200 and "connection" not in headers and "date" in headers
        echo = json.loads(body)
        assert echo["query"] == [["id", f"eq.{n}"], ["x", "a b c"]] and echo["prefer"] == ["count=exact"]
    writer.write(b"GET /t HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close" and await closed(reader)
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /t HTTP/1.0\r\n\r\n")
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.0 200") and (await reader.read()).endswith(b'"cookies": {}}')
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /t HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    writer.write(b"GET /u HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert json.loads((await read_response(reader))[2])["path"] == "/u"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    reader, writer = await connect(server)
    # The slow one first: the answers must still come in the order asked.
    writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n" + b"".join(
        f"GET /p{n} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for n in range(40)))
    paths = [json.loads((await read_response(reader))[2])["path"] for _ in range(41)]
    assert paths == ["/slow"] + [f"/p{n}" for n in range(40)]
    writer.close()


async def test_bodies_chunked_sized_and_too_large(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Type: Application/JSON; charset=utf-8\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")
    echo = json.loads((await read_response(reader))[2])
    assert echo["body"] == '{"a": 1}' and echo["ctype"] == "application/json"
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    echo = json.loads((await read_response(reader))[2])
    assert echo["body"] == "hello" and echo["ctype"] == "application/octet-stream"
    # Over the limit, sized and chunked: 413, and the connection still serves the next request.
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1))
    assert (await read_response(reader))[0] == 413
    chunk = b"x" * 600
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + (b"258\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    assert (await read_response(reader))[0] == 413
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
    assert json.loads((await read_response(reader))[2])["body"] == "ok"
    writer.close()


async def test_head_204_and_cookies(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"HEAD /t HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, body = await read_response(reader, head=True)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""
    writer.write(b"HEAD /empty HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, _ = await read_response(reader, head=True)
    assert status == 200 and "content-length" not in headers and headers["x-empty"] == "1"
    writer.write(b"GET /empty HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 204 and "content-length" not in headers
    # Answers to HEAD carried no body: the next response starts right after the headers.
    writer.write(b"GET /t HTTP/1.1\r\nHost: h\r\nCookie: a=1; b=\"two\"\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["cookies"] == {"a": "1", "b": "two"}
    writer.close()


async def test_expect_continue_half_close_and_odd_targets(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(b"body")
    assert json.loads((await read_response(reader))[2])["body"] == "body"
    writer.write(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert json.loads((await read_response(reader))[2])["path"] == "*"
    writer.write(b"GET http://h/abs/form?a=%41 HTTP/1.1\r\nHost: h\r\n\r\n")
    echo = json.loads((await read_response(reader))[2])
    assert echo["path"] == "/abs/form" and echo["query"] == [["a", "A"]]
    # An upgrade offer (curl --http2 sends one) is answered as HTTP/1.1, then the connection closes.
    reader2, writer2 = await connect(server)
    writer2.write(b"GET /up HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    status, headers, body = await read_response(reader2)
    assert status == 200 and json.loads(body)["path"] == "/up" and headers["connection"] == "close"
    assert await closed(reader2)
    writer2.close()
    # A client that half-closes after its request still gets the answer, then the close.
    writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    writer.write_eof()
    assert json.loads((await read_response(reader))[2])["path"] == "/slow"
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
    (b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
])
async def test_unparsable_requests_get_400_and_close(server: HttpServer, request_bytes: bytes, status: int) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n" + request_bytes)
    first = await read_response(reader)
    assert first[0] == 200 and json.loads(first[2])["path"] == "/first"  # the good one before it is answered
    got, headers, body = await read_response(reader)
    assert got == status and headers["connection"] == "close" and body.startswith(b"Request") | body.startswith(b"Bad")
    assert await closed(reader)
    writer.close()


async def test_handler_failures_and_header_injection_are_500(server: HttpServer) -> None:
    for path in ("/boom", "/inject"):
        reader, writer = await connect(server)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        status, headers, body = await read_response(reader)
        assert status == 500 and body == b'{"code":"PGRSTX00"}' and "set-cookie" not in headers
        assert await closed(reader)
        writer.close()


async def test_idle_connections_close_and_close_waits_for_requests(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /t HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert await closed(reader)  # keepalive_timeout is 1 s here
    writer.close()

    busy_reader, busy_writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    idle_writer.write(b"GET /t HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_response(idle_reader)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(server.close())
    status, headers, _ = await read_response(busy_reader)  # the request in flight is answered
    assert status == 200 and headers["connection"] == "close"
    assert await closed(busy_reader) and await closed(idle_reader)
    await closing
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
    busy_writer.close()
    idle_writer.close()


async def test_a_client_that_does_not_read_pauses_only_itself(server: HttpServer) -> None:
    stuck_reader, stuck_writer = await connect(server)
    big = b"x" * MAX_BODY
    for _ in range(200):  # ~1 MB of responses nobody reads yet
        stuck_writer.write(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    await asyncio.sleep(0.5)
    reader, writer = await connect(server)
    writer.write(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
    assert json.loads((await read_response(reader))[2])["path"] == "/other"
    for _ in range(200):  # and the stuck client gets every answer once it reads
        assert (await read_response(stuck_reader))[0] == 200
    writer.close()
    stuck_writer.close()


@given(st.text(alphabet="ab1_.-~=&+%/ é#;,()", max_size=24))
@settings(max_examples=500, deadline=None)
def test_request_targets_read_as_aiohttp_reads_them(raw: str) -> None:
    """The plain-target shortcut equals yarl's decoding, built as aiohttp's parser builds it."""
    target = "/main/db/rest/v1/" + quote(raw, safe="=&+%~/#;,()")
    path, _, rest = target.partition("?") if "?" in target.partition("#")[0] else (target.partition("#")[0], "", "")
    reference = URL.build(path=path.partition("#")[0], query_string=rest.partition("#")[0], encoded=True)
    request = Request("GET", "1.1", target.encode(), (), b"", False, True)
    assert request.path == reference.path
    assert request.query_string == reference.query_string
    assert list(request.query.items()) == list(reference.query.items())


@pytest.mark.parametrize("value", ["", " ", "text/csv", "Application/JSON ; charset=utf-8", "garbage", ";charset=x",
                                   "a/b;", " text/plain ", "application/vnd.pgrst.object+json;nulls=stripped"])
def test_media_types_read_as_aiohttp_reads_them(value: str) -> None:
    assert media_type(value) == parse_content_type(value)[0]
