"""Server side of SCRAM-SHA-256 (RFC 5802 / 7677), with tls-server-end-point channel binding.

Checked against the verifier Postgres keeps in ``pg_authid.rolpassword``
(``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``), so the proxy never needs a
password. Unknown roles get a made-up verifier and fail the same way, at the same point.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"


class ScramError(Exception):
    """Authentication failed or the exchange was malformed."""


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> Verifier:
        try:
            method, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            if method != MECHANISM:
                raise ValueError
            return cls(int(iterations), base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server))
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 verifier") from None

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None, iterations: int = 4096) -> Verifier:
        salt = salt or secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), hmac.digest(salted, b"Server Key", "sha256"))

    @classmethod
    def dummy(cls, role: str) -> Verifier:
        """A verifier no password matches, stable per role so probing learns nothing."""
        seed = hashlib.sha256(b"lakelet-unknown-role:" + role.encode()).digest()
        return cls(4096, seed[:16], secrets.token_bytes(32), secrets.token_bytes(32))

    def text(self) -> str:
        b64 = base64.b64encode
        return (f"{MECHANISM}${self.iterations}:{b64(self.salt).decode()}$"
                f"{b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")


def certificate_hash(der: bytes) -> bytes:
    """tls-server-end-point binding data (RFC 5929): the certificate's hash with its signature's
    hash algorithm, SHA-256 when that is MD5 or SHA-1."""
    cert = x509.load_der_x509_certificate(der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out[part[0]] = part[2:]
    return out


class ScramServer:
    """One exchange: ``first(client_first) → server_first``, ``final(client_final) → server_final``."""

    def __init__(self, verifier: Verifier, *, mechanism: str, cert_hash: bytes | None) -> None:
        self.verifier = verifier
        self.mechanism = mechanism
        self.cert_hash = cert_hash
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2 = ""

    def first(self, data: bytes) -> bytes:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ScramError("SCRAM message is not UTF-8") from None
        gs2_flag, authzid, bare = (text.split(",", 2) + ["", ""])[:3]
        if authzid:
            raise ScramError("SCRAM authorization identities are not supported")
        if self.mechanism == MECHANISM_PLUS:
            if gs2_flag != f"p={CHANNEL_BINDING_TYPE}":
                raise ScramError("SCRAM-SHA-256-PLUS needs tls-server-end-point channel binding")
        elif gs2_flag == "y" and self.cert_hash is not None:
            # The client could have bound the channel but believes we cannot: a downgrade.
            raise ScramError("channel binding downgrade detected")
        elif gs2_flag not in ("n", "y"):
            raise ScramError("channel binding was requested without the -PLUS mechanism")
        self._gs2 = f"{gs2_flag},{authzid},"
        attrs = _attrs(bare)
        if "r" not in attrs or "m" in attrs:
            raise ScramError("SCRAM client-first-message has no nonce")
        self._client_first_bare = bare
        self._nonce = attrs["r"] + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self.verifier.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.verifier.iterations}"
        return self._server_first.encode()

    def final(self, data: bytes) -> bytes:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ScramError("SCRAM message is not UTF-8") from None
        without_proof, _, proof_part = text.rpartition(",p=")
        attrs = _attrs(without_proof)
        binding = self._gs2.encode()
        if self.mechanism == MECHANISM_PLUS:
            assert self.cert_hash is not None
            binding += self.cert_hash
        if attrs.get("c") != base64.b64encode(binding).decode():
            raise ScramError("SCRAM channel binding does not match")
        if attrs.get("r") != self._nonce:
            raise ScramError("SCRAM nonce does not match")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            raise ScramError("SCRAM proof is not base64") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(self.verifier.stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise ScramError("password authentication failed")
        client_key = (int.from_bytes(proof) ^ int.from_bytes(signature)).to_bytes(len(signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            raise ScramError("password authentication failed")
        server_signature = hmac.digest(self.verifier.server_key, auth_message, "sha256")
        return b"v=" + base64.b64encode(server_signature)
