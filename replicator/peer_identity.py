"""Who a replication peer is, on a cluster whose nodes replicate over mutual TLS.

Every node of an auth cluster holds a certificate from the cluster CA
(``cluster.control.ca`` issues it) that names its region and zone in the
subject (``OU=region:<r>``, ``OU=zone:<z>``). This module reads that naming
back (``location_of``; the CA writes it with ``REGION_UNIT``/``ZONE_UNIT``),
turns a node's CA, key and certificate into gRPC credentials
(``PeerCredentials``: a server that accepts only clients with a certificate
from the CA, channels that present the node's certificate and accept only a
server with one), and tells a servicer where the peer on the other end of a
call is (``certified_location``), from the certificate the TLS handshake
verified.

Invariants: on a mutual-TLS server a peer's region and zone are those of its
certificate, never what a request says; no call reaches a handler without a
certificate the cluster CA issued (the handshake refuses it first).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

REGION_UNIT = "region:"
ZONE_UNIT = "zone:"
# What gRPC's auth context names the verified peer certificate (PEM).
_PEER_CERTIFICATE = "x509_pem_cert"


def location_of(certificate: x509.Certificate) -> tuple[str, str]:
    """The (region, zone) a node certificate names ("" when it has no zone);
    ``ValueError`` when it names no region."""
    region = zone = None
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = str(attribute.value)
        if value.startswith(REGION_UNIT):
            region = value.removeprefix(REGION_UNIT)
        elif value.startswith(ZONE_UNIT):
            zone = value.removeprefix(ZONE_UNIT)
    if not region:
        raise ValueError("the certificate names no region")
    return region, zone or ""


@functools.lru_cache(maxsize=256)
def _location_of_pem(pem: bytes) -> tuple[str, str]:
    # Peers are few and keep their certificates: parse each once, not per call.
    return location_of(x509.load_pem_x509_certificate(pem))


def certified_location(auth_context: dict[str, list[bytes]]) -> tuple[str, str]:
    """The (region, zone) of the peer of a call, from the client certificate its
    TLS handshake verified (``ServicerContext.auth_context()``); ``ValueError``
    when the call came without one or it names no region."""
    certificates = auth_context.get(_PEER_CERTIFICATE) or []
    if len(certificates) != 1:
        raise ValueError("the call carries no verified peer certificate")
    return _location_of_pem(certificates[0])


def certified_name(auth_context: dict[str, list[bytes]]) -> str:
    """The node name of the peer of a call: its certificate's common name (the
    CA writes the node's name there); "" when the call came without one."""
    certificates = auth_context.get(_PEER_CERTIFICATE) or []
    if len(certificates) != 1:
        return ""
    return _name_of_pem(certificates[0])


@functools.lru_cache(maxsize=256)
def _name_of_pem(pem: bytes) -> str:
    names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """A node's replication credentials: the cluster CA, its key and certificate (PEM)."""

    ca: bytes
    key: bytes
    certificate: bytes

    @classmethod
    def load(cls, ca_file: Path, key_file: Path, cert_file: Path) -> PeerCredentials:
        return cls(ca_file.read_bytes(), key_file.read_bytes(), cert_file.read_bytes())

    def server(self) -> grpc.ServerCredentials:
        """A server's: the handshake fails for a client without a certificate from the CA."""
        return grpc.ssl_server_credentials([(self.key, self.certificate)],
                                           root_certificates=self.ca, require_client_auth=True)

    def channel(self) -> grpc.ChannelCredentials:
        """A channel's: presents this node's certificate, accepts only a server
        whose certificate the CA issued for the address dialled (node
        certificates name 127.0.0.1 and localhost, which WAN links listen on)."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.certificate)
