"""TLS certificates and SuperNode keys for a deployment, made with `cryptography`'s x509 API.

A self-signed CA signs the SuperLink's server certificate; SuperNodes and the `flwr` CLI
trust the CA (`ca.crt`), nothing else. Each SuperNode has an EC P-384 key pair in OpenSSH
format, the form `flower-supernode --auth-supernode-private-key` and
`flwr supernode register` read. Private keys are written 0600, from the first byte."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate: the only file SuperNodes and the CLI need
    cert: Path  # the SuperLink's certificate
    key: Path  # the SuperLink's private key (0600)

    @classmethod
    def at(cls, folder: Path) -> Certs:
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def write_private(path: Path, data: bytes) -> None:
    """Create the file 0600 (never briefly world-readable) and refuse to overwrite a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(folder: Path, hosts: list[str] = (), days: int = 365) -> Certs:
    """A CA and a server certificate valid for 127.0.0.1, localhost and `hosts`. The
    SuperLink's own ServerApp runner connects to it on 127.0.0.1, so loopback is always in."""
    certs = Certs.at(folder)
    existing = [p for p in (certs.ca, certs.cert, certs.key, folder / "ca.key") if p.exists()]
    if existing:  # a new CA would lock out every SuperNode that trusts the old one
        raise FileExistsError(f"{existing[0]} exists; remove the folder's certificates to make new ones")
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # tolerate clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*LOOPBACK, *hosts]))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec SuperLink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    # The CA key signs nothing else here: keep it (0600) to re-issue the server certificate, or move it offline.
    write_private(folder / "ca.key", _pem_key(ca_key))
    write_private(certs.key, _pem_key(key))
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certs


def make_node_key(path: Path) -> Path:
    """A SuperNode's key pair: `path` (private, 0600) and `path.pub` (to register). Returns the .pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    + b"\n")
    return pub
