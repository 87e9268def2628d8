"""The cluster's certificate authority: created at first start, one certificate per node.

A node's certificate carries what other nodes need to know about it, so that
nothing it merely claims is believed: its names (SAN: ``127.0.0.1``,
``localhost`` and any given host names, since clients such as skopeo check
only the SAN), and its region and zone, in the subject (``OU=region:<r>``,
``OU=zone:<z>``) and as a URI SAN ``spiffe://georeg/region/<r>/zone/<z>``
that gRPC exposes to a servicer (``location_of``, from
``replicator.peer_identity``, reads them back). A TLS cluster's nodes serve HTTPS with the same certificate, and its
endpoints with one of their own (``endpoint_certificate``). The same
key signs the node's tokens (``registry_node.auth.tokens``), which every
node verifies against this CA.

Layout of a CA directory::

    ca.pem  ca.key                     the CA (key mode 0600)
    nodes/<node>/node.pem  node.key    a node's certificate and key (0600)
    endpoints/endpoint.pem endpoint.key  the routing endpoints' (TLS clusters; serving only)

Invariants: private keys are written mode 0600 from the first byte (never
chmod-ed after the fact); a restart reuses the CA and every node certificate
whose names, region and zone still match and that the CA issued, so tokens and
peers keep trusting each other; keys are P-256 (ES256 tokens, TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Read back by replication (a peer's region and zone come from its certificate).
from replicator.peer_identity import REGION_UNIT, ZONE_UNIT
from replicator.peer_identity import location_of as location_of

from .private_files import write_private

CA_LIFETIME = dt.timedelta(days=3650)
NODE_LIFETIME = dt.timedelta(days=825)
_SPIFFE = "spiffe://georeg/region/{region}/zone/{zone}"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
ENDPOINTS_DIR = "endpoints"


@dataclass(frozen=True, slots=True)
class NodeCertificate:
    """Where a node's credentials are: what ``georeg node --auth-*`` takes."""

    key_file: Path
    cert_file: Path
    ca_file: Path


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _write_public(path: Path, certificate: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ClusterCA:
    """A CA kept in ``directory``; ``open`` creates it the first time."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey,
                 certificate: x509.Certificate) -> None:
        self.directory = directory
        self.key = key
        self.certificate = certificate

    @property
    def cert_file(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def open(cls, directory: Path, name: str = "georeg") -> ClusterCA:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file, cert_file = directory / "ca.key", directory / "ca.pem"
        if key_file.exists() and cert_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
            if not isinstance(key, ec.EllipticCurvePrivateKey) \
                    or certificate.public_key() != key.public_key():
                raise ValueError(f"{cert_file} does not belong to {key_file}")
            return cls(directory, key, certificate)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "georeg"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{name} cluster CA")])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_file, key)      # the key first: a cert without it is useless
        _write_public(cert_file, certificate)
        return cls(directory, key, certificate)

    def node_certificate(self, node: str, region: str, zone: str = "",
                         hosts: tuple[str, ...] = ()) -> NodeCertificate:
        """``node``'s key and certificate, issued now or reused from an earlier start."""
        names = tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
        return self._issued(self.directory / "nodes" / node, "node",
                            _node_subject(node, region, zone), _san(names, region, zone),
                            (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))

    def endpoint_certificate(self, hosts: tuple[str, ...] = ()) -> NodeCertificate:
        """The routing endpoints' key and certificate (one for all of them: they
        listen on the same names), issued now or reused. It names no region
        or zone and is for serving only: no peer in replication can present it."""
        names = tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "georeg"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "georeg endpoints")])
        return self._issued(self.directory / ENDPOINTS_DIR, "endpoint", subject, _hosts_san(names),
                            (ExtendedKeyUsageOID.SERVER_AUTH,))

    def _issued(self, folder: Path, stem: str, subject: x509.Name, san: list[x509.GeneralName],
                usages: tuple[x509.ObjectIdentifier, ...]) -> NodeCertificate:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file, cert_file = folder / f"{stem}.key", folder / f"{stem}.pem"
        if key_file.exists() and cert_file.exists() \
                and self._reusable(key_file, cert_file, subject, san):
            return NodeCertificate(key_file, cert_file, self.cert_file)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + NODE_LIFETIME, self.certificate.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        _write_private(key_file, key)
        _write_public(cert_file, certificate)
        return NodeCertificate(key_file, cert_file, self.cert_file)

    def _reusable(self, key_file: Path, cert_file: Path, subject: x509.Name,
                  wanted_san: list[x509.GeneralName]) -> bool:
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
            certificate.verify_directly_issued_by(self.certificate)
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        now = _now()
        return (certificate.public_key() == key.public_key()
                and certificate.subject == subject
                and set(san) == set(wanted_san)
                and certificate.not_valid_before_utc <= now
                < certificate.not_valid_after_utc - dt.timedelta(days=30))


def _node_subject(node: str, region: str, zone: str) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "georeg"),
                  x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{REGION_UNIT}{region}")]
    if zone:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{ZONE_UNIT}{zone}"))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, node))
    return x509.Name(attributes)


def _hosts_san(names: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _san(names: tuple[str, ...], region: str, zone: str) -> list[x509.GeneralName]:
    out = _hosts_san(names)
    out.append(x509.UniformResourceIdentifier(_SPIFFE.format(region=region, zone=zone or "-")))
    return out
