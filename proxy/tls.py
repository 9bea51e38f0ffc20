"""TLS for the endpoint: the configured certificate, or a self-signed CA and server certificate
made with ``cryptography`` on first start and kept in the data dir."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.scram import certificate_hash

ALPN = "postgresql"


@dataclass(frozen=True)
class TlsMaterial:
    cert_file: Path
    key_file: Path
    ca_file: Path | None
    cert_hash: bytes


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lakelet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def generate(tls_dir: Path) -> None:
    """A CA (kept for ``sslrootcert``) and a server certificate for localhost it signs."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Lakelet local CA")).issuer_name(_name("Lakelet local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([
        x509.DNSName("localhost"), x509.DNSName("*.localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tls_dir / "ca.crt").write_bytes(ca.public_bytes(pem))
    (tls_dir / "server.crt").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    _write_private(tls_dir / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))


def load(tls_dir: Path | None, cert: Path | None, key: Path | None) -> TlsMaterial | None:
    """The configured certificate, else the self-signed one in ``tls_dir`` (made if missing)."""
    ca_file: Path | None = None
    if cert is None or key is None:
        if tls_dir is None:
            return None
        if not (tls_dir / "server.crt").exists() or not (tls_dir / "server.key").exists():
            generate(tls_dir)
        cert, key, ca_file = tls_dir / "server.crt", tls_dir / "server.key", tls_dir / "ca.crt"
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    return TlsMaterial(cert, key, ca_file, certificate_hash(leaf.public_bytes(serialization.Encoding.DER)))


def server_context(material: TlsMaterial, *, direct: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(material.cert_file), str(material.key_file))
    if direct:
        ctx.set_alpn_protocols([ALPN])
    return ctx
