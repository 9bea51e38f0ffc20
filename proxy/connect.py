"""Stage 4: open the session on the compute over its private socket, as the same role and
database, and pass the server's greeting (ParameterStatus … ReadyForQuery) to the client with a
proxy-issued cancel key."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from compute import ComputeAddress
from proxy import codec
from proxy.cancel import BackendKey
from proxy.errors import ConnectError, SessionError
from proxy.pipe import Side

# What the proxy reads of the greeting: authentication, cancel key, error, ReadyForQuery.
TAKEN = (b"R", b"K", b"E", b"Z")


@dataclass
class ServerSession:
    side: Side
    key: BackendKey
    greeting: bytes  # everything before ReadyForQuery, for the client
    ready: bytes  # the ReadyForQuery message itself


def socket_path(address: ComputeAddress) -> str:
    # Interned: every session's cancel key holds it, and a branch has one.
    return sys.intern(f"{address.socket_dir}/.s.PGSQL.{address.port}")


async def open_session(address: ComputeAddress, params: dict[str, str], branch: str) -> ServerSession:
    loop = asyncio.get_running_loop()
    path = socket_path(address)
    try:
        _, server = await loop.create_unix_connection(lambda: Side("compute"), path)
    except OSError as e:
        raise ConnectError(f"could not reach the compute of branch {branch!r}: {e.strerror or e}") from None
    server.write(codec.encode_startup(params))
    key: BackendKey | None = None
    greeting = bytearray()
    ready: bytes | None = None
    try:
        while ready is None:
            data = await server.read_messages(codec.MAX_BACKEND_STARTUP_MESSAGE)
            for kind, start, end in codec.iter_messages(data):
                if kind not in TAKEN:  # ParameterStatus, NoticeResponse, …: the client's, passed on as sent
                    greeting += data[start:end]
                    continue
                msg = codec.Message(kind, data[start + 5:end])
                if kind == b"R":
                    auth, _ = codec.parse_auth(msg)
                    if auth != codec.AUTH_OK:
                        raise ConnectError(f"the compute of branch {branch!r} asked for authentication type {auth}")
                elif kind == b"K":
                    pid, secret = codec.parse_backend_key_data(msg)
                    key = BackendKey(path, pid, secret)
                elif kind == b"E":
                    err = codec.parse_error_response(msg)
                    raise SessionError(err.message, err.code, hint=err.hint)
                else:  # ReadyForQuery; what came after it stays buffered for the relay
                    ready = data[start:end]
                    server.buf[:0] = data[end:]
                    break
    except (ConnectionError, codec.ProtocolError) as e:
        server.close()
        raise ConnectError(f"the compute of branch {branch!r} closed the session during startup: {e}") from None
    except SessionError:
        server.close()
        raise
    if key is None:
        server.close()
        raise ConnectError(f"the compute of branch {branch!r} sent no cancel key")
    return ServerSession(server, key, bytes(greeting), ready)
