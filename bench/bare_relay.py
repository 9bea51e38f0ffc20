"""The least a Python relay under uvloop can do: accept on TCP, open the compute's Unix socket,
and write every chunk read on one side to the other — no startup parsing, no authentication, no
counting, no backpressure. ``bench/proxy.py`` runs it beside the proxy as a floor: what the
Lakelet proxy costs per transaction above this line is its own; what this line costs above
PgBouncer is the runtime's (one Python callback and one uvloop write per chunk).

    python bench/bare_relay.py --listen PORT --socket /path/to/.s.PGSQL.5432
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop


class End(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: End | None = None
        self.early: list[bytes] = []  # bytes that arrive before the other end is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def relay(conn: socket.socket, path: str) -> None:
    loop = asyncio.get_running_loop()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_t, client = await loop.connect_accepted_socket(End, conn)
    try:
        _, server = await loop.create_unix_connection(End, path)
    except OSError:
        client_t.close()
        return
    client.peer, server.peer = server, client
    assert server.transport is not None
    for chunk in client.early:
        server.transport.write(chunk)
    client.early.clear()


async def serve(port: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        task = loop.create_task(relay(conn, path))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="TCP port on 127.0.0.1")
    ap.add_argument("--socket", required=True, help="the compute's Unix socket file")
    args = ap.parse_args()
    uvloop.run(serve(args.listen, args.socket))


if __name__ == "__main__":
    main()
