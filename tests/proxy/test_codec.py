"""The sans-I/O codec and SCRAM, without sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import codec
from proxy.scram import MECHANISM, MECHANISM_PLUS, ScramError, ScramServer, Verifier

names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
values = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)


@given(st.dictionaries(names.filter(lambda n: not n.startswith("_pq_.")), values, max_size=8), names)
def test_startup_round_trip(params: dict[str, str], user: str) -> None:
    params = {**params, "user": user}
    packet = codec.encode_startup(params)
    if len(packet) > codec.MAX_STARTUP_PACKET:
        return
    msg = codec.parse_first_packet(packet)
    assert isinstance(msg, codec.StartupMessage)
    assert msg.params == params


@given(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1))
def test_cancel_and_key_round_trip(pid: int, secret: int) -> None:
    assert codec.parse_first_packet(codec.encode_cancel(pid, secret)) == codec.CancelRequest(pid, secret)
    msg = codec.split_message(codec.backend_key_data(pid, secret), codec.MAX_AUTH_MESSAGE)
    assert codec.parse_backend_key_data(msg) == (pid, secret)  # type: ignore[arg-type]


@given(st.sampled_from(["FATAL", "ERROR", "WARNING"]), st.text("0123456789ABCDEFP", min_size=5, max_size=5),
       values, st.none() | values, st.none() | values)
def test_error_response_round_trip(severity: str, code: str, message: str, detail: str | None,
                                   hint: str | None) -> None:
    msg = codec.split_message(codec.error_response(severity, code, message, detail=detail, hint=hint),
                              codec.MAX_AUTH_MESSAGE)
    fields = codec.parse_error_response(msg)  # type: ignore[arg-type]
    assert (fields.severity, fields.code, fields.message) == (severity, code, message)
    assert fields.detail == (detail or None) and fields.hint == (hint or None)


@given(names, values)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    msg = codec.split_message(codec.parameter_status(name, value), codec.MAX_AUTH_MESSAGE)
    assert codec.parse_parameter_status(msg) == (name, value)  # type: ignore[arg-type]


@given(st.integers(0, 5), st.lists(names.map(lambda n: "_pq_." + n), max_size=4))
def test_negotiate_round_trip(minor: int, options: list[str]) -> None:
    msg = codec.split_message(codec.negotiate_protocol_version(minor, options), codec.MAX_AUTH_MESSAGE)
    assert codec.parse_negotiate_protocol_version(msg) == (minor, options)  # type: ignore


def _take(buf: bytearray) -> codec.Message | None:
    """The next whole message, consumed from ``buf`` (as the proxy's reader does)."""
    msg = codec.split_message(buf, codec.MAX_AUTH_MESSAGE)
    if msg is not None:
        del buf[:5 + len(msg.payload)]
    return msg


@given(st.binary(max_size=64).map(lambda b: b))
def test_message_reader_splits_across_feeds(blob: bytes) -> None:
    whole = codec.encode_message(b"Q", blob) + codec.ready_for_query(b"T")
    buf = bytearray()
    got = []
    for i in range(len(whole)):
        buf += whole[i:i + 1]
        while (m := _take(buf)) is not None:
            got.append(m)
    assert got == [codec.Message(b"Q", blob), codec.Message(b"Z", b"T")]


@given(st.lists(st.tuples(st.sampled_from([b"S", b"K", b"R", b"N", b"Z"]), st.binary(max_size=40)), max_size=8),
       st.data())
def test_complete_messages_and_iter_messages_agree_with_the_encoding(
        msgs: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    encoded = [codec.encode_message(kind, payload) for kind, payload in msgs]
    whole = b"".join(encoded)
    cut = data.draw(st.integers(0, len(whole)))
    boundaries = [sum(len(e) for e in encoded[:i]) for i in range(len(encoded) + 1)]
    # Only whole messages count: the largest message boundary at or before the cut.
    assert codec.complete_messages(whole[:cut], 1 << 20) == max(b for b in boundaries if b <= cut)
    got = [(kind, whole[start + 5:end]) for kind, start, end in codec.iter_messages(whole)]
    assert got == msgs


@given(st.binary(max_size=300))
def test_arbitrary_first_packets_raise_only_protocol_errors(data: bytes) -> None:
    try:
        codec.parse_first_packet(data)
    except codec.ProtocolError:
        pass


@given(st.binary(max_size=300))
def test_arbitrary_messages_raise_only_protocol_errors(data: bytes) -> None:
    buf = bytearray(data)
    try:
        while (msg := _take(buf)) is not None:
            for parse in (codec.parse_sasl_initial, codec.parse_parameter_status, codec.parse_error_response,
                          codec.parse_backend_key_data, codec.parse_negotiate_protocol_version, codec.parse_auth):
                try:
                    parse(msg)
                except codec.ProtocolError:
                    pass
    except codec.ProtocolError:
        pass


@pytest.mark.parametrize(
    ("packet", "needle"),
    [
        (struct.pack("!i", 4), "invalid length"),
        (struct.pack("!iI", 20_000, 196608), "over the"),  # quiet: InvalidStartupLength
        (struct.pack("!iI", 8, 2 << 16), "unsupported frontend protocol 2.0"),
        (codec.encode_startup({"database": "x"}), "no PostgreSQL user"),
        (struct.pack("!iI", 9, 196608) + b"u", "not terminated"),
    ],
)
def test_bad_first_packets(packet: bytes, needle: str) -> None:
    with pytest.raises(codec.ProtocolError, match=needle) as err:
        codec.parse_first_packet(packet)
    assert err.value.sqlstate == "08P01"


def _client_proof(password: str, server_first: str, client_first_bare: str, channel: str) -> tuple[str, bytes]:
    attrs = dict(p.split("=", 1) for p in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c={channel},r={attrs['r']}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    sig = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig, strict=True))).decode()
    server_sig = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth, "sha256")
    return f"{without_proof},p={proof}", server_sig


@pytest.mark.parametrize("plus", [False, True])
def test_scram_accepts_the_right_password_only(plus: bool) -> None:
    verifier = Verifier.from_password("correct horse")
    cert_hash = hashlib.sha256(b"cert").digest()
    gs2 = "p=tls-server-end-point,," if plus else "n,,"
    channel = base64.b64encode(gs2.encode() + (cert_hash if plus else b"")).decode()
    for password, ok in (("correct horse", True), ("wrong", False)):
        server = ScramServer(verifier, mechanism=MECHANISM_PLUS if plus else MECHANISM, cert_hash=cert_hash)
        bare = "n=,r=abcdefghijkl"
        server_first = server.first((gs2 + bare).encode()).decode()
        final, server_sig = _client_proof(password, server_first, bare, channel)
        if ok:
            assert server.final(final.encode()) == b"v=" + base64.b64encode(server_sig)
        else:
            with pytest.raises(ScramError):
                server.final(final.encode())


def test_scram_rejects_a_channel_binding_downgrade() -> None:
    server = ScramServer(Verifier.from_password("pw"), mechanism=MECHANISM, cert_hash=b"x" * 32)
    with pytest.raises(ScramError, match="downgrade"):
        server.first(b"y,,n=,r=abc")


def test_verifier_text_round_trip() -> None:
    v = Verifier.from_password("pw")
    assert Verifier.parse(v.text()) == v
