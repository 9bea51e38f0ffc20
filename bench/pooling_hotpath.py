"""The transaction pooler's own CPU per transaction, in process and without sockets: the two hot
callbacks (a client's request → lend and forward; the backend's answer ending in ReadyForQuery
``I`` → hand over and give the backend to the next client in line) on the real Pool, PooledClient
and PooledServer, with byte sinks for transports. 1,000 clients over 20 backends, pgbench
``-S -M extended``'s bytes and startup settings (``application_name``). Compiled
(``proxy/native.py``) when a build is there; ``LAKELET_INTERPRETED=1`` for the interpreted modules.

    .venv/bin/python bench/pooling_hotpath.py [--transactions N]

It measures what the kernel does not: the difference between two runs is the code's own. The
sinks' ``write`` (a Python method, about 0.1 µs each, two per transaction) is included.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402

from compute import LoadSignals  # noqa: E402
from proxy import codec, native  # noqa: E402
from proxy.pooled_client import PooledClient  # noqa: E402
from proxy.pooled_server import PooledServer  # noqa: E402
from proxy.pooler import PoolConfig, Pooler  # noqa: E402
from proxy.statements import startup_settings  # noqa: E402

SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
REQUEST = (codec.encode_message(b"P", b"\x00" + SQL + b"\x00" + struct.pack("!h", 0))
           + codec.encode_message(b"B", b"\x00\x00" + struct.pack("!hhi", 0, 1, 6) + b"123456" + struct.pack("!h", 0))
           + codec.encode_message(b"D", b"P\x00") + codec.encode_message(b"E", b"\x00" + struct.pack("!i", 0))
           + codec.encode_message(b"S"))
ROW_DESCRIPTION = struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
ANSWER = (codec.encode_message(b"1") + codec.encode_message(b"2") + codec.encode_message(b"T", ROW_DESCRIPTION)
          + codec.encode_message(b"D", struct.pack("!hi", 1, 1) + b"0") + codec.encode_message(b"C", b"SELECT 1\x00")
          + codec.ready_for_query(b"I"))


class Sink:
    """A transport that keeps nothing."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(clients: int, backends: int, transactions: int) -> float:
    signals = LoadSignals()
    pooler = Pooler(PoolConfig(mode="transaction", size=backends), wake=None,  # type: ignore[arg-type]
                    signals=lambda _: signals)
    pool = pooler.pool("main", "bench", "bench")
    servers = []
    for _ in range(backends):
        server = PooledServer(pool, Sink(), None, b"", 1, 200)  # type: ignore[arg-type]
        server.applied = pool.intern(startup_settings({"user": "bench", "application_name": "pgbench"}, []))
        server.where = 1  # as if just opened for a client
        pool.servers.add(server)
        pool.opened += 1
        pool.in_use += 1
        pooler.branch_opened["main"] += 1
        servers.append(server)
        pool.release(server)
    for i in range(clients):  # each sends its transaction; those past the backends wait in line
        settings = startup_settings({"user": "bench", "application_name": "pgbench"}, [])  # as pgbench logs in
        PooledClient(pool, Sink(), settings, i, i).data_received(REQUEST)  # type: ignore[arg-type]
    done = 0
    started = time.process_time()
    while done < transactions:
        for server in servers:
            client = server.client
            if client is None:
                continue
            server.data_received(ANSWER)  # the answer: handed over, the backend to the next in line
            client.data_received(REQUEST)  # the client's next transaction: back in line
            done += 1
    return (time.process_time() - started) / done * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transactions", type=int, default=400_000)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--backends", type=int, default=20)
    args = ap.parse_args()
    uvloop.install()
    us = asyncio.run(run(args.clients, args.backends, args.transactions))
    print(f"pooler hot path ({'compiled' if native.compiled() else 'interpreted'}): {us:.2f} µs CPU per transaction "
          f"({args.transactions} transactions, {args.clients} clients, {args.backends} backends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
