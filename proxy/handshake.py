"""Stage 1: first packets, TLS and the startup message; then which branch the session is for."""

from __future__ import annotations

import asyncio
import shlex
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from proxy import codec
from proxy.errors import HandshakeError, InvalidStartupPacket, RoutingError, SessionError
from proxy.pipe import Side


@dataclass
class Startup:
    params: dict[str, str]
    minor: int
    unknown_options: tuple[str, ...]
    tls: bool
    sni: str | None


@dataclass
class Cancel:
    pid: int
    secret: int


async def read_first_packet(side: Side) -> codec.FirstPacket:
    header = await side.read_exact(4)
    try:
        length = codec.first_packet_length(header)
    except codec.InvalidStartupLength as e:
        raise InvalidStartupPacket(str(e)) from None
    try:
        return codec.parse_first_packet(header + await side.read_exact(length - 4))
    except codec.ProtocolError as e:
        raise HandshakeError(str(e), e.sqlstate) from None


def _sni(side: Side) -> str | None:
    assert side.transport is not None
    obj = side.transport.get_extra_info("ssl_object")
    return getattr(obj, "lakelet_sni", None) if obj is not None else None


async def negotiate(side: Side, ssl_ctx: ssl.SSLContext | None, *, direct_tls: bool,
                    require_tls: bool) -> Startup | Cancel:
    """Answer SSLRequest/GSSENCRequest until a StartupMessage or a CancelRequest arrives."""
    tls = direct_tls
    loop = asyncio.get_running_loop()
    while True:
        packet = await read_first_packet(side)
        if isinstance(packet, codec.CancelRequest):
            return Cancel(packet.pid, packet.secret)
        if isinstance(packet, codec.GSSENCRequest):
            side.write(b"N")
            continue
        if isinstance(packet, codec.SSLRequest):
            if tls:
                raise HandshakeError("SSLRequest inside an encrypted connection")
            if side.buf:
                # Bytes sent behind the SSLRequest before our answer would be read as if they
                # had come through TLS (CVE-2021-23214): refuse.
                raise HandshakeError("received unencrypted data after SSL request")
            if ssl_ctx is None:
                side.write(b"N")
                continue
            side.write(b"S")
            assert side.transport is not None
            side.transport = await loop.start_tls(side.transport, side, ssl_ctx, server_side=True)  # type: ignore
            tls = True
            continue
        if require_tls and not tls:
            raise SessionError("connection requires TLS: connect with sslmode=require", "28000")
        return Startup(dict(packet.params), packet.minor, packet.unknown_options, tls,
                       _sni(side) if tls else None)


def split_options(options: str) -> tuple[str | None, str]:
    """Take ``endpoint=NAME`` (also ``--endpoint=NAME`` or ``-c endpoint=NAME``) out of the
    ``options`` startup parameter; return it and the options that remain."""
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError:
        words = options.split()
    endpoint = None
    keep: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-c", "--c") and i + 1 < len(words) and words[i + 1].startswith("endpoint="):
            endpoint = words[i + 1].split("=", 1)[1]
            i += 2
            continue
        for prefix in ("endpoint=", "--endpoint=", "-cendpoint="):
            if w.startswith(prefix):
                endpoint = w[len(prefix):]
                break
        else:
            keep.append(w.replace("\x00", "\\ "))
        i += 1
    return endpoint, " ".join(keep)


def route(startup: Startup, has: Callable[[str], bool], default: str) -> str:
    """The branch: SNI's first label when it names one, else options' endpoint, else default."""
    endpoint, rest = split_options(startup.params.get("options", ""))
    if "options" in startup.params:
        if rest:
            startup.params["options"] = rest
        else:
            del startup.params["options"]
    if startup.sni:
        label = startup.sni.split(".", 1)[0]
        if "." in startup.sni and has(label):
            return label
    branch = endpoint or default
    if not has(branch):
        raise RoutingError(f'endpoint "{branch}" does not exist',
                           hint="choose a branch with options=endpoint=<branch> in the connection string "
                                "(lakelet branch list shows them)")
    return branch
