"""HTTPS on a cluster with ``tls = true``: the TLS contexts its own processes
use, all from the cluster CA (``cluster.control.ca``).

Who holds which: every node serves with the certificate the CA issued it
(``georeg node --tls-cert``, built there); the routing endpoints and the
management API serve with the endpoints' certificate (``ClusterTls.server``)
and the endpoints, since they terminate TLS, reach nodes over TLS again,
trusting only the CA (``client_context``), as do the supervisor's health
checks, the management plane's requests through management links, verify,
faults, the benchmarks and the CLI (``cluster.cli.common.cluster_tls``).

Invariants: a client context verifies the peer's certificate and its name
(127.0.0.1, localhost or the login server, as the certificate's SAN holds
them) against the cluster CA and nothing else, never the system's store: a
certificate some public CA issued for 127.0.0.1 proves nothing about a node.
Nothing here turns verification off.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 is what the oldest clients a registry meets (Docker-era tooling) speak.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies a node's or endpoint's certificate and name against the cluster
    CA only (``ca_file``, or what ``load_verify_locations`` adds later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # hostname and chain checked
    context.minimum_version = MINIMUM_VERSION
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def server_context(cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """Serves ``cert_file`` (or what ``load_cert_chain`` adds later); asks
    clients for no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


class ClusterTls:
    """The cluster process's two contexts: the endpoints serve with ``server``
    and reach nodes with ``client``. Made when the cluster is, before its
    first start has made the CA (the endpoints bind their ports before
    anything is written), and filled by ``load`` once it has: a handshake
    before that fails, and no node is up then to route to anyway."""

    def __init__(self) -> None:
        self.server = server_context()
        self.client = client_context()
        self.loaded = False

    def load(self, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.server.load_cert_chain(cert_file, key_file)
        self.client.load_verify_locations(cafile=str(ca_file))
        self.loaded = True
