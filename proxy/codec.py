"""A sans-I/O codec for the parts of the Postgres wire protocol the proxy reads or writes.

Bytes go in (``feed``), messages come out (``next_message``); nothing here touches a socket, so
it is tested without one. Every malformed input raises ``ProtocolError`` (SQLSTATE 08P01), and
nothing else: the proxy turns that into a FATAL ErrorResponse and closes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_STARTUP_PACKET = 10_000
MAX_AUTH_MESSAGE = 64 * 1024
MAX_BACKEND_STARTUP_MESSAGE = 1 << 20

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 3 << 16

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")


class ProtocolError(Exception):
    """The peer broke the protocol; ``sqlstate`` is what the client is told."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# -- first packets (client → proxy, no type byte) ---------------------------------------------------


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True)
class StartupMessage:
    params: dict[str, str]
    minor: int = 0
    unknown_options: tuple[str, ...] = field(default=())


FirstPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


class InvalidStartupLength(ProtocolError):
    """The first packet's length word is out of range: not a Postgres client at all (or one that
    sent Terminate, ``X``, before any startup packet, read as a 1.4 GB length). Postgres logs
    "invalid length of startup packet" and closes without a word; so does the proxy."""


def first_packet_length(header: bytes) -> int:
    """Validate a first packet's 4-byte length word and return the whole packet's length."""
    if len(header) < 4:
        raise ProtocolError("incomplete startup packet")
    (length,) = _I32.unpack_from(header)
    if length < 8:
        raise InvalidStartupLength("invalid length of startup packet")
    if length > MAX_STARTUP_PACKET:
        raise InvalidStartupLength(f"invalid length of startup packet: {length} bytes is over the "
                                   f"{MAX_STARTUP_PACKET}-byte limit")
    return length


def parse_first_packet(packet: bytes) -> FirstPacket:
    """Decode a whole first packet (its length word included)."""
    length = first_packet_length(packet)
    if len(packet) != length:
        raise ProtocolError("startup packet length does not match its contents")
    (code,) = _U32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE and length == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and length == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE and length == 16:
        pid, secret = struct.unpack_from("!ii", packet, 8)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3 or code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE):
        raise ProtocolError(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    body = packet[8:]
    if not body.endswith(b"\x00"):
        raise ProtocolError("startup packet is not terminated")
    parts = body[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolError("startup packet has a parameter name without a value")
    params: dict[str, str] = {}
    unknown: list[str] = []
    for i in range(0, len(parts), 2):
        try:
            name, value = parts[i].decode(), parts[i + 1].decode()
        except UnicodeDecodeError:
            raise ProtocolError("startup packet parameters are not valid UTF-8") from None
        if not name:
            raise ProtocolError("startup packet has an empty parameter name")
        if name.startswith("_pq_."):
            unknown.append(name)
        else:
            params[name] = value
    if not params.get("user"):
        raise ProtocolError("no PostgreSQL user name specified in startup packet")
    return StartupMessage(params, minor, tuple(unknown))


def encode_startup(params: dict[str, str], minor: int = 0) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    return _I32.pack(8 + len(body)) + _U32.pack(PROTOCOL_3_0 | minor) + body


def encode_ssl_request() -> bytes:
    return struct.pack("!iI", 8, SSL_REQUEST_CODE)


def encode_gssenc_request() -> bytes:
    return struct.pack("!iI", 8, GSSENC_REQUEST_CODE)


def encode_cancel(pid: int, secret: int) -> bytes:
    return struct.pack("!iIii", 16, CANCEL_REQUEST_CODE, pid, secret)


# -- typed messages (both directions) -----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    type: bytes
    payload: bytes


def message_end(buf: bytes | bytearray, start: int, max_size: int) -> int | None:
    """Where the typed message starting at ``buf[start]`` ends, if all of it is there."""
    if len(buf) < start + 5:
        return None
    length = _HEADER.unpack_from(buf, start)[1]
    if length < 4 or length > max_size:
        raise ProtocolError(f"invalid message length {length}")
    end = start + 1 + length
    return end if len(buf) >= end else None


def split_message(buf: bytes | bytearray, max_size: int) -> Message | None:
    """The typed message at the start of ``buf`` if it is complete (it occupies
    ``5 + len(payload)`` bytes), else None; the caller consumes it, so nothing is copied twice."""
    end = message_end(buf, 0, max_size)
    if end is None:
        return None
    return Message(_HEADER.unpack_from(buf)[0], bytes(buf[5:end]))


def complete_messages(buf: bytes | bytearray, max_size: int) -> int:
    """How many leading bytes of ``buf`` are whole messages."""
    pos = 0
    while (end := message_end(buf, pos, max_size)) is not None:
        pos = end
    return pos


def iter_messages(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each message in ``data``, which holds whole messages only (as
    ``complete_messages`` measured): lets a reader keep the ones it passes on as raw slices."""
    pos = 0
    while pos < len(data):
        end = pos + 1 + _I32.unpack_from(data, pos + 1)[0]
        yield data[pos:pos + 1], pos, end
        pos = end


def encode_message(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, 4 + len(payload)) + payload


# -- authentication ---------------------------------------------------------------------------------

AUTH_OK = 0
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def auth_ok() -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_OK))


def auth_sasl(mechanisms: list[str]) -> bytes:
    body = b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00"
    return encode_message(b"R", _I32.pack(AUTH_SASL) + body)


def auth_sasl_continue(data: bytes) -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_SASL_FINAL) + data)


def parse_auth(msg: Message) -> tuple[int, bytes]:
    if msg.type != b"R" or len(msg.payload) < 4:
        raise ProtocolError("expected an authentication message")
    return _I32.unpack_from(msg.payload)[0], msg.payload[4:]


@dataclass(frozen=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes


def parse_sasl_initial(msg: Message) -> SASLInitialResponse:
    if msg.type != b"p":
        raise ProtocolError(f"expected a SASLInitialResponse, got message type {msg.type!r}")
    nul = msg.payload.find(b"\x00")
    if nul < 0 or len(msg.payload) < nul + 5:
        raise ProtocolError("malformed SASLInitialResponse")
    try:
        mechanism = msg.payload[:nul].decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed SASL mechanism name") from None
    (length,) = _I32.unpack_from(msg.payload, nul + 1)
    data = msg.payload[nul + 5:]
    if length != len(data) and not (length == -1 and not data):
        raise ProtocolError("SASLInitialResponse length does not match its data")
    return SASLInitialResponse(mechanism, data)


def encode_sasl_initial(mechanism: str, data: bytes) -> bytes:
    return encode_message(b"p", mechanism.encode() + b"\x00" + _I32.pack(len(data)) + data)


def parse_sasl_response(msg: Message) -> bytes:
    if msg.type != b"p":
        raise ProtocolError(f"expected a SASLResponse, got message type {msg.type!r}")
    return msg.payload


# -- session start --------------------------------------------------------------------------------------


def parameter_status(name: str, value: str) -> bytes:
    return encode_message(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


def parse_parameter_status(msg: Message) -> tuple[str, str]:
    parts = msg.payload.split(b"\x00")
    if msg.type != b"S" or len(parts) != 3 or parts[2] != b"":
        raise ProtocolError("malformed ParameterStatus")
    try:
        return parts[0].decode(), parts[1].decode()
    except UnicodeDecodeError:
        raise ProtocolError("ParameterStatus is not valid UTF-8") from None


def backend_key_data(pid: int, secret: int) -> bytes:
    return encode_message(b"K", struct.pack("!ii", pid, secret))


def parse_backend_key_data(msg: Message) -> tuple[int, int]:
    if msg.type != b"K" or len(msg.payload) != 8:
        raise ProtocolError("malformed BackendKeyData")
    pid, secret = struct.unpack("!ii", msg.payload)
    return pid, secret


def ready_for_query(status: bytes = b"I") -> bytes:
    return encode_message(b"Z", status)


def negotiate_protocol_version(minor: int, unknown: list[str] | tuple[str, ...]) -> bytes:
    body = _I32.pack(minor) + _I32.pack(len(unknown)) + b"".join(u.encode() + b"\x00" for u in unknown)
    return encode_message(b"v", body)


def parse_negotiate_protocol_version(msg: Message) -> tuple[int, list[str]]:
    if msg.type != b"v" or len(msg.payload) < 8:
        raise ProtocolError("malformed NegotiateProtocolVersion")
    minor, count = struct.unpack_from("!ii", msg.payload)
    names = msg.payload[8:].split(b"\x00")
    if count < 0 or len(names) != count + 1 or names[-1] != b"":
        raise ProtocolError("malformed NegotiateProtocolVersion option list")
    try:
        return minor, [n.decode() for n in names[:-1]]
    except UnicodeDecodeError:
        raise ProtocolError("NegotiateProtocolVersion is not valid UTF-8") from None


# -- errors and notices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorFields:
    severity: str
    code: str
    message: str
    detail: str | None = None
    hint: str | None = None


def error_response(severity: str, code: str, message: str, *, detail: str | None = None,
                   hint: str | None = None, notice: bool = False) -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", code), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(k + v.encode() + b"\x00" for k, v in fields) + b"\x00"
    return encode_message(b"N" if notice else b"E", body)


def parse_error_response(msg: Message) -> ErrorFields:
    if msg.type not in (b"E", b"N") or not msg.payload.endswith(b"\x00"):
        raise ProtocolError("malformed ErrorResponse")
    fields: dict[str, str] = {}
    for part in msg.payload[:-1].split(b"\x00"):
        if not part:
            continue
        try:
            fields[chr(part[0])] = part[1:].decode()
        except UnicodeDecodeError:
            raise ProtocolError("ErrorResponse is not valid UTF-8") from None
    return ErrorFields(fields.get("S", "ERROR"), fields.get("C", "XX000"), fields.get("M", ""),
                       fields.get("D"), fields.get("H"))


def fatal(code: str, message: str, *, detail: str | None = None, hint: str | None = None) -> bytes:
    return error_response("FATAL", code, message, detail=detail, hint=hint)
