"""A throwaway CA, server and client certificates, and a redis-server that speaks only TLS, for tests.

The embedded valkey-server is built without TLS; `.ci/run` installs Debian's redis-server, which has it.
Where no TLS-capable server is found, the TLS tests are skipped with that reason.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .redis_server import RedisServer, free_port, server_binary

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verifying against it must fail


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    ca, ca_key = _ca("eagercache test CA")
    server, server_key = _leaf("redis", ca, ca_key, server=True)
    client, client_key = _leaf("eagercache", ca, ca_key, server=False)
    other, _ = _ca("some other CA")
    _write(directory / "ca.pem", ca)
    _write(directory / "server.pem", server, server_key)
    _write(directory / "client.pem", client, client_key)
    _write(directory / "other-ca.pem", other)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )


def tls_binary() -> str | None:
    """A redis-server or valkey-server built with TLS, or None."""
    for candidate in (shutil.which("redis-server"), shutil.which("valkey-server"), server_binary()):
        if candidate is None:
            continue
        # Certificates that do not exist: a server with TLS stops on them, one without stops sooner.
        missing = "/nonexistent/eagercache-probe.pem"
        args = ["--port", "0", "--tls-port", str(free_port()), "--tls-cert-file", missing, "--tls-key-file", missing]
        probe = subprocess.run([candidate, *args], capture_output=True, text=True, timeout=10)
        if "Failed finding TLS support" not in probe.stdout + probe.stderr:
            return candidate
    return None


class TlsRedisServer(RedisServer):
    """A server on a TLS port only (no plain port); `require_client_cert` turns on mutual TLS."""

    def __init__(self, pki: Pki, binary: str, *, require_client_cert: bool = False) -> None:
        self.pki = pki
        self.tls_binary = binary
        super().__init__(
            "--tls-cert-file",
            str(pki.server_cert),
            "--tls-key-file",
            str(pki.server_key),
            "--tls-ca-cert-file",
            str(pki.ca),
            "--tls-auth-clients",
            "yes" if require_client_cert else "no",
            "--notify-keyspace-events",
            "Ex",
        )

    def binary(self) -> str:
        return self.tls_binary

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port)]  # no plain port at all

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.pki.ca),
            ssl_certfile=str(self.pki.client_cert),
            ssl_keyfile=str(self.pki.client_key),
            socket_connect_timeout=1,
        )
