"""Certificates for the tests' simulators: a private CA and a server certificate it signs, or a self-signed one."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )


def _cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: str, signer: rsa.RSAPrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(signer, hashes.SHA256())


def ca_signed(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a server certificate for 127.0.0.1 signed by a private CA."""
    ca_key, server_key = _key(), _key()
    ca = _cert("qrm test CA", ca_key, "qrm test CA", ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, "qrm test CA", ca_key, ca=False)
    _write(directory / "ca.pem", ca)
    _write(directory / "server.pem", server, server_key)
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, cert.key): a self-signed certificate for 127.0.0.1, as a fresh vCenter has."""
    key = _key()
    cert = _cert("127.0.0.1", key, "127.0.0.1", key, ca=False)
    _write(directory / "selfsigned.pem", cert, key)
    return directory / "selfsigned.pem", directory / "selfsigned.key"
