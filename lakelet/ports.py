"""Listening on the configured ports, with a bind failure explained.

The defaults (55432 for Postgres, 55480 for HTTP) lie inside Linux's default ephemeral port range
(32768–60999), from which the kernel picks the local port of outgoing connections: any process's
client connection (even one to itself) can hold one for a while. Lakelet keeps the defaults
(well known from its docs) but says so when a bind fails, naming the flag that picks another.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class BindError(OSError):
    """A listening port could not be bound; the message says why and what to do."""


def ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def explain(what: str, host: str, port: int, flag: str, err: OSError) -> str:
    reason = err.strerror or str(err)
    text = f"cannot listen on {host}:{port} for {what}: {reason}"
    span = ephemeral_range()
    if err.errno == errno.EADDRINUSE and span is not None and span[0] <= port <= span[1]:
        text += (f" (port {port} lies in this machine's ephemeral range {span[0]}-{span[1]}, where an "
                 "outgoing connection can hold it; `ss -tanp | grep :{port}` shows who)").replace("{port}", str(port))
    return f"{text}; choose another with {flag}"


async def listen(what: str, host: str, port: int, flag: str, start: Callable[[], Awaitable[None]]) -> None:
    """Run ``start`` (which binds ``host:port``); a bind failure becomes one ``BindError`` line."""
    try:
        await start()
    except BindError:
        raise
    except OSError as e:
        # The starter may have re-worded the error without its errno: bind once more to learn it.
        cause = _probe(host, port) or e
        raise BindError(explain(what, host, port, flag, cause)) from None


def _probe(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None
