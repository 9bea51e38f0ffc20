"""Stage 4: open the session on the compute over its private socket, as the same role and
database, and pass the server's greeting (ParameterStatus … ReadyForQuery) to the client with a
proxy-issued cancel key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from compute import ComputeAddress
from proxy import codec
from proxy.cancel import BackendKey
from proxy.errors import ConnectError, SessionError
from proxy.pipe import Side


@dataclass
class ServerSession:
    side: Side
    key: BackendKey
    greeting: bytes  # everything before ReadyForQuery, for the client
    ready: bytes  # the ReadyForQuery message itself


def socket_path(address: ComputeAddress) -> str:
    return f"{address.socket_dir}/.s.PGSQL.{address.port}"


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
    try:
        while True:
            msg = await server.read_message(codec.MAX_BACKEND_STARTUP_MESSAGE)
            if msg.type == b"R":
                kind, _ = codec.parse_auth(msg)
                if kind != codec.AUTH_OK:
                    raise ConnectError(f"the compute of branch {branch!r} asked for authentication type {kind}")
            elif msg.type == b"K":
                pid, secret = codec.parse_backend_key_data(msg)
                key = BackendKey(path, pid, secret)
            elif msg.type == b"E":
                err = codec.parse_error_response(msg)
                raise SessionError(err.message, err.code, hint=err.hint)
            elif msg.type == b"Z":
                ready = codec.encode_message(msg.type, msg.payload)
                break
            else:  # ParameterStatus, NoticeResponse, NegotiateProtocolVersion: the client's business
                greeting += codec.encode_message(msg.type, msg.payload)
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
